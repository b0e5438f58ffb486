"""Do the verdicts hold on a re-run? The first run's intervals against the re-runs' point estimates.

    cp -r metrics /tmp/run0
    dvc exp run -S finetune.seed=10 && cp -r metrics /tmp/run10
    dvc exp run -S finetune.seed=20 && cp -r metrics /tmp/run20
    python -m lethe.evaluation.rerun /tmp/run0 /tmp/run10 /tmp/run20

For every variant and endpoint (each change against the baseline that the report judges), the first run's
interval, with its training-run noise from the baseline's A/A replicates, should cover a re-run's point
estimate about 95% of the time. The table and the covered share print as Markdown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lethe.errors import LetheError
from lethe.evaluation.intervals import HIGH, LOW
from lethe.evaluation.runs import ENDPOINTS, with_run_noise
from lethe.methods import CANDIDATES, REPLICATES


def load_run(folder: str | Path) -> dict[str, dict[str, float]]:
    """Every `<variant>.json` of a metrics folder (a copy of `metrics/`) with its changes' run noise."""
    folder, found = Path(folder), {}
    for path in sorted(folder.glob("*.json")):
        if path.stem in (*CANDIDATES, *REPLICATES):
            try:
                found[path.stem] = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise LetheError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})")
    if "baseline" not in found:
        raise LetheError(f"{folder}: no baseline.json; give a copy of a run's metrics/ folder")
    return with_run_noise(found, "baseline", REPLICATES)


def coverage(first: dict[str, dict[str, float]], reruns: list[dict[str, dict[str, float]]]) -> list[dict]:
    """One row per variant, endpoint and re-run: the first run's interval and whether it covers the re-run."""
    rows = []
    for variant in [v for v in CANDIDATES if v in first and v != "baseline"]:
        for title, key in ENDPOINTS:
            low, high = first[variant].get(f"{key}/{LOW}"), first[variant].get(f"{key}/{HIGH}")
            if low is None or high is None:
                continue
            for i, rerun in enumerate(reruns, 1):
                value = rerun.get(variant, {}).get(key)
                if value is not None:
                    rows.append({"variant": variant, "endpoint": title, "first": first[variant][key], "low": low,
                                 "high": high, "rerun": i, "value": value, "covered": low <= value <= high})
    return rows


def markdown(rows: list[dict], command: str | None = None) -> str:
    """The rows, then the covered share per endpoint and over all; `command` heads it where given."""
    head = [f"Written by `{command}`.", ""] if command else []
    lines = ["| variant | endpoint | first run [95%] | re-run | its estimate | covered |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['endpoint']} | {r['first']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] | {r['rerun']} | "
              f"{r['value']:+.3f} | {'yes' if r['covered'] else 'no'} |" for r in rows]
    summary = ["", "| endpoint | covered | cases |", "|---|---|---|"]
    for title, _ in ENDPOINTS:
        mine = [r["covered"] for r in rows if r["endpoint"] == title]
        if mine:
            summary.append(f"| {title} | {sum(mine)} | {len(mine)} |")
    covered = sum(r["covered"] for r in rows)
    share = covered / len(rows) if rows else float("nan")
    return "\n".join(head + lines + summary) + f"\n\nCovered: {covered} of {len(rows)} ({share:.0%}); nominal 95%.\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m lethe.evaluation.rerun FIRST_METRICS_DIR RERUN_METRICS_DIR [...]", file=sys.stderr)
        return 2
    try:
        command = "python -m lethe.evaluation.rerun " + " ".join(argv)
        print(markdown(coverage(load_run(argv[0]), [load_run(folder) for folder in argv[1:]]), command), end="")
    except LetheError as exc:
        print(f"lethe: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
