"""The model registry's conventions: one version per evaluated variant, aliases `baseline` and `champion`.

Policy for `champion` ("non-inferior by its bounds"), on the paired 95% intervals of each variant against
the baseline (same prompts, same seeds). The promotion criterion is `registry.criterion`: "reid" (default:
the dup prompts' re-identification rate, `replication/reid_rate/dup`, what a privacy user fears) or "copy"
(the dup replication rate, `replication/rate/dup`). A variant qualifies only when all hold:
- its reduction of the criterion's rate is significant: the difference's interval lies below 0
  (`<change>/diff/ci_high < 0`) and, where evaluate wrote it, the `<change>/significant` flag (set after a
  multiplicity control across variants, so authoritative) is -1;
- FD on holdout prompts: the UPPER bound of its relative change is within `fd_tolerance`;
- prompt accuracy on holdout prompts: the LOWER bound of its change is within `-accuracy_tolerance`;
- every figure read (each change's point and both bounds) is present and finite: a missing one refuses,
  naming its key. Nothing is guessed.
Among the qualified the order is set in advance and conservative, never by point estimates: the lowest upper
bound of the criterion's change, then the lowest upper bound of the FD change, then the highest lower bound
of the accuracy change, then the name. With none qualified, the baseline stays champion, and each refusal
says what would decide it: which interval was too wide and about how many times the prompts would bring
its bound across. Only the prompts' part of the interval (`.../prompt_ci_*`, kept beside it) shrinks as
1/sqrt(n); the training-run part (the rest, in quadrature) does not, so when it alone spans the room to the
limit, or the point itself lies on the wrong side, no number of prompts would, and the reason says which
(more training seeds per model would). A rough guide: it reads the normal approximation. Every variant's verdict and reason is kept (`reports/registry.json`, a version tag). A version
whose model files are already registered is reused, not registered twice.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from lethe.config import RegistryConfig
from lethe.evaluation.intervals import HIGH, LOW, change_key
from lethe.files import content_hash

RATE, REID = "replication/rate/dup", "replication/reid_rate/dup"
FD, ACCURACY = "quality/fd/holdout", "quality/prompt_accuracy/holdout"
# the promotion criterion: its figure, and how reasons name it
CRITERIA = {"reid": (REID, "dup re-identification rate"), "copy": (RATE, "dup replication (copy) rate")}
DUP_PROMPTS, HOLDOUT_PROMPTS = "prompts/dup", "prompts/holdout"


def criterion_key(cfg: RegistryConfig) -> str:
    """The figure whose reduction the policy promotes (`registry.criterion`)."""
    return CRITERIA[cfg.criterion][0]


@dataclass(frozen=True)
class Assessment:
    ok: bool
    reason: str  # one line, without the "qualifies: " / "refused: " prefix
    rank: tuple = ()  # the qualified's conservative order (lower is better)
    needed: float = math.inf  # refused: the multiple of the prompts that would decide every failed bound
    # (inf: no number would, or a figure is missing; nan: more would, how many is not known)


def _number(m: dict[str, float], key: str) -> float | None:
    value = m.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _change(m: dict[str, float], prefix: str, missing: list[str]) -> tuple[float, float, float] | None:
    """A paired change and its bounds, `prefix`, `prefix/ci_low`, `prefix/ci_high`; absent keys go to `missing`."""
    keys = (prefix, f"{prefix}/{LOW}", f"{prefix}/{HIGH}")
    values = [_number(m, k) for k in keys]
    missing += [k for k, v in zip(keys, values) if v is None]
    return None if None in values else tuple(values)


def _prompt_bound(m: dict[str, float], prefix: str, side: str, point: float) -> float | None:
    """The distance from the point to the prompts' own bound on `side`, where training-run noise was added
    (`prefix/prompt_ci_low|high`); None where the interval is the prompts' alone."""
    bound = _number(m, f"{prefix}/prompt_{side}")
    return None if bound is None else abs(bound - point)


def _sig2(x: float) -> str:
    return f"{float(f'{x:.2g}'):.0f}" if x >= 10 else f"{x:.2g}"


def _decide(half: float, margin: float, n: float | None, group: str, prompt_half: float | None = None) -> tuple[float, str]:
    """How many times the prompts would bring a bound `half` from its point to the limit `margin` from it.
    The prompts' part `prompt_half` shrinks as 1/sqrt(n), the training-run part sqrt(half^2 - prompt_half^2)
    not: (prompt_half^2 / (margin^2 - run^2)); without a run part, (half / margin)^2."""
    if margin <= 0:
        return math.inf, f"no number of {group} prompts would decide it: the point itself is on the wrong side"
    prompt_half = half if prompt_half is None else min(abs(prompt_half), half)
    run = math.sqrt(max(half ** 2 - prompt_half ** 2, 0.0))
    if run >= margin:
        return math.inf, (f"no number of {group} prompts would decide it: training-run noise alone (+/-{run:.2g}) "
                          f"spans the {margin:.2g} to the limit; more training seeds per model would")
    multiple = prompt_half ** 2 / (margin ** 2 - run ** 2)
    times = f"{multiple:.1f}x" if multiple < 10 else f"{multiple:.0f}x"
    if n is None:
        return multiple, f"about {times} the {group} prompts would decide it"
    return multiple, f"about {times} the {n:.0f} {group} prompts ({_sig2(multiple * n)}) would decide it"


def assess(m: dict[str, float], cfg: RegistryConfig) -> Assessment:
    """A variant's verdict under the policy, its reason (failures first), and for the qualified its rank."""
    key, label = CRITERIA[cfg.criterion]
    name = f"{label} (criterion {cfg.criterion})"
    missing: list[str] = []
    rate = _change(m, change_key(key) + "/diff", missing)
    fd = _change(m, change_key(FD), missing)
    accuracy = _change(m, change_key(ACCURACY) + "/diff", missing)
    flag_key = change_key(key) + "/significant"
    flag = _number(m, flag_key)
    if flag_key in m and flag is None:
        missing.append(flag_key)  # written, but not a number: not a flag to rely on
    if missing:
        return Assessment(False, f"missing or not finite: {', '.join(missing)} (a missing figure refuses; {name})")
    dup, holdout = _number(m, DUP_PROMPTS), _number(m, HOLDOUT_PROMPTS)
    failed, passed, needed = [], [], []

    d, low, high = rate
    shown = f"{name} change {d:+.3f} [{low:+.3f}, {high:+.3f}]"
    if high >= 0:
        why = "a significant increase" if low > 0 else "its interval reaches 0"
        multiple, decide = _decide(high - d, -d, dup, "dup", _prompt_bound(m, change_key(key) + "/diff", HIGH, d))
        failed.append(f"{shown} is not a significant reduction ({why}; {decide})")
        needed.append(multiple)
    elif flag is not None and flag != -1:
        failed.append(f"{shown} is not a significant reduction after the multiplicity control across variants "
                      f"(significant = {flag:+.0f}; more dup prompts would decide it, the adjusted interval "
                      f"is not recorded to say how many)")
        needed.append(math.nan)
    else:
        passed.append(f"{shown}, a significant reduction")

    (point, low, high), tol = fd, cfg.fd_tolerance
    shown = f"FD {point:+.0%} [{low:+.0%}, {high:+.0%}]"
    if high > tol:
        # FD's change is in units of the baseline's uncorrected FD, whose bias shrinks with more prompts too:
        # how many would decide it is not a multiple of the half-width
        decide = ("no number of holdout prompts would decide it: the point itself is on the wrong side" if point >= tol
                  else "the unit, the baseline's uncorrected FD, shrinks with more prompts too, so how many would "
                       "decide it is not estimated")
        failed.append(f"{shown}: its upper bound is beyond the tolerance of +{tol:.0%} ({decide})")
        needed.append(math.inf if point >= tol else math.nan)
    else:
        passed.append(f"{shown}, its upper bound within +{tol:.0%}")

    (point, low, high), tol = accuracy, cfg.accuracy_tolerance
    shown = f"prompt accuracy {point:+.3f} [{low:+.3f}, {high:+.3f}]"
    if low < -tol:
        multiple, decide = _decide(point - low, point + tol, holdout, "holdout",
                                   _prompt_bound(m, change_key(ACCURACY) + "/diff", LOW, point))
        failed.append(f"{shown}: its lower bound is more than {tol} below the baseline's ({decide})")
        needed.append(multiple)
    else:
        passed.append(f"{shown}, its lower bound within -{tol}")

    if failed:
        most = (math.inf if math.inf in needed else math.nan if any(math.isnan(x) for x in needed)
                else max(needed))
        return Assessment(False, "; ".join(failed + passed), needed=most)
    return Assessment(True, "; ".join(passed), rank=(rate[2], fd[2], -accuracy[1]))


def verdict(candidate: dict[str, float], cfg: RegistryConfig) -> tuple[bool, str]:
    """Whether a variant may be champion, and why (one line)."""
    result = assess(candidate, cfg)
    return result.ok, result.reason


def choose_champion(metrics: dict[str, dict[str, float]], baseline: str, cfg: RegistryConfig) -> tuple[str, dict[str, str]]:
    """The champion, and every variant's verdict ("qualifies: ..." or "refused: ..."); with none qualified
    the baseline, whose reason then names the variant nearest to being decided."""
    reference = "the baseline: the reference every variant is compared with"
    results = {v: assess(m, cfg) for v, m in metrics.items() if v != baseline}
    reasons = {baseline: reference} | {v: ("qualifies: " if r.ok else "refused: ") + r.reason for v, r in results.items()}
    qualified = [v for v, r in results.items() if r.ok]
    if qualified:
        return min(qualified, key=lambda v: (*results[v].rank, v)), reasons
    decidable = [v for v, r in results.items() if math.isfinite(r.needed)]
    if decidable:
        nearest = min(decidable, key=lambda v: (results[v].needed, v))
        reasons[baseline] = (f"{reference}; stays champion, no variant qualifying (nearest: {nearest}, about "
                             f"{results[nearest].needed:.1f}x its prompts would decide it)")
    elif results:
        reasons[baseline] = f"{reference}; stays champion, no variant qualifying"
    return baseline, reasons


def version_metrics(version) -> dict[str, float]:
    """A version's `metric/...` tags; a tag that is not a number is left out (the policy refuses it as missing)."""
    out = {}
    for k, v in version.tags.items():
        if k.startswith("metric/"):
            try:
                out[k.removeprefix("metric/")] = float(v)
            except ValueError:
                continue
    return out


def model_hash(model_dir: Path, params) -> str:
    """Weights, config (with its inference-time mitigations) and sampler settings: what decides the outputs."""
    packaged = (content_hash(model_dir / "weights.safetensors") + content_hash(model_dir / "config.json")
                + params.sample.model_dump_json())
    return hashlib.sha256(packaged.encode()).hexdigest()[:20]


def existing_version(client, name: str, model_hash: str):
    versions = client.search_model_versions(f"name='{name}' and tags.model_hash='{model_hash}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None
