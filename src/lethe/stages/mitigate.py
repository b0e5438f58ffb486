"""`lethe mitigate <variant>`: the baseline with an inference-time mitigation packaged in its config.

The weights are the baseline's; `config.json` gains the mitigation's settings under `inference`, which
`lethe.sampling.generate` applies wherever the model is loaded (evaluation, the registered pyfunc).
The variant's training cost is the baseline's.
"""

from __future__ import annotations

from lethe.config import Params
from lethe.errors import LetheError
from lethe.files import atomic_dir, baseline_costs, write_json
from lethe.methods import MITIGATE, inference_mitigation
from lethe.models.diffusion_model import load_model, save_model
from lethe.paths import BASELINE, model_dir, train_metrics_file


def mitigate(params: Params, variant: str) -> dict:
    if variant not in MITIGATE:
        raise LetheError(f"mitigate: '{variant}' is not packaged by this stage (these are: {', '.join(MITIGATE)})")
    settings = inference_mitigation(variant).settings(params)
    model = load_model(BASELINE)
    model.spec.inference = {variant: settings}
    with atomic_dir(model_dir(variant)) as tmp:
        save_model(model, tmp, method=variant)
    write_json(train_metrics_file(variant), baseline_costs())
    return {"variant": variant, variant: settings}
