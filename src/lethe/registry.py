"""The model registry: one version per evaluated variant, aliases `baseline` and `champion`.

Policy for `champion`: among the registered variants, the lowest dup-prompt replication rate whose
quality stays within params' tolerances of the baseline (FD on holdout prompts may rise by at most
`fd_tolerance`, relative; prompt accuracy may fall by at most `accuracy_tolerance`, absolute); a tie in
the rate goes to the lower FD. A
version whose model files are already registered is reused, not registered twice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow

from lethe.config import RegistryConfig
from lethe.errors import LetheError
from lethe.files import content_hash, variant_metrics, write_json

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


def _model_hash(model_dir: Path, params) -> str:
    """Weights, config (with its inference-time mitigations) and sampler settings: what decides the outputs."""
    packaged = (content_hash(model_dir / "weights.safetensors") + content_hash(model_dir / "config.json")
                + params.sample.model_dump_json())
    return hashlib.sha256(packaged.encode()).hexdigest()[:20]


def _existing_version(client, name: str, model_hash: str):
    versions = client.search_model_versions(f"name='{name}' and tags.model_hash='{model_hash}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def register(params) -> dict[str, str]:
    """Register every variant, tag it with its metrics, move `baseline` and `champion`."""
    from lethe.pyfunc import log_pyfunc
    from lethe.tracking import stage_run

    cfg = params.registry
    metrics = variant_metrics(params.variants)
    versions = {}
    with stage_run(params, stage="register", method="register", sections=("registry",), data_hash=""):
        client = mlflow.MlflowClient()
        for variant in params.variants:
            model_dir = Path("models") / variant
            model_hash = _model_hash(model_dir, params)
            version = _existing_version(client, cfg.model_name, model_hash)
            if version is None:
                info = log_pyfunc(variant, model_dir, params, cfg.model_name)
                version = client.get_model_version(cfg.model_name, str(info.registered_model_version))
            client.set_model_version_tag(cfg.model_name, version.version, "method", variant)
            client.set_model_version_tag(cfg.model_name, version.version, "model_hash", model_hash)
            for key, value in metrics[variant].items():
                client.set_model_version_tag(cfg.model_name, version.version, f"metric/{key}", str(value))
            versions[variant] = str(version.version)
        aliases = {}
        if "baseline" in versions:
            aliases["baseline"] = versions["baseline"]
            aliases["champion"] = versions[choose_champion(metrics, "baseline", cfg)]
        for alias, version in aliases.items():
            client.set_registered_model_alias(cfg.model_name, alias, version)
        summary = {"model": cfg.model_name, "versions": versions, "aliases": aliases}
        mlflow.log_dict(summary, "registry.json")
    write_json("reports/registry.json", summary)
    return summary


def promote(params, model_name: str, version: str, alias: str, force: bool) -> str:
    """Move an alias by hand; `champion` must pass the policy against the `baseline` version unless forced."""
    from lethe.tracking import connect

    connect(params.tracking)
    client = mlflow.MlflowClient()
    try:
        candidate = client.get_model_version(model_name, version)
    except mlflow.exceptions.MlflowException:
        raise LetheError(f"model '{model_name}' has no version {version}")
    if alias == "champion" and not force:
        try:
            baseline = client.get_model_version_by_alias(model_name, "baseline")
        except mlflow.exceptions.MlflowException:
            raise LetheError(f"model '{model_name}' has no 'baseline' alias to compare with; use --force")
        reason = policy_failure(version_metrics(candidate), version_metrics(baseline), params.registry)
        if reason:
            raise LetheError(f"version {version} fails the champion policy: {reason}; use --force to promote anyway")
    client.set_registered_model_alias(model_name, alias, version)
    return f"{model_name}@{alias} -> version {version}"
