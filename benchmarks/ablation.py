"""The embedded model's levers toward Stable Diffusion, one at a time: does cross-attention carry memorization?

Wen's noise magnitude, MemAttn's attention entropy and NeMo's neurons read cross-attention; on the embedded
default they see little. Each lever below makes the toy model more like Stable Diffusion in one respect
(docs/methods.md, "The embedded model"). `run LEVER --seed S` clones this commit into a scratch folder,
switches the lever on in its params.yaml (pretraining and fine-tuning at seed S, the data as shipped) and
runs the default's own stages through `lethe repro`, one at a time on one thread: pretraining, the
baseline, calibration, detection, NeMo's localization, the baseline's evaluation and MemAttn's inference
mitigation. It keeps the figures in `benchmarks/ablation/<lever>-seed<S>.json` and removes the folder.

`table` reads those files and prints one JSON object (`--markdown`: the table in docs/ablation.md). A
figure is the mean over a lever's seeds. Its 95% interval adds the prompt bootstrap's variance (one run's,
from the stage's own interval) to the training-run variance over the runs averaged, s_run^2 / R, with s_run
pooled over every lever run at more than one seed (the same model, so the same kind of noise), and a t
quantile with Welch-Satterthwaite's degrees of freedom, as `lethe.evaluation.runs` does for a variant's
change. A change against `none` (every lever off; unpaired, so conservative) is marked where its interval excludes 0.

    python benchmarks/ablation.py run schedule --seed 0
    python benchmarks/ablation.py table --markdown > docs/ablation.md
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "ablation"
TARGETS = ("detect", "localize", "evaluate@baseline", "evaluate@memattn")
Z = stats.norm.ppf(0.975)


def _none(p):  # every lever off, set explicitly: the runs stay valid whatever params.yaml's default becomes
    p["diffusion"].update(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    p["model"]["text"]["pad_with_end"] = False
    p["data"]["nonce_words"] = False
    p["finetune"]["train_text_encoder"] = True
    p["model"]["unet"].update(block_out_channels=[32, 64], attention_head_dim=8,
                              up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])


def _schedule(p):  # Stable Diffusion's scaled-linear betas
    p["diffusion"].update(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _pad(p):  # CLIP pads with its end token
    p["model"]["text"]["pad_with_end"] = True


def _nonce(p):  # a unique, never-pretrained word ends every caption outside pretraining
    p["data"]["nonce_words"] = True


def _frozen(p):  # the text encoder frozen during fine-tuning, as Somepalli et al. train
    p["finetune"]["train_text_encoder"] = False


def _capacity(p):  # 12 heads and 96 value neurons per cross-attention layer (was 8 and 64)
    p["model"]["unet"]["block_out_channels"] = [32, 96]


def _nemo_layers(p):  # text enters only where NeMo reads: cross-attention in the down and mid blocks, none up
    p["model"]["unet"]["up_block_types"] = ["UpBlock2D", "UpBlock2D"]


LEVERS = {
    "none": (_none,),
    "schedule": (_none, _schedule),
    "pad": (_none, _pad),
    "nonce": (_none, _nonce),
    "frozen": (_none, _frozen),
    "capacity": (_none, _capacity),
    "schedule_pad": (_none, _schedule, _pad),
    "nemo_layers": (_none, _nemo_layers),
    "schedule_pad_nemo_layers": (_none, _schedule, _pad, _nemo_layers),
}
DESCRIPTION = {
    "none": "no lever (linear schedule, zero padding)",
    "schedule": "SD's scaled-linear schedule",
    "pad": "padding with the end token",
    "nonce": "a nonce word per caption",
    "frozen": "text encoder frozen in fine-tuning",
    "capacity": "12 heads, 96 value neurons",
    "schedule_pad": "schedule + end-token padding",
    "nemo_layers": "cross-attention in down and mid blocks only",
    "schedule_pad_nemo_layers": "schedule + padding + down and mid only",
}


def lever_params(params: dict, lever: str, seed: int) -> dict:
    for switch in LEVERS[lever]:
        switch(params)
    params["pretrain"]["seed"] = seed
    params["finetune"]["seed"] = seed
    return params


def run(lever: str, seed: int, results: Path) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    results.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"lethe-ablation-{lever}-") as scratch:
        work = Path(scratch) / "lethe"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
        params = lever_params(yaml.safe_load((work / "params.yaml").read_text()), lever, seed)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        # the clone's own code, one thread, one stage at a time: the fine-tune cost is comparable across levers
        env = os.environ | {"PYTHONPATH": str(work / "src"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        log = results / f"{lever}-seed{seed}.log"
        print(f"ablation {lever} seed {seed}: lethe repro {' '.join(TARGETS)} (log {log})", file=sys.stderr, flush=True)
        started = time.time()
        with log.open("w") as out:
            done = subprocess.run(["lethe", "repro", "--jobs", "1", *TARGETS], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        if done.returncode:
            sys.exit(f"ablation {lever} seed {seed}: lethe repro failed (exit {done.returncode}); see {log}")
        read = lambda name: json.loads((work / "metrics" / name).read_text())
        record = {"lever": lever, "seed": seed, "commit": commit, "seconds": time.time() - started,
                  "pretrain_seconds": read("train/pretrained.json")["cost/train_seconds"],
                  "baseline": read("baseline.json"), "detect": read("detect.json"),
                  "localize": read("localize.json"), "memattn": read("memattn.json")}
    (results / f"{lever}-seed{seed}.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    print(f"ablation {lever} seed {seed}: {record['seconds'] / 60:.1f} min", file=sys.stderr, flush=True)
    return record


# ---- the table -------------------------------------------------------------------------------------------

def _figures(record: dict) -> dict[str, tuple[float, float, float, int]]:
    """Each column's (value, prompt interval low, high, prompts) from one run."""
    # write_json stores NaN as null
    b, d, loc, m = ({k: math.nan if v is None else v for k, v in record[part].items()}
                    for part in ("baseline", "detect", "localize", "memattn"))
    own = lambda src, key, n: (src[key], src[f"{key}/ci_low"], src[f"{key}/ci_high"], n)
    n_dup, n_hold = int(b["prompts/dup"]), int(b["prompts/holdout"])
    n_auroc = int(d["prompts/dup"]) + int(b["prompts/unique"]) + n_hold
    memorized = int(loc["nemo/memorized_prompts"])
    binomial = lambda count: (count / max(memorized, 1), *wilson(count, memorized), memorized)
    figures = {
        "dup": own(b, "replication/rate/dup", n_dup),
        "holdout": own(b, "replication/rate/holdout", n_hold),
        "reid_dup": own(b, "replication/reid_rate/dup", n_dup),
        "accuracy": own(b, "quality/prompt_accuracy/holdout", n_hold),
        "nemo_localized": binomial(loc["nemo/localized_prompts"]),  # over the memorized prompts
        "nemo_median_neurons": (loc["nemo/median_neurons"], math.nan, math.nan, memorized),
        # runs made before localize counted it have none
        "nemo_blockable": binomial(loc.get("nemo/blockable_prompts", math.nan)),
        "memattn_dup_change": own(m, "vs_baseline/replication_rate_dup/diff", n_dup),
        "memattn_accuracy_change": own(m, "vs_baseline/quality_prompt_accuracy_holdout/diff", n_hold),
        # MemAttn's premise, an attention sink on the beginning token: its first-step share for ordinary prompts
        "begin_mass": (d.get("detection/memattn_begin_mass/other", math.nan), math.nan, math.nan, 0),
        "finetune_minutes": (b["cost/train_seconds"] / 60, math.nan, math.nan, 0),
        "run_minutes": (record["seconds"] / 60, math.nan, math.nan, 0),
    }
    for name in ("wen_first", "wen_all", "memattn_e", "memattn_d", "nemo_ssim"):
        figures[name] = own(d, f"detection/{name}/auroc", n_auroc)
    return figures


UNBOUNDED = ("nemo_median_neurons", "begin_mass", "finetune_minutes", "run_minutes")  # counts and times: no interval, no marker
def wilson(count: float, n: int) -> tuple[float, float]:
    """Wilson's 95% interval of a share count / n (not empty at 0 or n, unlike the normal one)."""
    if not n or not math.isfinite(count):
        return math.nan, math.nan
    p, z2 = count / n, Z ** 2
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


COLUMNS = ("dup", "holdout", "reid_dup", "accuracy", "wen_first", "wen_all", "memattn_e", "memattn_d", "nemo_ssim",
           "nemo_localized", "nemo_median_neurons", "nemo_blockable", "memattn_dup_change", "memattn_accuracy_change",
           "begin_mass", "finetune_minutes", "run_minutes")


def pooled_run_sd(by_lever: dict[str, list[dict]]) -> dict[str, tuple[float, int]]:
    """Each figure's training-run standard deviation, pooled over the levers run at several seeds, and its df."""
    out = {}
    for column in COLUMNS:
        squares, df = 0.0, 0
        for runs in by_lever.values():
            values = [r[column][0] for r in runs if math.isfinite(r[column][0])]
            if len(values) > 1:
                squares += float(np.var(values, ddof=1)) * (len(values) - 1)
                df += len(values) - 1
        if df:
            out[column] = (math.sqrt(squares / df), df)
    return out


def _parts(runs: list[dict], column: str, run_sd: tuple[float, int] | None):
    """(mean, prompt variance, prompt df, run variance of the mean, run df)."""
    runs = [r for r in runs if math.isfinite(r[column][0])] or runs
    values = [r[column][0] for r in runs]
    widths = [(r[column][2] - r[column][1]) / (2 * Z) for r in runs]
    prompt_var = float(np.mean(np.square(widths))) if all(math.isfinite(w) for w in widths) else 0.0
    sd, df = run_sd or (0.0, 1)
    return float(np.mean(values)), prompt_var, max(runs[0][column][3] - 1, 1), sd ** 2 / len(values), df


def _t_interval(point: float, parts: list[tuple[float, int]]) -> tuple[float, float]:
    var = sum(v for v, _ in parts)
    if var == 0:
        return point, point
    df = var ** 2 / sum(v ** 2 / d for v, d in parts if v)
    half = stats.t.ppf(0.975, df) * math.sqrt(var)
    return point - half, point + half


def table(results: Path) -> dict:
    by_lever: dict[str, list[dict]] = {}
    records = [json.loads(path.read_text()) for path in sorted(results.glob("*-seed*.json"))]
    commits = sorted({record["commit"][:7] for record in records})
    for record in records:
        by_lever.setdefault(record["lever"], []).append(_figures(record))
    noise = pooled_run_sd(by_lever)
    rows = {}
    for lever in (name for name in LEVERS if name in by_lever):
        runs, row = by_lever[lever], {"seeds": len(by_lever[lever])}
        for column in COLUMNS:
            mean, pv, pdf, rv, rdf = _parts(runs, column, noise.get(column))
            low, high = _t_interval(mean, [(pv, pdf), (rv, rdf)])
            if column not in UNBOUNDED:  # rates, shares and AUROCs lie in [0, 1], their changes in [-1, 1]
                floor = -1.0 if column.endswith("change") else 0.0
                low, high = max(low, floor), min(high, 1.0)
            row[column] = {"value": mean, "ci_low": low, "ci_high": high, "runs": [r[column][0] for r in runs]}
            if lever != "none" and "none" in by_lever and column not in UNBOUNDED:
                base = _parts(by_lever["none"], column, noise.get(column))
                # both runs' noise comes from one pooled s_run: one part, sd^2 (1/R + 1/R_none), at its df
                d_low, d_high = _t_interval(mean - base[0], [(pv, pdf), (base[1], base[2]), (rv + base[3], rdf)])
                row[column]["change"] = mean - base[0]
                row[column]["change_significant"] = int(np.sign(d_low)) if np.sign(d_low) == np.sign(d_high) else 0
        rows[lever] = row
    return {"commits": commits, "default_lever": current_lever(), "run_sd": {k: {"sd": v[0], "df": v[1]} for k, v in noise.items()}, "levers": rows}


def _cell(figure: dict, digits: int = 2, interval: bool = True) -> str:
    if not math.isfinite(figure["value"]):
        return "–"
    star = {1: " ↑", -1: " ↓"}.get(figure.get("change_significant", 0), "")
    value = f"{figure['value']:.{digits}f}"
    if interval and figure["ci_low"] != figure["ci_high"]:
        value += f" [{figure['ci_low']:.{digits}f}, {figure['ci_high']:.{digits}f}]"
    return value + star


def markdown(result: dict) -> str:
    head = ("| lever | seeds | dup copy rate | holdout copy rate | dup re-identification | prompt accuracy (holdout) "
            "| Wen AUROC first step | Wen AUROC all steps | MemAttn E AUROC | MemAttn D AUROC | NeMo SSIM AUROC "
            "| NeMo localized share | NeMo median neurons | NeMo blockable share | MemAttn mitigation: dup rate change | its accuracy change "
            "| fine-tune minutes | run minutes |")
    lines = ["# The embedded model's levers toward Stable Diffusion", "",
             "Written by `python benchmarks/ablation.py table --markdown > docs/ablation.md` from the runs in "
             "`benchmarks/ablation/` (each `python benchmarks/ablation.py run LEVER --seed S`, commits "
             f"{', '.join(result['commits'])}). Each figure is the mean over the lever's seeds with its 95% "
             "interval: one run's prompt bootstrap plus training-run noise (pooled over the levers run at several "
             "seeds). ↑ or ↓: the change against no lever excludes 0. AUROCs: memorized prompts (measured "
             "truth) against the rest; 0.5 is chance. NeMo blockable share: memorized prompts whose score falls below "
             "τ_mem with every neuron NeMo searches blocked at once (– where a run predates that count). MemAttn "
             "mitigation: its paired change against the same run's baseline. Beginning token's attention share: its "
             "first-step share in MemAttn's E layer for prompts not memorized (on Stable Diffusion most of the "
             "attention; uniform over the context would be 1/24). Minutes: one thread, one stage at a "
             "time.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for lever, row in result["levers"].items():
        cells = [DESCRIPTION[lever], str(row["seeds"])]
        for column in COLUMNS:
            interval = column not in UNBOUNDED
            digits = 1 if column.endswith(("minutes", "neurons")) else 3 if column == "begin_mass" else 2
            cells.append(_cell(row[column], digits, interval))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Goals met, per lever (of " + str(len(goals(next(iter(result["levers"].values())), None)) + 1) + "): "
              + "; ".join(f"{DESCRIPTION[lever]} {sum(met for *_, met in goals(row, result['levers'].get('none')))}"
                          for lever, row in result["levers"].items()) + "."]
    default = result.get("default_lever")
    if default in result["levers"]:
        lines += ["", f"## The goals on the default ({DESCRIPTION[default]})", "", "| goal | measured | met |", "|---|---|---|"]
        lines += [f"| {goal} | {measured} | {'yes' if met else 'no'} |"
                  for goal, measured, met in goals(result["levers"][default], result["levers"].get("none"))]
    lines += ["", "## How far each lever moved each goal, and what would be needed", ""] + needed(result["levers"])
    sds = ", ".join(f"{k} {v['sd']:.3f} (df {v['df']})" for k, v in result["run_sd"].items()
                    if k in ("dup", "wen_first", "memattn_e", "nemo_ssim", "nemo_blockable"))
    lines += ["", f"Training-run standard deviations, pooled over the levers run at several seeds: {sds}."]
    return "\n".join(lines) + "\n"


def current_lever() -> str | None:
    """The lever whose settings params.yaml holds now (seeds aside): the default the goals are read on."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for lever in LEVERS:
        candidate = lever_params(copy.deepcopy(params), lever, params["finetune"]["seed"])
        candidate["pretrain"]["seed"] = params["pretrain"]["seed"]
        if candidate == params:
            return lever
    return None


def goals(row: dict, none: dict | None) -> list[tuple[str, str, bool]]:
    """The cross-attention goals on one lever's row: (goal, what was measured, met)."""
    f = lambda c: row[c]
    out = [("baseline memorizes: dup rate ≥ 0.5, its lower bound above the holdout's upper bound",
            f"{f('dup')['value']:.2f} [{f('dup')['ci_low']:.2f}, …]; holdout upper {f('holdout')['ci_high']:.2f}",
            f("dup")["value"] >= 0.5 and f("dup")["ci_low"] > f("holdout")["ci_high"]),
           ("Wen's AUROC ≥ 0.95 (first step or all steps)",
            f"{f('wen_first')['value']:.2f} / {f('wen_all')['value']:.2f}", max(f("wen_first")["value"], f("wen_all")["value"]) >= 0.95),
           ("MemAttn's E AUROC ≥ 0.80", f"{f('memattn_e')['value']:.2f}", f("memattn_e")["value"] >= 0.80),
           ("NeMo localizes ≥ 50% of memorized prompts, median ≤ 10 neurons",
            f"{f('nemo_localized')['value']:.2f}, median {f('nemo_median_neurons')['value']:.0f}",
            f("nemo_localized")["value"] >= 0.5 and f("nemo_median_neurons")["value"] <= 10)]
    if none:
        ratio = f("run_minutes")["value"] / none["run_minutes"]["value"]
        out.append(("the run within 1.3x of no lever's", f"{ratio:.2f}x", ratio <= 1.3))
    return out


def needed(levers: dict) -> list[str]:
    """Per goal the lever(s) with the highest figure, whether that is outside the noise, and what the measured
    figures say is missing."""
    def show(column: str) -> str:
        finite = {lever: row[column] for lever, row in levers.items() if math.isfinite(row[column]["value"])}
        if not finite:
            return "no run measured"
        top = max(figure["value"] for figure in finite.values())
        best = [lever for lever, figure in finite.items() if figure["value"] == top]
        moved = any(finite[lever].get("change_significant", 0) == 1 for lever in best)
        base = f", no lever {finite['none']['value']:.2f}" if "none" in finite else ""
        return (f"{' and '.join(DESCRIPTION[lever] for lever in best)} ({top:.2f}{base}; "
                + ("outside the noise)" if moved else "inside the noise)"))

    sink = [row["begin_mass"]["value"] for row in levers.values() if math.isfinite(row["begin_mass"]["value"])]
    return [f"- Wen (first step): highest with {show('wen_first')}. Every digit caption determines its picture's "
            "class, so the text-conditional noise is large for ordinary prompts too, where on Stable Diffusion it "
            "is small unless a prompt is memorized: captions that leave most of an ordinary picture open (a "
            "compositional set) would be needed, with a featurizer and calibration of their own.",
            f"- MemAttn's E: highest with {show('memattn_e')}. Its premise is attention resting on the beginning "
            "token; here that token's share " + (f"stays at {max(sink):.3f} or less, below an even spread (0.042), "
            "so there is no sink for a memorized prompt to move away from" if sink and max(sink) < 1 / 24 else
            "is as the table shows") + ". A sink forms in a text encoder pretrained on a large caption corpus "
            "(CLIP's, which the stable-diffusion preset loads from its checkpoint).",
            f"- NeMo: localized share highest with {show('nemo_localized')}; blockable share highest with "
            f"{show('nemo_blockable')}. Where blocking every neuron NeMo searches clears a memorized prompt but "
            "its initial selection (the z-outliers and at most the 15 most active neurons a layer) does not, the "
            "memorization is spread over many of a layer's value neurons rather than held by a few. Whether wider "
            "layers concentrate it with the schedule and padding on is untried: the capacity lever ran without them."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="one lever at one seed")
    one.add_argument("lever", choices=sorted(LEVERS))
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--results", type=Path, default=RESULTS)
    every = sub.add_parser("table", help="the table from every run kept")
    every.add_argument("--results", type=Path, default=RESULTS)
    every.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if args.command == "run":
        print(json.dumps(run(args.lever, args.seed, args.results), sort_keys=True)[:2000])
    else:
        result = table(args.results)
        print(markdown(result) if args.markdown else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
