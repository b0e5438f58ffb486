"""A lethe model in diffusers' own formats: a Stable Diffusion pipeline directory that diffusers alone loads.

The directory is what `StableDiffusionPipeline.save_pretrained` writes (U-Net, CLIP text encoder and
tokenizer, VAE, and a DDIM scheduler built as lethe's sampler builds it), plus:
- for a LoRA (MemControl's `lora` family), `pytorch_lora_weights.safetensors` in diffusers' layout beside
  the base U-Net, for `pipe.load_lora_weights(DIR)`; the factors are recovered from the difference
  between the fine-tuned and the base weights, which training left at rank r (MemControl merges its
  adapters into the weights it saves);
- for an inference-time mitigation, or a scheduler that the stock class would rewrite (`steps_offset` other
  than 1, `clip_sample` on: it "corrects" both on construction), `pipeline.py`
  (`lethe.inference.exported_pipeline` with lethe's functions copied in) named by model_index.json, so
  diffusers builds a pipeline that samples as lethe does, and a plain
  `StableDiffusionPipeline.from_pretrained` refuses the directory instead of dropping the difference.

What a stock pipeline cannot express is refused (`refusal`), never exported without it.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from lethe.models.diffusion_model import DiffusionModel
from lethe.training.peft_masks import Mask, projections

PIPELINE_FILE, PIPELINE_CLASS = "pipeline.py", "LetheMitigatedPipeline"
LORA_FILE = "pytorch_lora_weights.safetensors"
RECORD = "lethe.json"
# a recovered LoRA must reproduce the weight change to this relative error, or the change was not rank r
LORA_TOLERANCE = 1e-4


def refusal(model: DiffusionModel, variant: str) -> str | None:
    """Why `model` cannot leave lethe as a diffusers pipeline, in one line; None when it can."""
    from lethe.inference.exported_pipeline import KNOWN

    if model.vae is None:
        return (f"{variant}: embedded models are not exported: their pixel-space U-Net is conditioned by lethe's "
                "own small text encoder (a corpus-specific vocabulary), which no diffusers pipeline loads, and a "
                "StableDiffusionPipeline needs a CLIP text encoder and a VAE; export a Stable Diffusion (latent) model")
    if model.spec.raunet is not None:
        split = f" and its timestep split at tau = {model.spec.raunet['tau']}" if model.spec.raunet["tau"] else ""
        return (f"{variant}: RAU-Net (LoyalDiffusion) is not exported: its transfer blocks on the U-Net's skip "
                f"connections{split} are not part of a stock UNet2DConditionModel, and a pipeline without them "
                "would silently drop the mitigation")
    unknown = sorted(set(model.spec.inference) - set(KNOWN))
    if unknown:
        return f"{variant}: the inference-time mitigation {', '.join(unknown)} has no diffusers form in lethe's export"
    return None


def stock_rewrites(scheduler) -> dict:
    """The scheduler settings a stock StableDiffusionPipeline would change on loading, with lethe's values."""
    config = scheduler.config
    changed = {"steps_offset": config.get("steps_offset", 1), "clip_sample": config.get("clip_sample", False)}
    return {k: v for k, v in changed.items() if v != {"steps_offset": 1, "clip_sample": False}[k]}


def pipeline_source() -> str:
    """`lethe.inference.exported_pipeline` with its lethe imports replaced by the functions' own source."""
    from lethe.inference import exported_pipeline as template

    head, rest = inspect.getsource(template).split("# lethe code: begin\n")
    _, tail = rest.split("# lethe code: end\n")
    copied = "\n\n".join(inspect.getsource(obj) for obj in template.LETHE_CODE)
    return f"{head}# copied from lethe's source by `lethe export`\n{copied}\n\n{tail}"


def recovered_lora(unet, base_unet, mask: Mask) -> dict[str, torch.Tensor]:
    """The LoRA (diffusers' layout, scale 1) whose fusion into `base_unet` gives `unet`; ValueError where the
    change is not a rank-r LoRA on the mask's projections."""
    import copy

    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    targets = projections(base_unet, mask.blocks)
    tuned, base = unet.state_dict(), base_unet.state_dict()
    changed = [k for k in base if not torch.equal(tuned[k], base[k]) and k.removesuffix(".weight") not in targets]
    if changed:
        raise ValueError(f"weights outside the LoRA's projections differ from the base ({changed[:2]})")
    adapted = copy.deepcopy(base_unet)
    adapted.add_adapter(LoraConfig(r=mask.lora_rank, lora_alpha=mask.lora_rank, target_modules=targets))
    with torch.no_grad():
        for name in targets:
            delta = (tuned[f"{name}.weight"] - base[f"{name}.weight"]).double()
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            root = s[: mask.lora_rank].sqrt()
            down, up = root[:, None] * vh[: mask.lora_rank], u[:, : mask.lora_rank] * root
            if (up @ down - delta).norm() > LORA_TOLERANCE * max(delta.norm().item(), 1e-12):
                raise ValueError(f"{name}: the weight change is not of rank {mask.lora_rank}")
            layer = adapted.get_submodule(name)
            layer.lora_A["default"].weight.copy_(down.float())
            layer.lora_B["default"].weight.copy_(up.float())
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(adapted))


def save_pipeline(model: DiffusionModel, scheduler, folder: Path, unet=None, lora: dict | None = None) -> None:
    """Write the model into `folder` in diffusers' formats; `unet` replaces the model's (a LoRA's base)."""
    from diffusers import StableDiffusionPipeline

    copy = type(scheduler).from_config(scheduler.config)  # the stock class rewrites the one it is given
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder.model,
                                   tokenizer=model.text_encoder.tokenizer, unet=unet or model.unet, scheduler=copy,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")  # as lethe samples
    if model.spec.inference or stock_rewrites(scheduler):
        index_file = folder / "model_index.json"
        index = json.loads(index_file.read_text())
        # a [module, class] pair: diffusers loads the class from pipeline.py beside it (trust_remote_code=True)
        index["_class_name"] = [PIPELINE_FILE.removesuffix(".py"), PIPELINE_CLASS]
        index["mitigations"] = model.spec.inference
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (folder / PIPELINE_FILE).write_text(pipeline_source())
    if lora is not None:
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=lora, safe_serialization=True)
