"""The report's parts: one table of every variant's metrics, the detection section and the
replication-against-FD trade-off plot (the `report` stage puts them together)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import markdown
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lethe.evaluation.intervals import HIGH, LOW, change_key, mean_of, paired, per_prompt  # noqa: E402
from lethe.evaluation.runs import ENDPOINTS, FAMILY, combine  # noqa: E402
from lethe.paths import CALIBRATION, DATA_METRICS, DETECT_METRICS, LOCALIZE_METRICS  # noqa: E402

# (column title, metric key): the comparison a reader wants first. Every figure carries its 95% interval
# (`<key>/ci_low`, `<key>/ci_high`); a change against the baseline is paired (same prompts and seeds),
# and marked * where its difference's interval excludes 0.
COLUMNS = (
    ("replication rate (dup)", "replication/rate/dup"),
    ("dup rate vs baseline", "vs_baseline/replication_rate_dup/diff"),
    ("re-identified (dup)", "replication/reid_rate/dup"),
    ("re-identified vs baseline", "vs_baseline/replication_reid_rate_dup/diff"),
    ("re-identified (holdout: chance)", "replication/reid_rate/holdout"),
    ("own rel. L2 (dup)", "replication/own_rel_l2/dup"),
    ("replication rate (unique)", "replication/rate/unique"),
    ("replication rate (holdout)", "replication/rate/holdout"),
    ("FD (holdout)", "quality/fd/holdout"),
    ("FD vs baseline", "vs_baseline/quality_fd_holdout"),
    ("KID (holdout)", "quality/kid/holdout"),
    ("prompt accuracy (holdout)", "quality/prompt_accuracy/holdout"),
    ("accuracy vs baseline", "vs_baseline/quality_prompt_accuracy_holdout/diff"),
    ("Gu 1/3 rate (dup)", "replication/gu_published_rate/dup"),
    ("top-1 sim p95 (dup)", "replication/sim_p95/dup"),
    ("diversity (holdout)", "quality/diversity/holdout"),
    ("train s", "cost/train_seconds"),
    ("trainable params", "cost/trainable_params"),
    ("s / image", "cost/seconds_per_image"),
)
TRADEOFF_X, TRADEOFF_Y = "quality/fd/holdout", "replication/rate/dup"


def significance(values: dict[str, float], key: str) -> float | None:
    """+1 / -1 where a paired change is significant, 0 where not; None for a figure that is not a change."""
    if not key.startswith("vs_baseline/"):
        return None
    return values.get(key.removesuffix("/diff") + "/significant")


def _number(value: float, key: str) -> str:
    if key.startswith("vs_baseline/") and not key.endswith("/diff"):  # a relative change
        return f"{value:+.0%}"
    if key.startswith("vs_baseline/"):
        return f"{value:+.3f}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3f}"


def _cell(value, key: str = "", values: dict[str, float] | None = None) -> str:
    """The figure, its interval in brackets where it has one, and * for a significant change."""
    if value is None:
        return "–"
    text = _number(value, key)
    values = values or {}
    low, high = values.get(f"{key}/{LOW}"), values.get(f"{key}/{HIGH}")
    if low is not None and high is not None:
        text += f" [{_number(low, key)}, {_number(high, key)}]"
    if significance(values, key):
        text += " *"
    return text


def mechanism(variant: str, params, train: dict[str, dict[str, float]], localize: dict[str, float],
              mask: dict | None, loyal: dict | None = None, controls: dict[str, str] | None = None) -> str:
    """What the variant's mechanism did, in words: what a reader checks before believing its row.
    `train`: each variant's metrics/train/<variant>.json; `localize`: NeMo's; `mask`: MemControl's choice;
    `loyal`: select_loyal's choice of skips and tau; `controls`: each control's method."""
    own = train.get(variant, {})
    key = "train/skipped_share_mean"
    skipped = f"skipped {own[key]:.1%} of samples" if key in own else None
    base_params = train.get("baseline", {}).get("cost/trainable_params")
    if variant in ("wen_filter", "memattn_filter", "ietagc", "ietagc_plus"):
        return skipped or "–"
    if variant == "iet":
        return f"{params.ietagc.shards} proxies on shards, averaged every round; skips nothing"
    follows = (controls or {}).get(variant)
    if variant.startswith("random_skip"):
        return f"{skipped}, at random: {follows}'s share at each step" if follows and skipped else (skipped or "–")
    if variant in ("loyal", "raunet"):
        cfg = params.loyal
        if cfg.choose == "measured" and loyal:
            skips = ", ".join(f"({a}, {b})" for a, b in loyal["skips"])
            why = "least essential for FD" if loyal.get("skips_by", "quality") == "quality" else "cutting replication most"
            where = f"the {len(loyal['skips'])} of {loyal['skips_total']} skips {why}: {skips}"
            when = f"t ≥ {loyal['tau']} ({'measured' if loyal['tau_from'] == 'measured' else 'loyal.tau'})"
        else:
            where, when = f"every skip of levels {list(cfg.levels)}", f"t ≥ {cfg.tau}"
        return f"{cfg.block} transfer blocks on {where}, {'every t' if variant == 'raunet' else when}"
    if variant == "memcontrol" and mask:
        share = f"{own['cost/trainable_params'] / base_params:.2%} of parameters, " if base_params and own else ""
        return f"trains {share}{mask.get('family')} on {len(mask.get('blocks', []))} blocks"
    if variant == "nemo" and localize:
        return (f"{localize['nemo/union_neurons']:.0f} to_v neurons pruned, from {localize['nemo/localized_prompts']:.0f} of "
                f"{localize['nemo/memorized_prompts']:.0f} prompts localized")
    if variant == "memattn":
        padding = ", padding masked" if params.memattn.mask_padding else ""
        return f"begin-token logit x{params.memattn.begin_scale:g}{padding}, every step"
    if variant == "wen_inference":
        cfg = params.wen_inference
        return f"prompt embedding optimised ≤ {cfg.iterations} steps toward {cfg.target_fraction:g} x the holdout magnitude"
    return "–"


def markdown_table(metrics: dict[str, dict[str, float]], mechanisms: dict[str, str] | None = None) -> str:
    mechanisms = mechanisms or {}
    lines = ["| variant | mechanism | " + " | ".join(title for title, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for variant, values in metrics.items():
        lines.append(f"| {variant} | {mechanisms.get(variant, '–')} | "
                     + " | ".join(_cell(values.get(key), key, values) for _, key in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def against_controls(pairs: list[tuple[str, str]], outcomes: dict[str, dict], resamples: int, run_sd: float = 0.0,
                     runs: int = 0) -> list[dict]:
    """Each method against its control, paired on the same prompts and seeds: the dup prompts'
    replication rate of both and the difference method − control, bootstrapped over prompts, its interval
    widened by two training runs' noise where the baseline's replicates measured it (`run_sd` over `runs`).
    `pairs`: (method, control); `outcomes`: each variant's per-generation outcomes (load_outcomes)."""
    rows = []
    for method, control in pairs:
        ours, theirs = outcomes[method].get("dup"), outcomes[control].get("dup")
        if ours is None or theirs is None or ours["prompts"].tolist() != theirs["prompts"].tolist():
            rows.append({"method": method, "control": control, "unpaired": True})  # said in the section
            continue
        n_prompts = len(ours["diversity"])
        k = len(ours["copied"]) // n_prompts
        rate = {v: mean_of(per_prompt(o["copied"], k)) for v, o in ((method, ours), (control, theirs))}
        change = paired("x", rate[method], rate[control], n_prompts, resamples)
        diff = change_key("x") + "/diff"
        low, high = change[f"{diff}/{LOW}"], change[f"{diff}/{HIGH}"]
        if runs > 1:
            low, high, _ = combine(change[diff], low, high, run_sd, runs, n_prompts)
        rows.append({"method": method, "control": control, "method_rate": rate[method](np.arange(n_prompts)),
                     "control_rate": rate[control](np.arange(n_prompts)), "diff": change[diff], "low": low,
                     "high": high, "significant": float(np.sign(low)) if np.sign(low) == np.sign(high) else 0.0})
    return rows


def controls_section(rows: list[dict]) -> str:
    """What each mechanism buys beyond its control: the paired difference of the dup replication rate."""
    if not rows:
        return ""
    lines = ["## Each mechanism against its control\n",
             "Dup prompts' replication rate of a method and of its control (the same share of samples skipped at "
             "random, or the method without its mechanism), paired on the same prompts and seeds; * marks a "
             "difference whose interval excludes 0. The interval resamples prompts and adds two training runs' "
             "noise where the baseline's A/A replicates measured it. Without *, the "
             "mechanism buys nothing measurable here beyond what its control does.\n",
             "| method | control | method's rate | control's rate | method − control |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("unpaired"):
            lines.append(f"| {r['method']} | {r['control']} | – | – | not paired: no dup prompts in common |")
            continue
        star = " *" if r["significant"] else ""
        lines.append(f"| {r['method']} | {r['control']} | {r['method_rate']:.3f} | {r['control_rate']:.3f} | "
                     f"{r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]{star} |")
    return "\n".join(lines) + "\n\n"



def aa_section(replicates: dict[str, dict[str, float]]) -> str:
    """The baseline against itself at other training seeds, through the procedure every variant goes
    through: what it marks here are its false alarms (at most its nominal 5% of the comparisons)."""
    if not replicates:
        return ""
    shown = [(title, key) for title, key in ENDPOINTS if any(key in m for m in replicates.values())]
    lines = ["## A/A: the baseline against itself at other training seeds\n",
             "Each replicate is the baseline fine-tuned again at `finetune.seed` + r, compared with the baseline "
             "exactly as a variant is (paired prompts and generation seeds, prompt bootstrap plus training-run "
             "noise). A * here is a false alarm of the procedure.\n",
             "| replicate | " + " | ".join(title for title, _ in shown) + " |", "|---|" + "---|" * len(shown)]
    marked = total = 0
    for variant, values in replicates.items():
        cells = []
        for _, key in shown:
            cells.append(_cell(values.get(key), key, values))
            if values.get(key) is not None:
                total += 1
                marked += bool(significance(values, key))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines.append(f"\n{marked} of {total} A/A comparisons marked * (nominal: at most 5%, {0.05 * total:.1f} expected).\n")
    return "\n".join(lines) + "\n"


LEGEND = ("Each figure is followed by its 95% interval, bootstrapped over prompts (a prompt's generations drawn "
          "together). A change against the baseline is paired (the same prompts, generation seeds and training "
          "seed) and its interval also carries training-run noise: the spread of the figure over the baseline's "
          "A/A replicates, trained again at other seeds, with a small-sample t quantile (docs/statistics.md). "
          "* marks a change whose interval excludes 0; on the dup replication rates (copy and re-identification) "
          "after Holm's control across the variants, elsewhere at 5% each. A change without * is inside the "
          "noise of these prompts and training runs.")


def html_page(metrics: dict[str, dict[str, float]], sections_markdown: str, galleries: dict[str, str],
              policy: dict[str, str] | None = None, champion: str | None = None, mlflow_runs: str = "",
              mechanisms: dict[str, str] | None = None) -> str:
    """The report as one page a person reads: the table with intervals, the trade-off plot, the policy's
    verdicts, the other sections, and each variant's gallery (paths relative to reports/)."""
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in COLUMNS)
    rows = []
    for variant, values in metrics.items():
        cells = []
        for _, key in COLUMNS:
            sign = significance(values, key)
            higher_is_worse = key.startswith(("vs_baseline/quality_fd", "vs_baseline/quality_kid", "vs_baseline/replication"))
            cls = "" if not sign else (" class='good'" if (sign < 0) == higher_is_worse else " class='bad'")
            cells.append(f"<td{cls}>{html.escape(_cell(values.get(key), key, values))}</td>")
        what = html.escape((mechanisms or {}).get(variant, "–"))
        rows.append(f"<tr><th>{html.escape(variant)}</th><td class='what'>{what}</td>{''.join(cells)}</tr>")
    verdicts = "".join(f"<li><b>{html.escape(v)}</b>: {html.escape(r)}</li>" for v, r in (policy or {}).items())
    pictures = "".join(f"<figure><figcaption>{html.escape(v)}</figcaption><img src='{html.escape(src)}' alt='gallery of {html.escape(v)}'></figure>"
                       for v, src in galleries.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lethe: variants compared</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.5rem; text-align: right; white-space: nowrap; }}
tr > th:first-child, .what {{ text-align: left; }}
td.good {{ background: #e3f4e1; }} td.bad {{ background: #fbe3e1; }}
figure {{ display: inline-block; margin: 0.5rem; vertical-align: top; }}
figure img {{ max-width: 560px; border: 1px solid #ddd; }}
.scroll {{ max-width: 100%; overflow-x: auto; }}
.sections table {{ margin: 0.5rem 0 1rem; }}
.sections td:first-child {{ text-align: left; }}
p, li {{ max-width: 70rem; }}
</style></head><body>
<h1>lethe: variants compared</h1>
<p>{html.escape(LEGEND)} Green: a significant improvement; red: a significant loss.</p>
<p>Every run in MLflow: with <code>mlflow ui</code> running, open <code>http://127.0.0.1:5000/{html.escape(mlflow_runs)}</code>
(the experiment's training runs).</p>
<div class="scroll"><table><tr><th>variant</th><th class='what'>mechanism</th>{head}</tr>{"".join(rows)}</table></div>
<h2>Memorization against quality</h2>
<img src="tradeoff.png" alt="dup replication rate against FD, with intervals">
<h2>Champion policy</h2>
<p>Champion: <b>{html.escape(champion or "none yet")}</b>. A variant qualifies when its reduction of the dup rate
under the registry's criterion (<code>registry.criterion</code>: re-identification or copies) is significant after
Holm's control, the worse end of each quality interval (FD's upper bound, prompt accuracy's lower bound) is within
the registry's tolerances, and every figure is there (a missing one refuses). Among the qualified, the lowest upper
bound of the reduction wins, then the lowest FD upper bound, then the highest accuracy lower bound. When none
qualifies, the baseline stays champion and its line says what would decide.</p>
<ul>{verdicts or "<li>no baseline metrics: nothing to compare with</li>"}</ul>
<div class="sections">{sections_html(sections_markdown)}</div>
<h2>Galleries</h2>
<p>Each generation beside its nearest training images, with its replication scores.</p>
{pictures}
</body></html>
"""


def sections_html(sections_markdown: str) -> str:
    """The Markdown sections (controls, detection, NeMo, MemControl, data, calibration, provenance) as HTML,
    each table in its own scrolling box."""
    body = markdown.markdown(sections_markdown, extensions=["tables"], output_format="html")
    return body.replace("<table>", "<div class='scroll'><table>").replace("</table>", "</table></div>")


def tradeoff_points(metrics: dict[str, dict[str, float]]) -> list[dict]:
    return [{"variant": v, "fd": m.get(TRADEOFF_X), "fd_low": m.get(f"{TRADEOFF_X}/{LOW}"), "fd_high": m.get(f"{TRADEOFF_X}/{HIGH}"),
             "replication_rate": m.get(TRADEOFF_Y), "replication_rate_low": m.get(f"{TRADEOFF_Y}/{LOW}"),
             "replication_rate_high": m.get(f"{TRADEOFF_Y}/{HIGH}")} for v, m in metrics.items()]


def tradeoff_png(points: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 6))
    shown = [p for p in points if p["fd"] is not None and p["replication_rate"] is not None]
    for p in shown:
        error = {}
        if p.get("fd_low") is not None and p.get("replication_rate_low") is not None:
            error = {"xerr": [[p["fd"] - p["fd_low"]], [p["fd_high"] - p["fd"]]],
                     "yerr": [[p["replication_rate"] - p["replication_rate_low"]], [p["replication_rate_high"] - p["replication_rate"]]]}
        ax.errorbar(p["fd"], p["replication_rate"], fmt="o", capsize=2, elinewidth=0.8, **error)
    ax.set_xlabel("FD, holdout prompts (lower is better)")
    ax.set_ylabel("replication rate, dup prompts (lower is better)")
    ax.set_title("memorization against quality (95% intervals)")
    fig.tight_layout()
    label_points(ax, [(p["fd"], p["replication_rate"], p["variant"]) for p in shown])
    fig.savefig(path, dpi=120)
    plt.close(fig)


def label_points(ax, points: list[tuple[float, float, str]], step: float = 4.0) -> None:
    """Name each point with a label that overlaps no other label and no point: each label takes the free
    place nearest its point, on a grid over the axes, with a leader line when it sits away from it."""
    figure = ax.figure
    renderer = figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    width, height = figure.bbox.width, figure.bbox.height
    centres = [ax.transData.transform((x, y)) for x, y, _ in points]
    taken = [(px - 4, py - 4, px + 4, py + 4) for px, py in centres]
    gx, gy = np.meshgrid(np.arange(frame.x0 + 2, frame.x1 - 2, step), np.arange(frame.y0 + 2, frame.y1 - 2, step))
    order = sorted(range(len(points)), key=lambda i: (-points[i][1], points[i][0]))
    for i in order:
        x, y, name = points[i]
        px, py = centres[i]
        probe = ax.text(0, 0, name, fontsize=8)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        w, h = extent.width + 2, extent.height + 2
        free = (gx + w <= frame.x1 - 2) & (gy + h <= frame.y1 - 2)
        for x0, y0, x1, y1 in taken:
            free &= ~((gx < x1) & (gx + w > x0) & (gy < y1) & (gy + h > y0))
        distance = np.where(free, np.hypot(gx + w / 2 - px, gy + h / 2 - py), np.inf)
        if not np.isfinite(distance.min()):
            continue  # no free place left: the point keeps no label rather than one over another
        row, col = np.unravel_index(distance.argmin(), distance.shape)
        left, bottom = gx[row, col], gy[row, col]
        ax.annotate(name, (x, y), xytext=((left + w / 2) / width, (bottom + h / 2) / height),
                    textcoords="figure fraction", fontsize=8, ha="center", va="center",
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if distance.min() > h else None)
        taken.append((left, bottom, left + w, bottom + h))


DETECTION_SCORES = ("wen_first", "wen_all", "memattn_e", "memattn_d", "nemo_ssim")


def detection_section(path: Path = DETECT_METRICS, localize: Path = LOCALIZE_METRICS) -> str:
    """The detect stage's AUROC and TPR@1%FPR per score, and NeMo's neuron counts, when those stages ran."""
    if not path.exists():
        return ""
    d = json.loads(path.read_text())
    lines = ["", "## Detection on the baseline", "",
             "| score | AUROC (measured) | TPR@1%FPR (measured) | AUROC (planted) | TPR@1%FPR (planted) |",
             "|---|---|---|---|---|"]
    for score in DETECTION_SCORES:
        keys = [f"detection/{score}/{k}" for k in ("auroc", "tpr_at_1pct_fpr", "planted_auroc", "planted_tpr_at_1pct_fpr")]
        lines.append(f"| {score} | " + " | ".join(_cell(d.get(k), k, d) for k in keys) + " |")
    lines.append("")
    if not d.get("prompts/dup"):
        lines.append("There is no dup group (no picture is trained on more than once), so the planted columns are empty.")
    lines.append("measured: prompts whose baseline generations replicate a training image, against the rest; "
                 "planted: dup prompts against holdout prompts. Memorized share (measured): "
                 + ", ".join(f"{g} {_cell(d.get(f'detection/memorized_share/{g}'))}" for g in ("dup", "unique", "holdout")))
    if localize.exists():
        n = json.loads(localize.read_text())
        lines += ["", "## NeMo neurons", "",
                  f"tau_mem {_cell(n['nemo/tau_mem'])}; memorized target prompts {n['nemo/memorized_prompts']:.0f}, "
                  f"localized {n['nemo/localized_prompts']:.0f}; median neurons per prompt {_cell(n['nemo/median_neurons'])}; "
                  f"union deactivated in evaluate@nemo: {n['nemo/union_neurons']:.0f} (table: reports/localize/neurons.md)"]
    return "\n".join(lines) + "\n"


def data_section(data: Path = DATA_METRICS, calibration: Path = CALIBRATION) -> str:
    """What prepare found (duplicate groups, planted pairs) and the calibrated thresholds, when they exist."""
    lines = []
    if data.exists():
        d = json.loads(data.read_text())
        lines += ["", "## Data", "",
                  f"{d['data/images']:.0f} images, {d['data/pictures']:.0f} distinct pictures; "
                  f"{d['data/duplicate_groups']:.0f} pictures with copies ({d['data/duplicate_files']:.0f} files, largest "
                  f"group {d['data/largest_group']:.0f}); planted pairs {d['data/planted_pairs']:.0f}; "
                  f"{d['data/target_duplicate_sample_share']:.0%} of the target training samples show a picture seen "
                  f"more than once; dup prompts available: {d['data/dup_prompts']:.0f}.",
                  "", f"The tune part, read only by the choices stages make from outputs (MemControl's study, "
                  f"select_loyal, NeMo's tau_mem, Wen's inference target) and never judged: "
                  f"{d.get('data/tune_pictures', 0):.0f} pictures never trained on and {d.get('data/tune_dup_pictures', 0):.0f} "
                  f"planted ones; judged dup prompts: {d.get('data/judged_dup_prompts', d['data/dup_prompts']):.0f}."]
        if not d["data/dup_prompts"]:
            lines.append("No picture is trained on more than once: there is no dup group, and no dup figures.")
    if calibration.exists():
        c = json.loads(calibration.read_text())
        lines += ["", "## Calibrated replication thresholds", "",
                  f"Each threshold flags {c['calibration/fpr_target']:.0%} of {c['calibration/calibration_images']:.0f} "
                  f"holdout images (real, never trained on) scored against the training set. Its false-positive rate "
                  f"is measured where it was not set: on the other {c['calibration/heldout_images']:.0f} holdout images, "
                  f"and on {c['calibration/generation_null_images']:.0f} generations of the pretrained model (which never "
                  "saw the target pictures) for target captions, the generation null. Exact 95% intervals.", "",
                  "| criterion | calibrated threshold | held-out FPR | generation null | published threshold | its holdout FPR |",
                  "|---|---|---|---|---|---|"]
        for name in ("sim", "nn_ratio", "rel_l2"):
            key = f"calibration/{name}"
            lines.append(f"| {name} | {c[f'{key}/threshold']:.3f} | {_cell(c.get(f'{key}/heldout_fpr'), f'{key}/heldout_fpr', c)} | "
                         f"{_cell(c.get(f'{key}/generation_null_rate'), f'{key}/generation_null_rate', c)} | "
                         f"{c[f'{key}/published_threshold']:.3f} | "
                         f"{_cell(c.get(f'{key}/published_holdout_fpr'), f'{key}/published_holdout_fpr', c)} |")
    return "\n".join(lines) + "\n" if lines else ""
