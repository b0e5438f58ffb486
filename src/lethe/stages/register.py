"""`lethe register`: every variant (not the baseline's A/A replicates) registered as a version of one MLflow model, tagged with its metrics;
the `baseline` and `champion` aliases moved (the policy is in `lethe.registry`)."""

from __future__ import annotations

import mlflow

from lethe.files import variant_metrics, write_json
from lethe.evaluation.runs import with_run_noise
from lethe.methods import CANDIDATES, REPLICATES, VARIANTS
from lethe.paths import REGISTRY, model_dir
from lethe.pyfunc import log_pyfunc
from lethe.registry import choose_champion, existing_version, model_hash
from lethe.tracking import stage_run


def register(params) -> dict[str, str]:
    """Register every variant, tag it with its metrics, move `baseline` and `champion`."""
    cfg = params.registry
    # the A/A replicates measure training-run noise, which every candidate's intervals then carry
    measured = with_run_noise(variant_metrics(VARIANTS), "baseline", REPLICATES)
    metrics = {v: measured[v] for v in CANDIDATES}
    versions = {}
    with stage_run(params, stage="register", method="register", sections=("registry",), data_hash=""):
        client = mlflow.MlflowClient()
        for variant in CANDIDATES:
            directory = model_dir(variant)
            packaged = model_hash(directory, params)
            version = existing_version(client, cfg.model_name, packaged)
            if version is None:
                info = log_pyfunc(variant, directory, params, cfg.model_name)
                version = client.get_model_version(cfg.model_name, str(info.registered_model_version))
            client.set_model_version_tag(cfg.model_name, version.version, "method", variant)
            client.set_model_version_tag(cfg.model_name, version.version, "model_hash", packaged)
            for key, value in metrics[variant].items():
                client.set_model_version_tag(cfg.model_name, version.version, f"metric/{key}", str(value))
            versions[variant] = str(version.version)
        aliases, reasons = {}, {}
        if "baseline" in versions:
            champion, reasons = choose_champion(metrics, "baseline", cfg)
            aliases = {"baseline": versions["baseline"], "champion": versions[champion]}
            for variant, reason in reasons.items():
                client.set_model_version_tag(cfg.model_name, versions[variant], "policy", reason[:4000])
        for alias, version in aliases.items():
            client.set_registered_model_alias(cfg.model_name, alias, version)
        summary = {"model": cfg.model_name, "versions": versions, "aliases": aliases, "policy": reasons}
        mlflow.log_dict(summary, "registry.json")
    write_json(REGISTRY, summary)
    return summary
