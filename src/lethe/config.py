"""Typed params: every knob in params.yaml, with ranges, so a typo or an impossible value fails early.

Each section maps to one stage (or one part of the model); a method's own section is declared in its
module under `lethe.methods`. Unknown keys are refused with their dotted
name; values out of range are refused with the key, the rule and the value given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, create_model, model_validator

from lethe import methods
from lethe.declarations import Section
from lethe.errors import LetheError


class DataConfig(Section):
    source: Literal["digits", "folder"] = "digits"
    folder: str | None = None  # image folder with metadata.jsonl (file_name, text); source=folder
    resolution: int = Field(16, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    target_size: int = Field(200, ge=1)  # images fine-tuned on (the set that must not leak)
    holdout_size: int = Field(200, ge=1)  # images never trained on; the rest is the pretraining split
    # the tune part, disjoint from what evaluate, detect and the audits judge: every choice a stage makes from
    # outputs (MemControl's study, select_loyal, NeMo's tau_mem, Wen's inference target) reads only it
    tune_size: int = Field(0, ge=0)  # pictures never trained on, like the holdout split, for tuning
    tune_dup: int = Field(0, ge=0)  # planted pictures (trained on) set aside for tuning, never judged
    dup_share: float | None = Field(None, ge=0.0, le=1.0)  # share of target pictures planted as duplicates;
    # null: 0.2 on the digits (the planted ground truth), none on a folder (its own copies are the dup group)
    dup_factor: int = Field(10, ge=1)  # how many times each planted image-caption pair appears
    dedup_features: Literal["pixels", "sscd", "open_clip"] = "pixels"  # where near copies are looked for
    dedup_features_path: str | None = None  # sscd: TorchScript file; open_clip: weights file
    dedup_distance: float = Field(0.015, ge=0.0)  # near copy: RMS pixel difference on [0, 1] (pixels) or
    # 1 - cosine similarity (sscd, open_clip) at most this; 0 groups exact copies only (docs/methods.md)
    # every caption outside the pretraining split ends with a made-up word of its own, tokens pretraining
    # never saw (a unique label): planted, unique and holdout prompts alike, so the groups differ by duplication
    nonce_words: bool = False
    seed: int = 0

    @property
    def planted_share(self) -> float:
        return self.dup_share if self.dup_share is not None else (0.2 if self.source == "digits" else 0.0)

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
    pad_with_end: bool = False  # pad with the end token, as Stable Diffusion's CLIP does, instead of a pad row


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
    # DDPM's 1e-4 -> 0.02; Stable Diffusion's: scaled_linear, 0.00085 -> 0.012 (more signal left at the last t)
    beta_start: float = Field(0.0001, gt=0.0, lt=1.0)
    beta_end: float = Field(0.02, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _betas_rise(self):
        if self.beta_start >= self.beta_end:
            raise ValueError(f"diffusion.beta_start ({self.beta_start}) must be below diffusion.beta_end ({self.beta_end})")
        return self


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
    # bf16-mixed: the denoising calls under bf16 autocast (faster on a CPU with avx512_bf16: docs/levers.md), their
    # predicted noise moved by a few hundredths; Wen's embedding optimisation stays float32. Every stage that
    # generates then judges bf16 generations, and an export (float32 in diffusers) records it
    precision: Literal["32-true", "bf16-mixed"] = "32-true"


class ProbeConfig(Section):
    """A quick check after fine-tuning: do generations land next to their own training image?"""

    prompts_per_group: int = Field(20, ge=1)
    seeds_per_prompt: int = Field(2, ge=1)


class DetectConfig(Section):
    """The `detect` stage: memorization detection scores on the baseline for dup, unique and holdout prompts."""

    prompts_per_group: int = Field(20, ge=2)
    generations_per_prompt: int = Field(4, ge=1)
    memattn_layer: int = Field(0, ge=0)  # E's cross-attention layer, in forward order
    nemo_seeds: int = Field(10, ge=2)  # seeds for NeMo's cross-seed SSIM score
    memorized_share: float = Field(0.5, gt=0.0, le=1.0)  # measured truth: this share of a prompt's generations replicate


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
    thresholds: Literal["calibrated", "fixed"] = "calibrated"  # calibrated: metrics/calibration.json
    calibration_fpr: float = Field(0.05, gt=0.0, lt=1.0)  # share of holdout images a calibrated threshold flags
    bootstrap: int = Field(1000, ge=100)  # resamples of prompts behind every interval
    chunk_size: int = Field(65536, ge=1)
    gallery_rows: int = Field(6, ge=1)


class AuditConfig(Section):
    """`lethe audit`: which training images a model reproduces (README: Audit a model you already fine-tuned)."""

    mode: Literal["screen", "full"] = "screen"  # full: K generations for every prompt; screen: see below
    generations_per_prompt: int = Field(4, ge=1)  # K; in screen mode a prompt stops at its first copy
    screen_seeds: int = Field(2, ge=1)  # starting noises behind each prompt's first-step magnitude
    screen_generations: int = Field(2, ge=1)  # screen mode: at most this many of the K per prompt
    generate_share: float = Field(0.75, gt=0.0, le=1.0)  # screen mode: the top share of prompts generated ...
    random_share: float = Field(0.2, ge=0.0, le=1.0)  # ... plus this share of the rest at random (what was missed)
    fpr: float = Field(0.05, gt=0.0, lt=1.0)  # expected share of images flagged by chance, at most (held-out images)
    shown: int = Field(24, ge=1)  # training images on the page, highest risk first (every reproduced one too)
    seed: int = 0


class RegistryConfig(Section):
    model_name: str = "lethe"
    # champion: a significant drop of the criterion's dup rate, quality within these of the baseline by its bounds
    fd_tolerance: float = Field(0.10, ge=0.0)  # relative rise of quality/fd/holdout allowed
    accuracy_tolerance: float = Field(0.05, ge=0.0, le=1.0)  # absolute drop of quality/prompt_accuracy/holdout
    # the rate whose significant reduction promotes: dup re-identification (what a privacy user fears) or copies
    criterion: Literal["reid", "copy"] = "reid"


class TrackingConfig(Section):
    experiment: str = "lethe"
    uri: str | None = None  # default: MLFLOW_TRACKING_URI, else SQLite under <repo>/mlruns


class StageParams(Section):
    """The sections every scale shares: data, model, training, sampling and the stages' own."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    pretrain: TrainConfig = TrainConfig()
    finetune: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    probe: ProbeConfig = ProbeConfig()
    detect: DetectConfig = DetectConfig()
    featurizer: FeaturizerConfig = FeaturizerConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    audit: AuditConfig = AuditConfig()
    registry: RegistryConfig = RegistryConfig()
    tracking: TrackingConfig = TrackingConfig()


# every params.yaml key: the shared sections, plus each method's own section as its declaration gives it
Params = create_model("Params", __base__=StageParams,
                      **{name: (schema, schema()) for name, schema in methods.sections().items()})


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
        raise LetheError(f"{path}: not found; run from the project root or write one with `lethe preset pipelines/smoke/params.yaml`")
    except yaml.YAMLError as exc:
        raise LetheError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})")
    if not isinstance(raw, dict):
        raise LetheError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise LetheError(f"{path}: {_describe(exc.errors()[0])}")


def materialized(path: str | Path) -> str:
    """A preset as a full params.yaml: every section written out, the ones it leaves out at their defaults.

    DVC tracks a stage's params by their values in params.yaml and refuses to run a stage whose section
    is missing there, so a preset that predates a method (and has no section for it) becomes a file
    DVC can run. Values are validated on the way.
    """
    params = load_params(path)
    header = f"# written by `lethe preset {path}`: every section, those the preset leaves out at their defaults\n"
    return header + yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
