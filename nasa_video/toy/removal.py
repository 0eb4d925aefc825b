"""The removal benchmark with ground truth: does the negative object stay out of the video, do the other
named objects stay in, and does the picture stay clean?

For each of a fixed set of prompt pairs (the positive names 2-3 objects, the negative names one of them)
and several seeds, every method/scale generates a video with the bundled model; the pixel detector then
reads each frame. Per video:
  removed   the negative object is absent in at least 90% of frames
  retained  each other named object is present in at least 50% of frames (share over those objects)
  corruption share of pixels explained neither by the background nor by a palette colour
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from .detect import corruption, detect
from .world import COLORS, SHAPES

REMOVED_FRAMES = 0.9
RETAINED_FRAMES = 0.5


def prompt_pairs(count: int = 48, seed: int = 1234) -> list[tuple[str, str, list[str]]]:
    """A fixed list of (positive, negative, other objects); half with 2 objects, half with 3."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(count):
        n = 2 if i % 2 == 0 else 3
        colors = rng.choice(list(COLORS), size=n, replace=False)
        names = [f"{c} {rng.choice(SHAPES)}" for c in colors]
        negative = names[i % n]
        positive = " and ".join(f"a {name}" for name in names)
        pairs.append((positive, negative, [x for x in names if x != negative]))
    return pairs


def score_video(frames: np.ndarray, negative: str, others: list[str]) -> dict:
    seen = detect(frames)
    return {
        "removed": float(seen[negative].mean() <= 1 - REMOVED_FRAMES),
        "retained": float(np.mean([seen[o].mean() >= RETAINED_FRAMES for o in others])),
        "corruption": corruption(frames),
        "negative_frames": float(seen[negative].mean()),
    }


def run_removal(gen, methods: list[tuple[str, float]], pairs=None, seeds=(0, 1, 2, 3),
                progress: bool = True) -> dict:
    """methods: (guidance name, scale) list. Returns {"methods": {name: {success, retention, corruption, ...}}}."""
    from tqdm import tqdm

    pairs = pairs or prompt_pairs()
    jobs = list(itertools.product(methods, pairs, seeds))
    per_method: dict[str, list[dict]] = {}
    for (method, scale), (positive, negative, others), seed in tqdm(jobs, desc="removal", disable=not progress):
        frames = np.concatenate([c.frames for c in gen.stream(positive, negative, scale, method, seed=seed)])
        per_method.setdefault(label(method, scale), []).append(score_video(frames, negative, others))
    results = {}
    for (method, scale) in methods:
        scores = per_method[label(method, scale)]
        results[label(method, scale)] = {
            "method": method, "scale": scale, "videos": len(scores),
            "success": float(np.mean([s["removed"] for s in scores])),
            "retention": float(np.mean([s["retained"] for s in scores])),
            "corruption": float(np.mean([s["corruption"] for s in scores])),
            "negative_frames": float(np.mean([s["negative_frames"] for s in scores])),
        }
    return {"pairs": len(pairs), "seeds": list(seeds), "removed_if_absent_in": REMOVED_FRAMES,
            "retained_if_present_in": RETAINED_FRAMES, "methods": results}


def label(method: str, scale: float) -> str:
    return method if method == "none" else f"{method}@{scale:g}"


def markdown_table(result: dict) -> str:
    lines = ["| method | scale | removal success | retention | corruption | videos |",
             "|---|---|---|---|---|---|"]
    for name, r in result["methods"].items():
        scale = "-" if r["method"] == "none" else f"{r['scale']:g}"
        lines.append(f"| {r['method']} | {scale} | {100 * r['success']:.1f}% | {100 * r['retention']:.1f}% | "
                     f"{100 * r['corruption']:.2f}% | {r['videos']} |")
    return "\n".join(lines)


def plot_sweep(result: dict, path: str | Path) -> bool:
    """PNG: removal success and retention against alpha (none drawn at alpha = 0), drawn with Pillow."""
    from PIL import Image, ImageDraw

    rows = sorted(((0.0 if r["method"] == "none" else r["scale"], r) for r in result["methods"].values()
                   if r["method"] in ("none", "nasa")), key=lambda x: x[0])
    if not rows:
        return False  # the plot is NASA's alpha sweep; nothing to draw without none / nasa rows
    width, height, pad = 560, 360, 50
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    x_max = max(a for a, _ in rows) or 1.0

    def xy(alpha, value):
        return (pad + (width - 2 * pad) * alpha / x_max, height - pad - (height - 2 * pad) * value)

    draw.line([xy(0, 0), xy(x_max, 0)], fill="black")
    draw.line([xy(0, 0), xy(0, 1)], fill="black")
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        x, y = xy(0, v)
        draw.text((x - 34, y - 6), f"{int(v * 100)}%", fill="black")
        draw.line([xy(0, v), xy(x_max, v)], fill=(225, 225, 225))
    for alpha, _ in rows:
        x, y = xy(alpha, 0)
        draw.text((x - 8, y + 6), f"{alpha:g}", fill="black")
    draw.text((width / 2 - 40, height - 22), "NASA alpha (0 = none)", fill="black")
    for key, color in (("success", (200, 30, 30)), ("retention", (30, 80, 200))):
        points = [xy(a, r[key]) for a, r in rows]
        draw.line(points, fill=color, width=3)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    draw.text((pad + 10, 12), "removal success", fill=(200, 30, 30))
    draw.text((pad + 150, 12), "retention", fill=(30, 80, 200))
    tmp = Path(path).with_name(f".{Path(path).name}.partial.png")
    img.save(tmp)
    os.replace(tmp, path)
    return True
