"""The model registry's conventions: one version per evaluated variant, aliases `baseline` and `champion`.

Policy for `champion`: among the registered variants, the lowest dup-prompt replication rate whose
quality stays within params' tolerances of the baseline (FD on holdout prompts may rise by at most
`fd_tolerance`, relative; prompt accuracy may fall by at most `accuracy_tolerance`, absolute); a tie in
the rate goes to the lower FD. A
version whose model files are already registered is reused, not registered twice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


from lethe.config import RegistryConfig
from lethe.files import content_hash

RATE, FD, ACCURACY = "replication/rate/dup", "quality/fd/holdout", "quality/prompt_accuracy/holdout"


def policy_failure(candidate: dict[str, float], baseline: dict[str, float], cfg: RegistryConfig) -> str | None:
    """Why a version may not be champion, or None when it may."""
    if FD in candidate and FD in baseline and candidate[FD] > baseline[FD] * (1 + cfg.fd_tolerance):
        return f"FD {candidate[FD]:.3f} is above the baseline's {baseline[FD]:.3f} by more than {cfg.fd_tolerance:.0%}"
    if ACCURACY in candidate and ACCURACY in baseline and candidate[ACCURACY] < baseline[ACCURACY] - cfg.accuracy_tolerance:
        return (f"prompt accuracy {candidate[ACCURACY]:.3f} is below the baseline's {baseline[ACCURACY]:.3f} "
                f"by more than {cfg.accuracy_tolerance}")
    return None


def choose_champion(metrics: dict[str, dict[str, float]], baseline: str, cfg: RegistryConfig) -> str:
    allowed = [v for v, m in metrics.items() if policy_failure(m, metrics[baseline], cfg) is None]
    # ties in the rate (it counts copies among a few dozen generations) go to the lower FD
    return min(allowed, key=lambda v: (metrics[v].get(RATE, float("inf")), v != baseline,
                                       metrics[v].get(FD, float("inf"))))


def version_metrics(version) -> dict[str, float]:
    return {k.removeprefix("metric/"): float(v) for k, v in version.tags.items() if k.startswith("metric/")}


def model_hash(model_dir: Path, params) -> str:
    """Weights, config (with its inference-time mitigations) and sampler settings: what decides the outputs."""
    packaged = (content_hash(model_dir / "weights.safetensors") + content_hash(model_dir / "config.json")
                + params.sample.model_dump_json())
    return hashlib.sha256(packaged.encode()).hexdigest()[:20]


def existing_version(client, name: str, model_hash: str):
    versions = client.search_model_versions(f"name='{name}' and tags.model_hash='{model_hash}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None
