"""What the evaluation measures with: the training set a generation may copy, the feature spaces of
replication and quality, FD and diversity. The `evaluate`, `detect` stages and MemControl's objective
share them.

Replication is measured against every image the variant was trained on (pretraining and target
splits); quality against the holdout images, which no model saw.

torchmetrics is imported where FD and KID are computed, not here: its import loads torchvision's models
and torch._dynamo (about 5 s), which the stages that only score replication (calibrate) never use.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lethe.cache import cached_tensor
from lethe.config import EvaluateConfig
from lethe.data.prepared import PreparedData
from lethe.devices import inference_device
from lethe.errors import LetheError
from lethe.evaluation.featurizer import Featurizer, has_featurizer, load_featurizer
from lethe.memorization.features import load_features
from lethe.memorization.replication import Criteria, own_relative_l2, reidentified, replication_scores
from lethe.files import content_hash, fingerprint
from lethe.paths import CALIBRATION, FEATURES, FEATURIZER


def criteria(cfg: EvaluateConfig, calibrated: bool = True) -> Criteria:
    """The replication criteria: thresholds from `metrics/calibration.json` (the calibrate stage) when
    `evaluate.thresholds` is calibrated, else the fixed ones in params."""
    fixed = Criteria(cfg.sim_threshold, cfg.nn_ratio, cfg.rel_l2_n, cfg.rel_l2_threshold, cfg.criterion,
                     cfg.chunk_size, published_nn_ratio=cfg.nn_ratio)
    if not calibrated or cfg.thresholds == "fixed":
        return fixed
    if not CALIBRATION.exists():
        raise LetheError(f"{CALIBRATION}: no calibration; run `dvc repro calibrate` first "
                         "(or set evaluate.thresholds: fixed)")
    c = json.loads(CALIBRATION.read_text())
    return replace(fixed, sim_threshold=c["calibration/sim/threshold"], nn_ratio=c["calibration/nn_ratio/threshold"],
                   rel_l2_threshold=c["calibration/rel_l2/threshold"])


class FeatureSpace(torch.nn.Module):
    """Features (SSCD, open_clip, pixels) as the module torchmetrics' FD takes, feature size given up front."""

    def __init__(self, featurize: Callable[[torch.Tensor], torch.Tensor], dim: int):
        super().__init__()
        self.featurize, self.num_features = featurize, dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.featurize(images)


def frechet_distance(featurizer: Featurizer | FeatureSpace, real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    fd = FrechetInceptionDistance(feature=featurizer, reset_real_features=False)
    fd.update(real, real=True)
    fd.update(fake, real=False)
    return fd.compute().item()


class FeatureDistances:
    """FD and KID (torchmetrics, in the same feature space) of generated features against one fixed set of
    real features, for any subset of the generations: what the bootstrap over prompts needs."""

    def __init__(self, real: torch.Tensor, kid_subsets: int = 20):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.real, self.kid_subsets = real, kid_subsets
        self.fd = FrechetInceptionDistance(feature=FeatureSpace(lambda x: x, real.shape[1]), reset_real_features=False)
        self.fd.update(real, real=True)
        self._real_subsets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def frechet(self, fake: torch.Tensor) -> float:
        self.fd.reset()
        self.fd.update(fake, real=False)
        return self.fd.compute().item()

    @torch.no_grad()
    def kernel(self, fake: torch.Tensor) -> float:
        """KID: the unbiased MMD with torchmetrics' cubic kernel, averaged over `kid_subsets` subsets of the
        real features of the fakes' size, as KernelInceptionDistance computes it (every fake is in each
        subset when there are no more fakes than reals). The subsets are drawn once, from a fixed seed, so
        resampled prompts (intervals.py) are not blurred by fresh subset noise, and each subset's real-real
        kernel is summed once; a call costs one fake-fake and one real-fake kernel."""
        from torchmetrics.image.kid import poly_kernel

        m = len(fake)
        if m > len(self.real) or m < 2:
            return float("nan")
        subsets, real_sums = self._subsets(m)
        k_ff = poly_kernel(fake, fake)
        k_rf = poly_kernel(self.real, fake).sum(1)  # per real row, summed over the fakes
        fake_sum = k_ff.sum() - k_ff.diagonal().sum()
        values = (real_sums + fake_sum) / (m * (m - 1)) - 2 * k_rf[subsets].sum(1) / m**2
        return values.mean().item()

    def _subsets(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torchmetrics.image.kid import poly_kernel

        if m not in self._real_subsets:
            generator = torch.Generator().manual_seed(0)
            subsets = torch.stack([torch.randperm(len(self.real), generator=generator)[:m] for _ in range(self.kid_subsets)])
            sums = []
            for rows in subsets:
                k_rr = poly_kernel(self.real[rows], self.real[rows])
                sums.append(k_rr.sum() - k_rr.diagonal().sum())
            self._real_subsets[m] = (subsets, torch.stack(sums))
        return self._real_subsets[m]


@torch.no_grad()
def diversity(features: torch.Tensor, per_prompt: int) -> float:
    """1 - mean cosine similarity between generations of the same prompt (0: every seed gives one image)."""
    return prompt_diversity(features, per_prompt).mean().item()


@torch.no_grad()
def prompt_diversity(features: torch.Tensor, per_prompt: int) -> torch.Tensor:
    """`diversity` per prompt (NaN with one generation per prompt)."""
    if per_prompt < 2:
        return torch.full((len(features) // per_prompt,), float("nan"))
    f = F.normalize(features, dim=1).view(-1, per_prompt, features.shape[1])
    sim = f @ f.transpose(1, 2)
    off_diagonal = sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)
    return 1 - off_diagonal / (per_prompt * (per_prompt - 1))


# the tune part's generations start here: no seed of theirs is one evaluate or detect judges with
TUNE_SEEDS = 1_000_000


def generation_plan(captions: list[str], per_prompt: int, first_seed: int = 0) -> tuple[list[str], list[int]]:
    """Each caption `per_prompt` times, every generation its own seed. Seeds shared across prompts would
    make a prompt-blind model's group a few repeated images, and FD would score that collapse (150
    against 26 with distinct seeds, measured) instead of the images' quality. The tune part's plans start
    at TUNE_SEEDS."""
    prompts = [c for c in captions for _ in range(per_prompt)]
    return prompts, list(range(first_seed, first_seed + len(prompts)))


@dataclass
class TrainingSet:
    """Every image a variant was trained on (pretraining and target splits): what a generation may copy."""

    pixels: torch.Tensor
    features: torch.Tensor
    featurize: Callable[[torch.Tensor], torch.Tensor]
    criteria: Criteria

    @classmethod
    def load(cls, data: PreparedData, cfg: EvaluateConfig, calibrated: bool = True, cache: Path = FEATURES) -> "TrainingSet":
        """The training images and their features, computed once for every evaluate, detect, calibrate and
        select_loyal stage on the same images and feature extractor (`lethe.cache`)."""
        featurize = replication_features(cfg)
        pixels = data.tensor([r.id for r in data.records if r.split in ("pretrain", "target")])
        file = cache / f"{features_key(pixels, cfg)}.safetensors"
        return cls(pixels, cached_tensor(file, lambda: featurize(pixels)), featurize, criteria(cfg, calibrated))

    def replication(self, images: torch.Tensor, own: list[int] | None = None,
                    pictures: "Pictures | None" = None) -> dict[str, torch.Tensor]:
        """The replication scores of each image; with `own` (per image, the record id of the picture whose
        caption made its prompt) and `pictures`, also `reidentified` and `own_rel_l2` (replication.py)."""
        features = self.featurize(images)
        scores = replication_scores(features, self.features, images, self.pixels, self.criteria)
        if own is not None and pictures is not None:
            rows = pictures.rows(own)
            scores["reidentified"] = reidentified(features, pictures.features, rows, self.criteria.chunk_size)
            scores["own_rel_l2"] = own_relative_l2(images, pictures.pixels[rows], scores["rel_l2_scale"])
        return scores


@dataclass
class Pictures:
    """One image per target and per holdout picture (`PreparedData.pictures`, the prompts' own pictures) with
    its features in the replication feature space: the candidates re-identification chooses among."""

    ids: list[int]
    pixels: torch.Tensor
    features: torch.Tensor

    @classmethod
    def load(cls, data: PreparedData, training: TrainingSet, cfg: EvaluateConfig, cache: Path = FEATURES) -> "Pictures":
        ids = [r.id for split in ("target", "holdout") for r in data.pictures(split)]
        pixels = data.tensor(ids)
        file = cache / f"{features_key(pixels, cfg)}.safetensors"  # computed once, as the training set's
        return cls(ids, pixels, cached_tensor(file, lambda: training.featurize(pixels)))

    def rows(self, ids: list[int]) -> torch.Tensor:
        """The rows of these record ids (each a target or holdout picture)."""
        row = {id_: i for i, id_ in enumerate(self.ids)}
        missing = sorted({i for i in ids if i not in row})
        if missing:
            raise LetheError(f"records {missing[:5]} are not target or holdout pictures; their prompts have no own "
                             "picture to re-identify")
        return torch.tensor([row[i] for i in ids], dtype=torch.long)


def features_key(pixels: torch.Tensor, cfg: EvaluateConfig) -> str:
    """What the training set's features depend on: the images, the extractor's kind, weights (hashed; a
    large checkpoint by size and modification time) and code, and the device type they run on."""
    from lethe.memorization import features

    weights = ""
    if cfg.features == "featurizer" and FEATURIZER.exists():
        weights = content_hash(FEATURIZER)
    elif cfg.features in ("sscd", "open_clip") and cfg.features_path:
        weights = fingerprint([Path(cfg.features_path)])
    code = content_hash(features.__file__) + content_hash(Path(__file__).with_name("featurizer.py"))
    digest = hashlib.md5(pixels.contiguous().numpy().tobytes())
    digest.update(f"{cfg.features}:{cfg.open_clip_model}:{weights}:{code}:{inference_device().type}".encode())
    return digest.hexdigest()[:20]


def replication_features(cfg: EvaluateConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    return load_features(cfg.features, str(FEATURIZER) if cfg.features == "featurizer" else cfg.features_path,
                         cfg.open_clip_model, inference_device())


def quality_features(cfg: EvaluateConfig, reference: torch.Tensor,
                     featurize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Featurizer | FeatureSpace:
    """FD's and diversity's feature space: the featurizer on labelled data (the digits), else on an image
    folder (no labels to train one) evaluate.features' space; `reference` images give its width."""
    if has_featurizer(FEATURIZER):
        return load_featurizer(FEATURIZER)
    featurize = featurize or replication_features(cfg)
    return FeatureSpace(featurize, featurize(reference[:1]).shape[1])
