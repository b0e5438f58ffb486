"""`lethe promote`: move a registry alias by hand; `champion` must pass the policy unless forced."""

from __future__ import annotations

import mlflow

from lethe.errors import LetheError
from lethe.registry import verdict, version_metrics
from lethe.tracking import connect


def promote(params, model_name: str, version: str, alias: str, force: bool) -> str:
    """Move an alias by hand; `champion` must pass the policy (on its paired comparison with the baseline) unless forced."""
    connect(params.tracking)
    client = mlflow.MlflowClient()
    try:
        candidate = client.get_model_version(model_name, version)
    except mlflow.exceptions.MlflowException:
        raise LetheError(f"model '{model_name}' has no version {version}")
    if alias == "champion" and not force:
        # a version's metric tags carry its paired comparison with the baseline it was evaluated against
        ok, reason = verdict(version_metrics(candidate), params.registry)
        if not ok:
            raise LetheError(f"version {version} fails the champion policy: {reason}; use --force to promote anyway")
    client.set_registered_model_alias(model_name, alias, version)
    return f"{model_name}@{alias} -> version {version}"
