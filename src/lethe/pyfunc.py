"""The packaged model: an MLflow pyfunc that turns prompts (and optional seeds) into images.

What the registry holds is the model users would deploy: its weights, its sampler settings and (as
later methods add them) its inference-time mitigations, all inside the package. `predict` takes a
DataFrame with a `prompt` column and an optional `seed` column and returns uint8 images, N x H x W x C.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec


class TextToImage(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from lethe.config import DiffusionConfig, SampleConfig
        from lethe.devices import inference_device
        from lethe.models.diffusion_model import build_scheduler, load_model

        self.model = load_model(context.artifacts["model"]).to(inference_device())
        self.scheduler = build_scheduler(self.model, DiffusionConfig(**context.model_config["diffusion"]))
        self.sample = SampleConfig(**context.model_config["sample"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        from lethe.data.prepared import to_uint8
        from lethe.sampling import generate

        prompts = [str(p) for p in model_input["prompt"]]
        if "seed" in model_input and not model_input["seed"].isna().any():
            seeds = [int(s) for s in model_input["seed"]]
        else:
            seeds = list(range(len(prompts)))
        return to_uint8(generate(self.model, self.scheduler, prompts, seeds, self.sample)).transpose(0, 2, 3, 1)


def signature(channels: int, resolution: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, resolution, resolution, channels))]),
    )


def requirements() -> list[str]:
    """lethe's own pins, so MLflow need not infer them by loading the model in a subprocess."""
    return [r for r in importlib.metadata.requires("lethe") or [] if "extra ==" not in r]


def log_pyfunc(name: str, model_dir: Path, params, registered_model_name: str):
    """Log the packaged model under the active run and register it as a new version."""
    import lethe

    spec = json.loads((model_dir / "config.json").read_text())
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=TextToImage(),
        artifacts={"model": str(model_dir)},
        code_paths=[str(Path(lethe.__file__).parent)],
        model_config={"diffusion": params.diffusion.model_dump(mode="json"), "sample": params.sample.model_dump(mode="json")},
        signature=signature(spec["channels"], spec["resolution"]),
        pip_requirements=requirements(),
        registered_model_name=registered_model_name,
    )
