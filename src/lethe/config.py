"""Typed params: every knob in params.yaml, with ranges, so a typo or an impossible value fails early.

Each section maps to one stage (or one part of the model). Unknown keys are refused with their dotted
name; values out of range are refused with the key, the rule and the value given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lethe.errors import LetheError

# fine-tuning methods, each a `train@<method>` stage
METHODS = ("baseline", "loyal", "raunet", "ietagc", "ietagc_plus", "wen_filter", "random_caption", "memattn_filter",
           "memcontrol")
# inference-time mitigations of the baseline: `mitigate@memattn`, `mitigate@wen_inference`, and `localize` (nemo)
INFERENCE_VARIANTS = ("memattn", "wen_inference", "nemo")
VARIANTS = METHODS + INFERENCE_VARIANTS  # what evaluate, report and register accept


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    source: Literal["digits", "folder"] = "digits"
    folder: str | None = None  # image folder with metadata.jsonl (file_name, text); source=folder
    resolution: int = Field(16, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    target_size: int = Field(200, ge=1)  # images fine-tuned on (the set that must not leak)
    holdout_size: int = Field(200, ge=1)  # images never trained on; the rest is the pretraining split
    dup_share: float = Field(0.1, ge=0.0, le=1.0)  # share of target images planted as duplicates
    dup_factor: int = Field(10, ge=1)  # how many times each planted image-caption pair appears
    seed: int = 0

    @model_validator(mode="after")
    def _folder_needs_path(self):
        if self.source == "folder" and not self.folder:
            raise ValueError("data.source is 'folder' but data.folder is not set")
        return self


class UNetConfig(Section):
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(8, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")

    @model_validator(mode="after")
    def _one_block_type_per_level(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("model.unet: down_block_types and up_block_types need one entry per block_out_channels")
        return self


class TextConfig(Section):
    # width is also the U-Net's cross-attention dimension
    width: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    context_length: int = Field(24, ge=4, le=77)


class ModelConfig(Section):
    kind: Literal["pixel", "latent"] = "pixel"
    pretrained_path: str | None = None  # latent: a local diffusers Stable Diffusion directory
    unet: UNetConfig = UNetConfig()
    text: TextConfig = TextConfig()

    @model_validator(mode="after")
    def _latent_needs_path(self):
        if self.kind == "latent" and not self.pretrained_path:
            raise ValueError("model.kind is 'latent' but model.pretrained_path is not set")
        return self


class DiffusionConfig(Section):
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"


class TrainConfig(Section):
    steps: int = Field(600, ge=0)  # 0: no training (pretrain at SD scale: the checkpoint is the base model)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, le=1.0)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0)  # empty caption, for classifier-free guidance
    ema_decay: float = Field(0.995, ge=0.0, lt=1.0)
    train_text_encoder: bool = True
    checkpoint_every: int = Field(100, ge=1)
    accelerator: str = "auto"
    devices: int | str = "auto"  # per node; batch_size is the global batch, split evenly over devices x num_nodes
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"  # Lightning's: auto, ddp, ddp_find_unused_parameters_true, fsdp, ...
    precision: str = "32-true"  # or 16-mixed, bf16-mixed
    gradient_checkpointing: bool = False  # recompute U-Net activations in backward: less memory, ~30% slower
    seed: int = 0

    @model_validator(mode="after")
    def _scale_out(self):
        if isinstance(self.devices, int) and self.batch_size % (self.devices * self.num_nodes):
            raise ValueError(f"batch_size {self.batch_size} is the global batch and must divide evenly over "
                             f"devices x num_nodes = {self.devices * self.num_nodes}")
        if self.strategy.startswith("fsdp") and self.ema_decay > 0:
            raise ValueError("strategy fsdp shards the weights and Lightning's EMA cannot average sharded models: "
                             "set ema_decay: 0")
        return self


class SampleConfig(Section):
    steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(1.5, ge=0.0)
    batch_size: int = Field(128, ge=1)
    grid_size: int = Field(16, ge=1)  # images in the sample grid logged after training


class ProbeConfig(Section):
    """A quick check after fine-tuning: do generations land next to their own training image?"""

    prompts_per_group: int = Field(20, ge=1)
    seeds_per_prompt: int = Field(2, ge=1)


class LoyalConfig(Section):
    """LoyalDiffusion: transfer blocks on the skips of the chosen up-block levels (0 = deepest)."""

    block: Literal["conv", "conv_silu", "conv_stack", "pool", "drop"] = "conv"
    levels: tuple[int, ...] = (0, 1)  # the public configuration: the two deepest levels
    tau: int = Field(500, ge=1)  # RAU-Net for t >= tau, the standard U-Net below (train@raunet: every t)
    init: Literal["random", "identity"] = "random"  # identity: the RAU-Net starts as the U-Net


class IetConfig(Section):
    """IET-AGC: K proxies on K shards, anti-gradient control, weighted averaging after each round."""

    shards: int = Field(4, ge=2)
    local_steps: int = Field(25, ge=1)  # steps each proxy takes per round
    agc_lambda: float = Field(2.0, gt=0.0)  # keep a sample iff lambda * loss >= bank[t]
    bank_momentum: float = Field(0.8, ge=0.0, lt=1.0)
    seed: int = 0


class IetPlusConfig(Section):
    """IET-AGC+ on top of ietagc: memory-sample redistribution and threshold-aware augmentation."""

    msr_share: float = Field(0.25, gt=0.0, le=1.0)  # most-skipped share handed to the next shard
    taa_max_shift: int = Field(2, ge=0)  # augmentation: translation by up to this many pixels


class WenFilterConfig(Section):
    factor: float = Field(1.5, gt=0.0)  # drop a sample whose noise magnitude > factor x the running one at its t
    momentum: float = Field(0.8, ge=0.0, lt=1.0)


class RandomCaptionConfig(Section):
    words: int = Field(2, ge=1)  # random caption words added to a caption when it is drawn
    probability: float = Field(1.0, ge=0.0, le=1.0)
    seed: int = 0


class MemAttnFilterConfig(Section):
    """MemAttn's training-time filter: skip samples whose cross-attention entropy is abnormally high."""

    layer: int = Field(0, ge=0)  # cross-attention layer whose entropy is read, in forward order
    z: float = Field(2.0, gt=0.0)  # skip when entropy > running mean + z x running std (not published)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    timestep_bins: int = Field(10, ge=1)  # running statistics per range of timesteps (entropy falls with t)


class DetectConfig(Section):
    """The `detect` stage: memorization detection scores on the baseline for dup, unique and holdout prompts."""

    prompts_per_group: int = Field(20, ge=2)
    generations_per_prompt: int = Field(4, ge=1)
    memattn_layer: int = Field(0, ge=0)  # E's cross-attention layer, in forward order
    nemo_seeds: int = Field(10, ge=2)  # seeds for NeMo's cross-seed SSIM score
    memorized_share: float = Field(0.5, gt=0.0, le=1.0)  # measured truth: this share of a prompt's generations replicate


class MemAttnConfig(Section):
    """MemAttn's inference-time mitigation (evaluate@memattn): mask the padding, scale the beginning token."""

    begin_scale: float = Field(1.25, ge=1.0)  # C: the beginning token's logit is multiplied by this
    mask_padding: bool = True  # mask the tokens after the first end token


class WenInferenceConfig(Section):
    """Wen et al.'s prompt-embedding optimisation at the first step (evaluate@wen_inference)."""

    lr: float = Field(0.05, gt=0.0)
    iterations: int = Field(10, ge=1)
    target: float | None = Field(None, gt=0.0)  # stop below this magnitude; null: holdout prompts' mean from detect ...
    target_fraction: float = Field(1.0, gt=0.0, le=1.0)  # ... times this (below 1: push memorized prompts further)


class NemoConfig(Section):
    """NeMo's neuron localization (the `localize` stage and evaluate@nemo)."""

    holdout_prompts: int = Field(50, ge=3)  # activation statistics and tau_mem come from these
    max_prompts: int = Field(20, ge=1)  # target prompts scored; those above tau_mem are localized
    seeds: int = Field(10, ge=2)
    iterations: int = Field(30, ge=1)  # initial selection: theta and k steps tried at most
    batch_size: int = Field(32, ge=1)  # candidate neuron sets scored in one forward pass


class MemControlConfig(Section):
    """MemControl (Dutt et al.): an Optuna search over which transformer blocks' PEFT parameters to fine-tune."""

    family: Literal["lora", "attention", "difffit"] = "lora"  # what a 1-bit block trains
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float = Field(4.0, gt=0.0)
    lr_min: float = Field(1e-5, gt=0.0, le=1.0)  # learning rate, log-uniform (published: 1e-5 to 1e-3)
    lr_max: float = Field(1e-3, gt=0.0, le=1.0)
    n_trials: int = Field(12, ge=1)  # completed trials the study needs; more resumes the same study
    population_size: int = Field(4, ge=2)  # NSGA-II's generation size
    trial_steps: int = Field(100, ge=1)  # inner-loop budget: steps of finetune.batch_size per trial
    memorization: Literal["max", "mean"] = "max"  # over the memorization subset's images
    magnitude_draws: int = Field(8, ge=1)  # random timesteps per memorized image
    fd_prompts: int = Field(100, ge=2)  # holdout prompts generated (one seed each) for the FD objective
    sample_steps: int = Field(20, ge=1, le=1000)  # DDIM steps of those generations
    fd_reference: Literal["full", "best"] = "full"  # policy: FD of full fine-tuning, or the best trial's
    fd_tolerance: float = Field(0.1, ge=0.0)  # policy: relative FD rise allowed over the reference
    accuracy_tolerance: float = Field(0.05, ge=0.0, le=1.0)  # policy: prompt accuracy drop allowed below full fine-tuning's
    max_trainable_share: float = Field(1.0, gt=0.0, le=1.0)  # policy: masks training more are not chosen
    storage: str | None = None  # an RDB URL shared by machines; default: a journal file under search/studies
    workers: int = Field(1, ge=1)  # processes sharing the study on this machine (`--workers` overrides)
    seed: int = 0

    @model_validator(mode="after")
    def _lr_range(self):
        if self.lr_min > self.lr_max:
            raise ValueError(f"memcontrol.lr_min ({self.lr_min}) is above memcontrol.lr_max ({self.lr_max})")
        return self


class FeaturizerConfig(Section):
    steps: int = Field(400, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0, le=1.0)
    feature_dim: int = Field(32, ge=2)  # small, so FD's covariances are estimable from a few hundred images
    seed: int = 0


class EvaluateConfig(Section):
    prompts_per_group: int = Field(20, ge=2)
    generations_per_prompt: int = Field(4, ge=1)
    features: Literal["pixels", "featurizer", "sscd", "open_clip"] = "featurizer"  # for top-1 similarity
    features_path: str | None = None  # sscd: a TorchScript file; open_clip: a weights file
    open_clip_model: str = "ViT-B-32"  # architecture of the open_clip weights (features_path, clip_model_path)
    clip_model_path: str | None = None  # open_clip weights file: quality/clip_score (cosine x 100, clipped at 0)
    criterion: Literal["sim", "nn_ratio", "rel_l2"] = "rel_l2"  # which criterion decides replication/rate
    sim_threshold: float = Field(0.5, ge=-1.0, le=1.0)
    nn_ratio: float = Field(1 / 3, gt=0.0, le=1.0)
    rel_l2_n: int = Field(50, ge=2)
    rel_l2_threshold: float = Field(0.5, gt=0.0, le=1.0)
    chunk_size: int = Field(65536, ge=1)
    gallery_rows: int = Field(6, ge=1)


class RegistryConfig(Section):
    model_name: str = "lethe"
    # champion: the lowest dup replication rate among versions whose quality stays within these of the baseline
    fd_tolerance: float = Field(0.10, ge=0.0)  # relative rise of quality/fd/holdout allowed
    accuracy_tolerance: float = Field(0.05, ge=0.0, le=1.0)  # absolute drop of quality/prompt_accuracy/holdout


class TrackingConfig(Section):
    experiment: str = "lethe"
    uri: str | None = None  # default: MLFLOW_TRACKING_URI, else SQLite under <repo>/mlruns


class Params(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    pretrain: TrainConfig = TrainConfig()
    finetune: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    probe: ProbeConfig = ProbeConfig()
    loyal: LoyalConfig = LoyalConfig()
    ietagc: IetConfig = IetConfig()
    ietagc_plus: IetPlusConfig = IetPlusConfig()
    wen_filter: WenFilterConfig = WenFilterConfig()
    random_caption: RandomCaptionConfig = RandomCaptionConfig()
    memattn_filter: MemAttnFilterConfig = MemAttnFilterConfig()
    detect: DetectConfig = DetectConfig()
    memattn: MemAttnConfig = MemAttnConfig()
    wen_inference: WenInferenceConfig = WenInferenceConfig()
    nemo: NemoConfig = NemoConfig()
    memcontrol: MemControlConfig = MemControlConfig()
    featurizer: FeaturizerConfig = FeaturizerConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    tracking: TrackingConfig = TrackingConfig()
    variants: tuple[str, ...] = ("baseline",)  # models evaluated, reported and registered

    @model_validator(mode="after")
    def _known_variants(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"variants: unknown variant {unknown[0]!r} (known: {', '.join(VARIANTS)})")
        return self


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if not key:  # a model-level validator: its message already names the keys
        return error["msg"].removeprefix("Value error, ")
    return f"'{key}': {error['msg'].removeprefix('Value error, ')} (got {error.get('input')!r})"


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params; raise LetheError with one line naming the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise LetheError(f"{path}: not found; run from the project root or copy a preset from pipelines/")
    except yaml.YAMLError as exc:
        raise LetheError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})")
    if not isinstance(raw, dict):
        raise LetheError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise LetheError(f"{path}: {_describe(exc.errors()[0])}")
