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


def _shard(params, args) -> None:
    from lethe.data.prepared import PreparedData
    from lethe.data.shards import SHARDS, assign_shards, save_shards

    samples = len(PreparedData.load("data/prepared").training_records("target"))
    assignment = assign_shards(samples, params.ietagc.shards, params.ietagc.seed)
    save_shards(SHARDS, assignment)
    print(json.dumps({"samples": samples, "shards": params.ietagc.shards}))


def _pretrain(params, args) -> None:
    from lethe.training.stage import pretrain

    print(json.dumps(pretrain(params)))


def _train(params, args) -> None:
    from lethe.training.stage import finetune

    print(json.dumps(finetune(params, args.method)))


def _featurizer(params, args) -> None:
    from lethe.evaluation.featurizer import featurizer_stage

    print(json.dumps(featurizer_stage(params)))


def _evaluate(params, args) -> None:
    from lethe.evaluation.evaluate import evaluate

    print(json.dumps(evaluate(params, args.variant)))


def _detect(params, args) -> None:
    from lethe.evaluation.detect import detect

    print(json.dumps(detect(params)))


def _mitigate(params, args) -> None:
    from lethe.mitigation.stage import mitigate

    print(json.dumps(mitigate(params, args.variant)))


def _localize(params, args) -> None:
    from lethe.localization.stage import localize_stage

    print(json.dumps(localize_stage(params)))


def _memcontrol(params, args) -> None:
    from lethe.search.stage import memcontrol

    print(json.dumps(memcontrol(params, args.params, args.workers, args.join)))


def _report(params, args) -> None:
    from lethe.evaluation.report import markdown_table, report

    print(markdown_table(report(params)), end="")


def _register(params, args) -> None:
    from lethe.registry import register

    print(json.dumps(register(params)))


def _promote(params, args) -> None:
    from lethe.registry import promote

    print(promote(params, args.model, args.version, args.alias, args.force))


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return int(value)


def parser() -> argparse.ArgumentParser:
    from lethe.config import METHODS, VARIANTS

    main = argparse.ArgumentParser(prog="lethe", description=__doc__.splitlines()[0])
    main.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    stages = main.add_subparsers(dest="stage", required=True)
    stages.add_parser("prepare", help="build the dataset, splits and planted duplicates").set_defaults(run=_prepare)
    stages.add_parser("shard", help="assign the target split's samples to IET-AGC's shards").set_defaults(run=_shard)
    stages.add_parser("pretrain", help="train the base model on the pretraining split").set_defaults(run=_pretrain)
    train = stages.add_parser("train", help="fine-tune the base model on the target split with a method")
    train.add_argument("method", choices=METHODS)
    train.set_defaults(run=_train)
    stages.add_parser("featurizer", help="train the feature network for FD and prompt accuracy").set_defaults(run=_featurizer)
    evaluate = stages.add_parser("evaluate", help="replication, quality and cost metrics of a variant")
    evaluate.add_argument("variant", choices=VARIANTS)
    evaluate.set_defaults(run=_evaluate)
    stages.add_parser("detect", help="memorization detection scores on the baseline: AUROC, TPR@1%%FPR, ROC").set_defaults(run=_detect)
    mitigate = stages.add_parser("mitigate", help="package an inference-time mitigation with the baseline")
    mitigate.add_argument("variant", choices=("memattn", "wen_inference"))
    mitigate.set_defaults(run=_mitigate)
    stages.add_parser("localize", help="NeMo: localize memorization neurons, prune their union").set_defaults(run=_localize)
    memcontrol = stages.add_parser("memcontrol", help="MemControl: Optuna search over which U-Net blocks to fine-tune")
    memcontrol.add_argument("--workers", type=_positive, default=None, help="worker processes sharing the study (default: memcontrol.workers)")
    memcontrol.add_argument("--join", action="store_true", help="only add a worker to the study (no outputs)")
    memcontrol.set_defaults(run=_memcontrol)
    stages.add_parser("report", help="compare every variant: table and trade-off plot").set_defaults(run=_report)
    stages.add_parser("register", help="register every variant in the MLflow registry, move aliases").set_defaults(run=_register)
    promote = stages.add_parser("promote", help="move a registry alias by hand (champion must pass the policy)")
    promote.add_argument("model")
    promote.add_argument("version")
    promote.add_argument("--alias", required=True)
    promote.add_argument("--force", action="store_true", help="promote even if the version fails the policy")
    promote.set_defaults(run=_promote)
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
