"""The model registry's conventions: one version per evaluated variant, aliases `baseline` and `champion`.

Policy for `champion`, on the paired 95% intervals of each variant against the baseline (same prompts,
same seeds): a variant qualifies when
- its reduction of the dup-prompt replication rate is significant (the difference's interval lies below 0),
- its FD on holdout prompts is not significantly more than `fd_tolerance` above the baseline's (the
  relative change's interval does not lie wholly above the tolerance),
- its prompt accuracy on holdout prompts is not significantly more than `accuracy_tolerance` below.
Among the qualified, the lowest dup rate wins, a tie going to the lower FD; with none, the baseline stays
champion. Every variant's verdict and reason is kept (`reports/registry.json`, a version tag). A version
whose model files are already registered is reused, not registered twice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from lethe.config import RegistryConfig
from lethe.evaluation.intervals import HIGH, LOW, change_key
from lethe.files import content_hash

RATE, FD, ACCURACY = "replication/rate/dup", "quality/fd/holdout", "quality/prompt_accuracy/holdout"


def _paired(m: dict[str, float], key: str, kind: str) -> tuple[float, float, float] | None:
    """A paired change with its interval: kind "diff" (absolute) or "relative"."""
    prefix = change_key(key) + ("/diff" if kind == "diff" else "")
    if prefix not in m or m.get(f"{prefix}/{LOW}") is None:
        return None
    return m[prefix], m[f"{prefix}/{LOW}"], m[f"{prefix}/{HIGH}"]


def verdict(candidate: dict[str, float], cfg: RegistryConfig) -> tuple[bool, str]:
    """Whether a variant may be champion, and why (for the baseline itself: it is the reference)."""
    rate = _paired(candidate, RATE, "diff")
    if rate is None:
        return False, "no paired comparison of the dup replication rate with the baseline (no dup prompts?)"
    change, low, high = rate
    if not high < 0:
        why = "a significant increase" if low > 0 else "its interval reaches 0"
        return False, (f"dup replication change {change:+.3f} [{low:+.3f}, {high:+.3f}] is not a significant "
                       f"reduction ({why})")
    fd = _paired(candidate, FD, "relative")
    if fd is not None and fd[1] > cfg.fd_tolerance:
        return False, (f"FD {fd[0]:+.0%} [{fd[1]:+.0%}, {fd[2]:+.0%}] against the baseline is significantly "
                       f"beyond the tolerance of +{cfg.fd_tolerance:.0%}")
    accuracy = _paired(candidate, ACCURACY, "diff")
    if accuracy is not None and accuracy[2] < -cfg.accuracy_tolerance:
        return False, (f"prompt accuracy {accuracy[0]:+.3f} [{accuracy[1]:+.3f}, {accuracy[2]:+.3f}] is significantly "
                       f"more than {cfg.accuracy_tolerance} below the baseline's")
    quality = [f"FD {fd[0]:+.0%} [{fd[1]:+.0%}, {fd[2]:+.0%}]" if fd else "FD not measured",
               f"accuracy {accuracy[0]:+.3f} [{accuracy[1]:+.3f}, {accuracy[2]:+.3f}]" if accuracy else "accuracy not measured"]
    return True, (f"dup replication {change:+.3f} [{low:+.3f}, {high:+.3f}], a significant reduction; "
                  + ", ".join(quality) + ": within the tolerances")


def choose_champion(metrics: dict[str, dict[str, float]], baseline: str, cfg: RegistryConfig) -> tuple[str, dict[str, str]]:
    """The champion, and every variant's verdict ("qualifies: ..." or "refused: ...")."""
    reasons, allowed = {baseline: "the baseline: the reference every variant is compared with"}, []
    for variant, m in metrics.items():
        if variant == baseline:
            continue
        ok, why = verdict(m, cfg)
        reasons[variant] = ("qualifies: " if ok else "refused: ") + why
        if ok:
            allowed.append(variant)
    if not allowed:
        return baseline, reasons
    return min(allowed, key=lambda v: (metrics[v].get(RATE, float("inf")), metrics[v].get(FD, float("inf")))), reasons


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
