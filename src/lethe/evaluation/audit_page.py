"""The audit's page: the answer first, then the training images by risk beside their closest generations,
then the histogram of risk scores and the prompts. One self-contained HTML file (thumbnails inline)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

THUMBNAIL = 96  # pixels on the page: small digits are enlarged, large photographs shrunk


def thumbnail(image: np.ndarray) -> str:
    """A uint8 C x H x W image as an inline PNG."""
    pixels = np.asarray(image).transpose(1, 2, 0)
    picture = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
    scale = THUMBNAIL / max(picture.size)
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), resample)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def risk_histogram(risks: list[float], cut: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.hist(risks, bins=np.linspace(0, 1, 41), color="#4c72b0")
    ax.axvline(cut, color="#c44e52", linestyle="--", label=f"reproduced above {cut:.3f}")
    ax.set_xlabel("risk = 1 - relative L2 of the closest generation")
    ax.set_ylabel("training images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _share(metrics: dict, key: str) -> str:
    return f"{metrics[key]:.1%} [{metrics[key + '/ci_low']:.1%}, {metrics[key + '/ci_high']:.1%}]"


def null_line(null: dict | None, variant: str | None) -> str:
    """The generation null beside the guarantee: generations that copy nothing, and the share flagged."""
    if null is None and variant is None:
        return ("Generation null: not measured for this model (it needs generations by a model that never saw "
                "these images; <code>lethe calibrate</code> makes them for the pipeline's own variants).")
    if null is None:
        return ("Generation null: not measured (<code>metrics/calibration.json</code> has none; "
                "run <code>dvc repro calibrate</code>).")
    return (f"Generation null: the pretrained model, which never saw the target pictures, made {int(null['images'])} "
            f"images for their captions; the relative L2 threshold {null['threshold']:.3f}, calibrated by "
            f"<code>lethe calibrate</code> to flag {null['fpr_target']:.0%} of held-out images, flags "
            f"{null['rate']:.1%} [{null['ci_low']:.1%}, {null['ci_high']:.1%}] of them (95% interval): the "
            "false-positive rate on generations that copy nothing, at that threshold rather than this audit's.")


def summary_lines(summary: dict) -> list[str]:
    m = summary["metrics"]
    lines = [f"<b>{int(m['audit/reproduced'])} of {int(m['audit/images'])}</b> training images reproduced "
             f"(estimated share {_share(m, 'audit/reproduced_share')}, 95% interval)."]
    if summary["mode"] == "screen":
        missed = m["audit/missed_estimate"]
        estimate = (f"From a random sample of the rest, the screen missed an estimated {missed:.1f} images "
                    f"[{m['audit/missed_estimate/ci_low']:.1f}, {m['audit/missed_estimate/ci_high']:.1f}]."
                    if missed == missed else f"No random sample of the rest (audit.random_share 0): up to "
                    f"{m['audit/missed_estimate/ci_high']:.0f} images were not looked at.")
        lines.append(f"Screen mode: all {int(m['audit/prompts'])} prompts scored by Wen's first-step noise magnitude; "
                     f"{int(m['audit/prompts_generated'])} generated ({int(m['audit/generations'])} images, "
                     f"{m['audit/generation_share']:.0%} of what full mode generates). {estimate}")
    else:
        lines.append(f"Full mode: every one of {int(m['audit/prompts'])} prompts generated ({int(m['audit/generations'])} images).")
    if m["audit/threshold_calibrated"]:
        lines.append(f"Threshold {m['audit/threshold']:.3f} (relative L2), calibrated on {int(m['audit/holdout_images'])} "
                     f"held-out images: a generation that copies nothing passes with probability at most "
                     f"{m['audit/generation_rate']:.2%}, so images never memorized are flagged at an expected share of "
                     f"at most {summary['fpr']:.0%}.")
    else:
        lines.append(f"Threshold {m['audit/threshold']:.3f}: the published one. No held-out images were given, so its "
                     "false-positive rate on these images is unknown; pass --holdout to calibrate it.")
    lines.append(null_line(summary.get("generation_null"), summary.get("variant")))
    if "audit/planted_recall" in m:
        others = f"; other images flagged {_share(m, 'audit/other_flagged_share')}" if "audit/other_flagged_share" in m else ""
        lines.append(f"Ground truth (planted duplicates): recall {_share(m, 'audit/planted_recall')}{others}.")
    if summary.get("inference"):
        lines.append(f"The model applies {', '.join(summary['inference'])} while it generates; the screen scores "
                     "it without (Wen's first step on the plain U-Net).")
    return lines


def audit_page(summary: dict, shown: list[tuple[dict, np.ndarray, list[np.ndarray]]], prompts: list[dict],
               histogram: Path) -> str:
    """shown: per training image, its entry in audit.json, its pixels and its closest generations' pixels."""
    rows = []
    for entry, image, closest in shown:
        generations = "".join(
            f"<figure title='{html.escape(c['prompt'])}'><img src='{thumbnail(g)}' alt='generation'><figcaption>{html.escape(c['prompt'][:40])}<br>"
            f"seed {c['seed']} · rel. L2 {c['relative_l2']:.3f}</figcaption></figure>"
            for g, c in zip(closest, entry["closest"]))
        verdict = "<span class='bad'>reproduced</span>" if entry["reproduced"] else "not reproduced"
        rows.append(f"<tr><td><figure><img src='{thumbnail(image)}' alt='training image'><figcaption>"
                    f"{html.escape(entry['file_name'])}</figcaption></figure></td>"
                    f"<td class='text'>{html.escape(entry['caption'])}</td><td>{entry['risk']:.3f}</td><td>{verdict}</td>"
                    f"<td>{entry['screen']:.3f}{'' if entry['caption_generated'] else ' (not generated)'}</td>"
                    f"<td class='gens'>{generations}</td></tr>")
    ranked = sorted(prompts, key=lambda p: -p["screen"])
    prompt_rows = "".join(f"<tr><td class='text'>{html.escape(p['prompt'])}</td><td>{p['source']}</td><td>{p['screen']:.3f}</td>"
                          f"<td>{p['selected']}</td><td>{p['generations']}</td><td>{p['copies']}</td></tr>" for p in ranked)
    title = f"lethe audit: {summary['name']}"
    plot = "data:image/png;base64," + base64.b64encode(histogram.read_bytes()).decode()
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; font-size: 0.85rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.5rem; text-align: right; vertical-align: middle; }}
td.text {{ text-align: left; max-width: 18rem; }}
td.gens {{ text-align: left; white-space: nowrap; }}
figure {{ display: inline-block; margin: 0.2rem; text-align: center; font-size: 0.7rem; }}
figure img {{ width: {THUMBNAIL}px; height: {THUMBNAIL}px; image-rendering: pixelated; border: 1px solid #ddd; }}
.bad {{ color: #b00020; font-weight: bold; }}
.answer {{ font-size: 1.1rem; background: #f6f6f6; padding: 0.8rem; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Model <code>{html.escape(str(summary['model']))}</code>{f" with LoRA <code>{html.escape(str(summary['lora']))}</code>" if summary['lora'] else ""};
training images <code>{html.escape(summary['images'])}</code>.</p>
<div class="answer">{"<br>".join(summary_lines(summary))}</div>
<h2>Training images by risk</h2>
<p>Each training image beside the generations closest to it. Relative L2 (Carlini et al.): the distance from a
generation to this image over its mean distance to its nearest training images; risk = 1 − the lowest.</p>
<table><tr><th>training image</th><th>caption</th><th>risk</th><th>verdict</th><th>screen score</th><th>closest generations</th></tr>
{"".join(rows)}</table>
<h2>Risk scores</h2>
<img src="{plot}" alt="histogram of risk scores">
<h2>Prompts</h2>
<p>Every prompt by its screen score (Wen's first-step noise magnitude): whether it was generated, how often, and
how many of its generations were copies.</p>
<table><tr><th>prompt</th><th>source</th><th>screen</th><th>selected</th><th>generations</th><th>copies</th></tr>
{prompt_rows}</table>
</body></html>
"""
