"""The diffusers pipeline `lethe export` writes beside a mitigated model's weights, as `pipeline.py`.

A `StableDiffusionPipeline` that samples as `lethe.sampling.generate` does. It keeps the scheduler as
saved (the stock class rewrites a config with `steps_offset` other than 1 or `clip_sample` on, which some
checkpoints' and lethe's DDIM settings have), and applies lethe's inference-time mitigations, named in
model_index.json's `mitigations` (name -> settings):
- `wen_inference`: the prompt embedding is optimised at the first step, from the same starting noise,
  before the ordinary sampling loop runs on it;
- `memattn`: every cross-attention layer gets lethe's attention processor (`set_attn_processor`), which
  masks the padding and scales the beginning token's logit on the conditional branch.

The written file needs only torch and diffusers: the exporter (`lethe.export`) replaces the import block
between the two markers below with the source of those lethe functions, so the exported model runs
lethe's own code. A mitigation this file does not know stops the pipeline's construction.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F  # noqa: F401  (the attention processor's source uses it)
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention  # noqa: F401  (idem)
from diffusers.utils.torch_utils import randn_tensor

# lethe code: begin
from lethe.diffusion import noise_magnitude  # noqa: F401  (optimise_prompt_embedding's source calls it)
from lethe.inference.memattn import memattn_steering, through_first_end
from lethe.inference.prompt_embedding import optimise_prompt_embedding
from lethe.memorization.attention import AttentionControl, CrossAttentionProcessor, cross_attention_layers
from lethe.models.diffusion_model import in_forward_order

LETHE_CODE = (noise_magnitude, through_first_end, memattn_steering, optimise_prompt_embedding, AttentionControl,
              CrossAttentionProcessor, in_forward_order, cross_attention_layers)
# lethe code: end

KNOWN = ("memattn", "wen_inference")
REWRITTEN = ("steps_offset", "clip_sample")  # scheduler settings StableDiffusionPipeline.__init__ overrides


class LetheMitigatedPipeline(StableDiffusionPipeline):
    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                 image_encoder=None, requires_safety_checker: bool = True, mitigations: dict | None = None):
        saved = {key: scheduler.config[key] for key in REWRITTEN if key in scheduler.config}
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder, requires_safety_checker)
        scheduler.register_to_config(**saved)  # the sampler lethe ran, not the stock class's correction
        mitigations = dict(mitigations or {})
        unknown = sorted(set(mitigations) - set(KNOWN))
        if unknown:  # never sample without a mitigation the model was exported with
            raise ValueError(f"this pipeline file cannot apply the mitigations {unknown} (it knows {KNOWN})")
        self.register_to_config(mitigations=mitigations)
        self.control = None
        if "memattn" in mitigations:
            layers = cross_attention_layers(unet)
            self.control = AttentionControl(list(layers))
            unet.set_attn_processor({
                key: CrossAttentionProcessor(self.control, key.removesuffix(".processor"))
                if key.removesuffix(".processor") in layers else processor
                for key, processor in unet.attn_processors.items()
            })

    def __call__(self, prompt, *, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 num_images_per_prompt: int = 1, generator=None, latents=None, **kwargs):
        """StableDiffusionPipeline's call for text prompts, with the mitigations applied; the empty prompt is
        the unconditional branch, as in lethe's sampler."""
        settings = self.config.mitigations
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = self._execution_device
        with torch.no_grad():
            cond, uncond = self.encode_prompt(prompts, device, num_images_per_prompt, True)
        if latents is None:  # drawn here, as the parent would, because Wen's optimisation starts from them
            size = self.unet.config.sample_size
            shape = (len(cond), self.unet.config.in_channels, size, size)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=cond.dtype)
        if "wen_inference" in settings:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            t0 = self.scheduler.timesteps[0]
            x = self.scheduler.scale_model_input(latents.to(device) * self.scheduler.init_noise_sigma, t0)
            cond = optimise_prompt_embedding(self.unet, t0, x, cond, uncond[:1], **settings["wen_inference"])
        steering = contextlib.nullcontext()
        if self.control is not None:
            if guidance_scale <= 1:  # without guidance there is no conditional branch to steer apart
                raise ValueError("MemAttn steers the conditional branch of classifier-free guidance: guidance_scale must be > 1")
            ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            steering = memattn_steering(self.control, ids.repeat_interleave(num_images_per_prompt, 0),
                                        self.tokenizer.eos_token_id, settings["memattn"])
        with steering:
            return super().__call__(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents,
                                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                    generator=generator, num_images_per_prompt=1, **kwargs)
