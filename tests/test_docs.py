"""What a newcomer reads: a short README that starts with the two commands, a stage graph that matches
DVC's, `lethe --help` and `--version`, and no development history anywhere in the repository."""

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

from lethe import __version__
from lethe.cli import PRESET_HELP, REPRO_HELP, STAGES

README = (ROOT / "README.md").read_text()
COMMANDS = ('python3 -m venv .venv && . .venv/bin/activate && pip install -e . && lethe repro',
            'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m pytest')
# a stop or an issue with its number: where the project was once, not what it is now
HISTORY = re.compile(r"\b(stop|issue)s?\s+#?\d+", re.IGNORECASE)


def test_readme_is_short_and_opens_with_what_lethe_is_and_the_two_commands():
    lines = README.splitlines()
    assert len(lines) <= 400
    assert all(command in "\n".join(lines[:30]) for command in COMMANDS)
    assert "![" in README and (ROOT / "docs/images/report.png").is_file()  # the report's screenshot


def test_no_file_in_the_repository_speaks_of_stops_or_issues():
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    found = []
    for name in tracked:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".png", ".npz", ".npy", ".lock"):
            continue
        for number, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if HISTORY.search(line):
                found.append(f"{name}:{number}: {line.strip()[:80]}")
    assert not found, "\n".join(found)


def test_the_history_pattern_catches_what_it_should():
    number = str(7 * 3)  # not typed beside the words, or this file would match itself
    assert all(HISTORY.search(text + number) for text in ("stop ", "Issue ", "(issues ", "issue #"))
    assert not any(HISTORY.search(text) for text in ("non-stop", "stops when", "an issue with 3 seeds"))


def stage_graph() -> str:
    """`dvc dag --mermaid`, with each foreach stage's instances other than the baseline's (and the champion's
    audit) drawn as one node, `train@*`: the same edges, a picture a person can read."""
    dag = subprocess.run([sys.executable, "-m", "dvc", "dag", "--mermaid"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    labels = dict(re.findall(r'^\s*(node\d+)\["([^"]+)"\]', dag, re.MULTILINE))
    merged = {node: re.sub(r"@(?!baseline$|champion$).*", "@*", label) for node, label in labels.items()}
    names = sorted(set(merged.values()))
    edges = sorted({(names.index(merged[a]), names.index(merged[b]))
                    for a, b in re.findall(r"^\s*(node\d+)\s*-->\s*(node\d+)", dag, re.MULTILINE)
                    if merged[a] != merged[b]})
    return "\n".join(["flowchart TD", *(f'\tn{i}["{name}"]' for i, name in enumerate(names)),
                      *(f"\tn{a}-->n{b}" for a, b in edges)])


def test_readme_stage_graph_is_dvcs():
    """The README's Mermaid block is DVC's graph for this dvc.yaml (`python -m tests.test_docs` rewrites it)."""
    block = re.search(r"```mermaid\n(.*?)```", README, re.DOTALL)
    assert block, "README.md has no ```mermaid block"
    assert block.group(1).strip() == stage_graph(), "the stage graph changed: run `python -m tests.test_docs`"


def test_help_lists_every_command_in_a_line_and_points_to_the_readme():
    out = subprocess.run([sys.executable, "-m", "lethe.cli", "--help"], capture_output=True, text=True, check=True).stdout
    lines = [line.split(None, 1) for line in out.splitlines() if line.startswith("    ")]
    listed = {words[0]: words[1] for words in lines if len(words) == 2}
    for name, text in {**STAGES, "preset": PRESET_HELP, "repro": REPRO_HELP}.items():
        assert listed.get(name) == text.replace("%%", "%"), name  # the whole line, unwrapped
    assert "README.md" in out


def test_version_answers():
    out = subprocess.run([sys.executable, "-m", "lethe.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"lethe {__version__}"
    assert f"## {__version__}" in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.parametrize("path", ["README.md", "docs/methods.md", "docs/statistics.md", "docs/full-scale.md",
                                  "docs/benchmarks.md"])
def test_docs_exist_and_are_short(path):
    assert len((ROOT / path).read_text().splitlines()) <= 400


if __name__ == "__main__":  # rewrite README.md's stage graph from dvc.yaml
    text = re.sub(r"```mermaid\n.*?```", lambda _: f"```mermaid\n{stage_graph()}\n```", README, count=1, flags=re.DOTALL)
    (ROOT / "README.md").write_text(text)
