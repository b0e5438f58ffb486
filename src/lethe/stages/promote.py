"""`lethe promote`: move a registry alias by hand; `champion` must pass the policy unless forced."""

from __future__ import annotations

import mlflow

from lethe.errors import LetheError
from lethe.registry import policy_failure, version_metrics
from lethe.tracking import connect


def promote(params, model_name: str, version: str, alias: str, force: bool) -> str:
    """Move an alias by hand; `champion` must pass the policy against the `baseline` version unless forced."""
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
