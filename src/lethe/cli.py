"""`lethe <stage>`: one thin command per DVC stage.

Each is `lethe.stages.<stage>.<stage>(params, ...)`; its result prints as JSON (the report: its table).
A user's mistake (LetheError) prints one line and exits 2; a diverged training exits 1 with its
message; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

from lethe.methods import METHODS, MITIGATE, VARIANTS

# stage: its help line; every stage is `lethe.stages.<stage>.<stage>(params, ...)`
STAGES = {
    "prepare": "build the dataset: duplicate groups, splits, planted duplicates",
    "shard": "assign the target split's samples to IET-AGC's shards",
    "pretrain": "train the base model on the pretraining split",
    "train": "fine-tune the base model on the target split with a method",
    "featurizer": "train the feature network for FD and prompt accuracy",
    "calibrate": "replication thresholds from held-out images; their false-positive rates",
    "evaluate": "replication, quality and cost metrics of a variant",
    "detect": "memorization detectors on the baseline: AUROC, TPR@1%%FPR, ROC",
    "mitigate": "package an inference-time mitigation with the baseline",
    "localize": "NeMo: localize memorization neurons, prune their union",
    "memcontrol": "MemControl: Optuna search over which U-Net blocks to fine-tune",
    "select_loyal": "LoyalDiffusion: choose the skips and tau from measurements",
    "report": "compare every variant: reports/report.html and .md",
    "register": "register every variant in the MLflow registry, move aliases",
    "promote": "move a registry alias by hand (champion must pass the policy)",
    "audit": "which training images a model reproduces: a variant, or a model you bring",
    "export": "write a variant or a registry model as a diffusers Stable Diffusion pipeline",
}
# not stages: writes params.yaml from a preset, every section filled in; runs DVC's stages side by side
PRESET_HELP = "write --params (default params.yaml) from a preset in pipelines/"
REPRO_HELP = "dvc repro with independent stages side by side, recorded by dvc commit"


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return int(value)


def parser() -> argparse.ArgumentParser:
    from lethe import __version__

    main = argparse.ArgumentParser(
        prog="lethe", description="lethe: train text-to-image diffusion models, measure which training images they "
        "reproduce, and compare the published mitigations. Each command below is one DVC stage (`dvc repro` runs "
        "them all) or a tool.", epilog="Set-up, results and every method: README.md (docs/ for depth).",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=18, width=110))
    main.add_argument("--version", action="version", version=f"lethe {__version__}")
    main.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    stages = main.add_subparsers(dest="stage", required=True, metavar="command", title="commands")
    commands = {name: stages.add_parser(name, help=text) for name, text in STAGES.items()}
    stages.add_parser("preset", help=PRESET_HELP).add_argument("source", help="a preset, e.g. pipelines/smoke/params.yaml")
    repro = stages.add_parser("repro", help=REPRO_HELP)
    repro.add_argument("targets", nargs="*", help="stages to reproduce with their upstream stages (default: all)")
    repro.add_argument("--jobs", "-j", type=_positive, default=None, help="stages at a time (default: the CPU count)")
    commands["train"].add_argument("method", choices=METHODS)
    commands["evaluate"].add_argument("variant", choices=VARIANTS)
    commands["mitigate"].add_argument("variant", choices=MITIGATE)
    memcontrol = commands["memcontrol"]
    memcontrol.add_argument("--workers", type=_positive, default=None, help="worker processes sharing the study (default: memcontrol.workers)")
    memcontrol.add_argument("--join", action="store_true", help="only add a worker to the study (no outputs)")
    audit = commands["audit"]
    audit.add_argument("variant", nargs="?", choices=(*VARIANTS, "champion"),
                       help="a variant of this pipeline, or champion (the registry's); else --model and --images")
    audit.add_argument("--model", help="a lethe model directory or a diffusers Stable Diffusion pipeline directory")
    audit.add_argument("--lora", help="LoRA weights for --model (diffusers' pytorch_lora_weights.safetensors)")
    audit.add_argument("--images", help="the training images: a folder with metadata.jsonl (file_name, text)")
    audit.add_argument("--holdout", help="held-out images of the same domain (a folder like --images): calibrates the threshold")
    audit.add_argument("--prompts", help="extra prompts to audit, one per line")
    audit.add_argument("--name", help="the report's name: reports/audit/<name>/ (default: the model directory's name)")
    audit.add_argument("--full", action="store_true", help="generate for every prompt (default: audit.mode)")
    export = commands["export"]
    export.add_argument("target", help="a variant, champion (the registry's), or models:/<name>@<alias>")
    export.add_argument("--to", required=True, help="the pipeline directory to write (new, or empty)")
    export.add_argument("--fuse", action="store_true", help="a LoRA fused into the U-Net, not written apart")
    promote = commands["promote"]
    promote.add_argument("model")
    promote.add_argument("version")
    promote.add_argument("--alias", required=True)
    promote.add_argument("--force", action="store_true", help="promote even if the version fails the policy")
    return main


def arguments(args: argparse.Namespace) -> tuple:
    """The stage function's arguments after params, from the command line."""
    if args.stage == "train":
        return (args.method,)
    if args.stage in ("evaluate", "mitigate"):
        return (args.variant,)
    if args.stage == "memcontrol":
        return (args.params, args.workers, args.join)
    if args.stage == "export":
        return (args.target, args.to, args.fuse, args.params)
    if args.stage == "promote":
        return (args.model, args.version, args.alias, args.force)
    if args.stage == "audit":
        from lethe.errors import LetheError

        if args.variant and (args.model or args.images or args.lora or args.holdout):
            raise LetheError("lethe audit: give a variant or --model and --images, not both")
        return (args.variant, args.model, args.lora, args.images, args.holdout, args.prompts, args.name, args.full)
    return ()


def quiet_libraries() -> None:
    """The libraries' deprecation notices speak to lethe's developers, not to its users (Lightning's banners
    are quieted where the Trainer is made: `lethe.training.fit`)."""
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(flops_per_batch|LeafSpec|treespec).*")


def main(argv: list[str] | None = None) -> int:
    """From the command line (`argv` None), a stage runs in a child of the project's warm server
    (`lethe.warm`) when one can take it; called with `argv`, always in this process."""
    import lethe.tracking

    lethe.tracking.STARTED = time.time()
    args = parser().parse_args(argv)
    if argv is None and args.stage in STAGES:
        from lethe.warm import run_warm

        code = run_warm(sys.argv[1:])
        if code is not None:
            return code
    from lethe.config import load_params, materialized
    from lethe.errors import LetheError, TrainingDiverged
    from lethe.files import write_text

    quiet_libraries()
    try:
        if args.stage == "preset":
            write_text(args.params, materialized(args.source))
            print(f"{args.params}: written from {args.source}")
            return 0
        if args.stage == "repro":
            from lethe.repro import repro

            return repro(args.targets, args.jobs or os.cpu_count() or 1)
        params = load_params(args.params)
        stage = getattr(importlib.import_module(f"lethe.stages.{args.stage}"), args.stage)
        result = stage(params, *arguments(args))
    except LetheError as exc:
        print(f"lethe: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"lethe: training diverged: {exc}", file=sys.stderr)
        return 1
    text = result if isinstance(result, str) else json.dumps(result)
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
