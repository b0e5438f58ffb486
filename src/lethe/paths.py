"""Every path the stages share, once: what one stage writes and another reads (relative to the project root).

`dvc.yaml` names the same paths; `tests/test_pipeline_deps.py` checks that the two agree.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path("data/prepared")  # prepare: images, captions, splits
SHARDS = Path("data/shards.json")  # shard: IET-AGC's assignment of training samples to shards
MODELS = Path("models")  # one directory per variant: config.json + weights.safetensors
PRETRAINED = MODELS / "pretrained"
BASELINE = MODELS / "baseline"
FEATURIZER = MODELS / "featurizer"
METRICS = Path("metrics")  # metrics/<variant>.json: what evaluate measured
TRAIN_METRICS = METRICS / "train"  # metrics/train/<variant>.json: training (or packaging) costs
DATA_METRICS = METRICS / "data.json"  # prepare: duplicate groups, planted pairs
CALIBRATION = METRICS / "calibration.json"  # calibrate: replication thresholds from the holdout images
DETECT_METRICS = METRICS / "detect.json"
LOCALIZE_METRICS = METRICS / "localize.json"
SEARCH_METRICS = METRICS / "search" / "memcontrol.json"
CHOSEN_MASK = Path("search/memcontrol.json")  # memcontrol: the chosen mask, train@memcontrol's input
LOYAL_CHOICE = Path("search/loyal.json")  # select_loyal: the skips and tau train@loyal and train@raunet use
LOYAL_METRICS = METRICS / "search" / "loyal.json"
STUDIES = Path("search/studies")  # memcontrol: the Optuna journal (persists across re-runs)
REPORTS = Path("reports")
PLOTS = Path("plots")
CHECKPOINTS = Path(".lethe/checkpoints")  # resumable training, outside DVC's outputs
LATENTS = Path(".lethe/latents")  # VAE latents cached per dataset and VAE
FEATURES = Path(".lethe/features")  # the training set's replication features, per images and feature extractor


def model_dir(variant: str) -> Path:
    return MODELS / variant


def variant_metrics_file(variant: str) -> Path:
    return METRICS / f"{variant}.json"


def headline_metrics_file(variant: str) -> Path:
    return METRICS / "headline" / f"{variant}.json"


def train_metrics_file(variant: str) -> Path:
    return TRAIN_METRICS / f"{variant}.json"


def outcomes_file(variant: str) -> Path:
    """evaluate: per-generation outcomes, the baseline's paired with every other variant's."""
    return METRICS / "outcomes" / f"{variant}.npz"


REGISTRY = REPORTS / "registry.json"  # register: versions, aliases and the policy's verdicts
AUDIT_CACHE = Path(".lethe/audit")  # audit: generations per batch, so a killed audit resumes
REPRO_CORES = Path(".lethe/repro/cores")  # lethe repro: how many threads each running stage may use now


def audit_dir(name: str) -> Path:
    """audit: `audit.json`, `index.html` and `risk.png` of one audited model."""
    return REPORTS / "audit" / name


def audit_summary(name: str) -> Path:
    return REPORTS / "audit" / f"{name}.json"
