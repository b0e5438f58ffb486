"""`lethe <stage>`: one thin command per DVC stage.

A user's mistake (LetheError) prints one line and exits 2; a diverged training exits 1 with its
message; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys


def _prepare(params, args) -> None:
    from lethe.data.sources import prepare

    data = prepare(params.data)
    data.save("data/prepared")
    counts = {s: len(data.split(s)) for s in ("pretrain", "target", "holdout")}
    print(json.dumps({"images": len(data.records), **counts}))


def _pretrain(params, args) -> None:
    from lethe.training.stage import pretrain

    print(json.dumps(pretrain(params)))


def _train(params, args) -> None:
    from lethe.training.stage import finetune

    print(json.dumps(finetune(params, args.method)))


def parser() -> argparse.ArgumentParser:
    from lethe.config import METHODS

    main = argparse.ArgumentParser(prog="lethe", description=__doc__.splitlines()[0])
    main.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    stages = main.add_subparsers(dest="stage", required=True)
    stages.add_parser("prepare", help="build the dataset, splits and planted duplicates").set_defaults(run=_prepare)
    stages.add_parser("pretrain", help="train the base model on the pretraining split").set_defaults(run=_pretrain)
    train = stages.add_parser("train", help="fine-tune the base model on the target split with a method")
    train.add_argument("method", choices=METHODS)
    train.set_defaults(run=_train)
    return main


def main(argv: list[str] | None = None) -> int:
    from lethe.config import load_params
    from lethe.errors import LetheError, TrainingDiverged

    args = parser().parse_args(argv)
    try:
        args.run(load_params(args.params), args)
    except LetheError as exc:
        print(f"lethe: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"lethe: training diverged: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
