"""The one exception type that means "the user handed us something wrong".

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""


class LetheError(Exception):
    """A user's mistake: bad params, unreadable input, an empty split. Message names the file or key."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
