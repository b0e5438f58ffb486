"""The `mitigate@<variant>` stages: the baseline with an inference-time mitigation packaged in its config.

The weights are the baseline's; `config.json` gains `inference`, which `lethe.sampling.generate`
applies wherever the model is loaded (evaluation, the registered pyfunc). The variant's training cost
is the baseline's.
"""

from __future__ import annotations

import json
from pathlib import Path

from lethe.config import Params
from lethe.errors import LetheError
from lethe.files import atomic_dir, write_json
from lethe.models.factory import load_model, save_model

BASELINE = Path("models/baseline")


def inference_settings(params: Params, variant: str) -> dict:
    if variant == "memattn":
        return {"memattn": params.memattn.model_dump(mode="json")}
    if variant == "wen_inference":
        cfg = params.wen_inference
        target = cfg.target if cfg.target is not None else cfg.target_fraction * holdout_magnitude()
        return {"wen": {"lr": cfg.lr, "iterations": cfg.iterations, "target": target}}
    raise LetheError(f"mitigate: unknown inference-time variant '{variant}' (memattn, wen_inference)")


def holdout_magnitude(path: Path = Path("metrics/detect.json")) -> float:
    """Wen's target by default: the mean first-step magnitude of holdout prompts, as `detect` measured it."""
    if not path.exists():
        raise LetheError(f"{path}: not found; run `dvc repro detect` or set wen_inference.target")
    return json.loads(path.read_text())["detection/wen_first/mean/holdout"]


def mitigate(params: Params, variant: str) -> dict:
    settings = inference_settings(params, variant)
    model = load_model(BASELINE)
    model.spec["inference"] = settings
    with atomic_dir(Path("models") / variant) as tmp:
        save_model(model, tmp, method=variant)
    write_json(Path("metrics/train") / f"{variant}.json", baseline_costs())
    return {"variant": variant, **settings}


def baseline_costs(path: Path = Path("metrics/train/baseline.json")) -> dict[str, float]:
    """The baseline's training costs: what a variant built from its weights cost to train."""
    costs = json.loads(path.read_text()) if path.exists() else {}
    return {k: v for k, v in costs.items() if k.startswith("cost/")}
