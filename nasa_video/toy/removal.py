"""The removal benchmark with ground truth: does the negative object stay out of the video, do the other
named objects stay in, does nothing else appear, and does the picture stay clean and steady?

For each of a fixed set of prompt pairs (the positive names 2-3 objects, the negative names one of them by
colour and shape) and several seeds, every method/scale generates a video with the bundled model; the pixel
detector (nasa_video/toy/detect.py) reads each frame. Per video:
  removed     no region of the negative's colour of object size (whatever its shape) in at least 90% of frames:
              the negative's attribute must be gone, not only its exact outline
  retained    each other named object (its colour in its shape) in at least 75% of frames (share over them)
  unprompted  in at least 25% of frames, an object-size region nobody asked for: a colour the positive does not
              name, or a second region of a named colour
  corruption  share of pixels explained neither by the background nor by a detected object
  consistent  every detected object keeps its identity: present in 90% of frames, one shape in 90% of them,
              its area within 35% of its median, and a smooth track (at most 3 px per frame; the world moves 1)
  joint       removed AND every other object retained AND nothing unprompted AND corruption at most 2%:
              the headline figure
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np

from .detect import corruption, detect, regions
from .world import COLORS, MOTIONS, SHAPES

REMOVED_FRAMES = 0.9
RETAINED_FRAMES = 0.75
UNPROMPTED_FRAMES = 0.25
CORRUPTION_LIMIT = 0.02
# consistency of one detected object across the clip
PRESENT_FRAMES, SAME_SHAPE_FRAMES, AREA_TOLERANCE, MAX_STEP = 0.9, 0.9, 0.35, 3.0


def prompt_pairs(count: int = 48, seed: int = 1234) -> list[tuple[str, str, list[str]]]:
    """A fixed list of (positive, negative, other objects); half with 2 objects, half with 3, in random order,
    the scene still or moving; the negative names one of them by colour and shape ("red circle")."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(count):
        n = 2 if i % 2 == 0 else 3
        colors = rng.choice(list(COLORS), size=n, replace=False)
        names = [f"{c} {rng.choice(SHAPES)}" for c in colors]
        motion = rng.choice([None, *MOTIONS])
        negative = names[i % n]
        positive = " and ".join(f"a {name}" for name in names) + (f" moving {motion}" if motion else "")
        pairs.append((positive, negative, [x for x in names if x != negative]))
    return pairs


def object_consistent(track: list) -> bool:
    """track: per frame, the colour's largest region or None. Does it stay one object?"""
    present = [r for r in track if r is not None]
    if len(present) < PRESENT_FRAMES * len(track):
        return False
    shapes = [r.shape for r in present]
    most_common = max(shapes.count(s) for s in set(shapes))
    if most_common < SAME_SHAPE_FRAMES * len(present) or shapes.count(None) > len(shapes) / 2:
        return False
    areas = np.array([r.area for r in present], np.float32)
    if np.abs(areas / np.median(areas) - 1).max() > AREA_TOLERANCE:
        return False
    steps = [np.hypot(a.x - b.x, a.y - b.y) for a, b in zip(track, track[1:]) if a is not None and b is not None]
    return not steps or max(steps) <= MAX_STEP


def colour_tracks(found: list) -> dict[str, list]:
    """found: regions() of each frame. Per palette colour, its first region in each frame (None where absent)."""
    return {c: [next((r for r in frame if r.color == c), None) for frame in found] for c in COLORS}


def video_consistent(found: list) -> bool:
    """found: regions() of each frame. Does every colour detected in at least half the frames stay one object?"""
    tracks = colour_tracks(found)
    detected = [c for c, track in tracks.items() if sum(r is not None for r in track) >= len(found) / 2]
    return all(object_consistent(tracks[c]) for c in detected)


def score_video(frames: np.ndarray, negative: str, others: list[str]) -> dict:
    """The per-video scores above, each in [0, 1]."""
    found = regions(frames)
    seen = detect(frames, found)
    negative_color = negative.split()[0]
    named = {negative_color} | {o.split()[0] for o in others}
    negative_there = np.array([any(r.color == negative_color for r in frame) for frame in found])
    extra = []
    for frame in found:
        counts = {c: sum(r.color == c for r in frame) for c in COLORS}
        extra.append(any(counts[c] > (1 if c in named else 0) for c in COLORS if c != negative_color))
    retained = [seen[o].mean() >= RETAINED_FRAMES for o in others]
    out = {
        "removed": float(negative_there.mean() <= 1 - REMOVED_FRAMES),
        "retained": float(np.mean(retained)),
        "unprompted": float(np.mean(extra) >= UNPROMPTED_FRAMES),
        "corruption": corruption(frames, found),
        "consistent": float(video_consistent(found)),
        "negative_frames": float(negative_there.mean()),
    }
    out["joint"] = float(out["removed"] and all(retained) and not out["unprompted"]
                         and out["corruption"] <= CORRUPTION_LIMIT)
    return out


def summarise(method: str, scale: float, scores: list[dict]) -> dict:
    """One method's row: shares over its videos (corruption: the mean share of pixels)."""
    mean = lambda key: float(np.mean([s[key] for s in scores]))  # noqa: E731
    return {"method": method, "scale": scale, "videos": len(scores), "joint_success": mean("joint"),
            "success": mean("removed"), "retention": mean("retained"), "unprompted": mean("unprompted"),
            "consistency": mean("consistent"), "corruption": mean("corruption"),
            "negative_frames": mean("negative_frames")}


def run_removal(gen, methods: list[tuple[str, float]], pairs=None, seeds=(0, 1, 2, 3),
                progress: bool = True, resume: str | Path | None = None, model: str = "") -> dict:
    """methods: (guidance name, scale) list. Returns {"methods": {label: {joint_success, success, retention,
    unprompted, consistency, corruption, ...}}}. resume: a JSON-lines file of finished videos' scores, appended
    to as each video is scored and read back first, so an interrupted run keeps its work and continues; model
    (weights_fingerprint) keys them, so scores of other weights are never mixed in."""
    from tqdm import tqdm

    pairs = pairs or prompt_pairs()
    done = _read_scores(resume)
    jobs = list(itertools.product(methods, pairs, seeds))
    log = open(resume, "a") if resume else None
    try:
        for (method, scale), (positive, negative, others), seed in tqdm(jobs, desc="removal", disable=not progress):
            key = _key(model, method, scale, positive, negative, seed)
            if key in done:
                continue
            frames = np.concatenate([c.frames for c in gen.stream(positive, negative, scale, method, seed=seed)])
            done[key] = score_video(frames, negative, others)
            if log:
                log.write(json.dumps({"key": key, **done[key]}) + "\n")
                log.flush()
    finally:
        if log:
            log.close()
    results = {}
    for method, scale in methods:
        scores = [done[_key(model, method, scale, p, n, s)] for (p, n, _), s in itertools.product(pairs, seeds)]
        results[label(method, scale)] = summarise(method, scale, scores)
    return {"pairs": len(pairs), "seeds": list(seeds), "removed_if_absent_in": REMOVED_FRAMES,
            "retained_if_present_in": RETAINED_FRAMES, "unprompted_if_in": UNPROMPTED_FRAMES,
            "corruption_limit": CORRUPTION_LIMIT, "methods": results}


def _key(model: str, method: str, scale: float, positive: str, negative: str, seed: int) -> str:
    return f"{model}|{label(method, scale)}|{positive}|{negative}|{seed}"


def weights_fingerprint(cfg) -> str:
    """The model's name and a hash of its generator weights: what a saved score belongs to."""
    import hashlib

    from ..loading import bundled_path

    path = bundled_path(cfg, str(cfg.weights.generator))
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12] if path.exists() else "none"
    return f"{cfg.name}:{digest}"


def _read_scores(path) -> dict[str, dict]:
    """The finished videos of an earlier run; a line cut short by an interruption is skipped (redone)."""
    if not path or not Path(path).exists():
        return {}
    done = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[record.pop("key")] = record
    return done


def label(method: str, scale: float) -> str:
    return method if method == "none" else f"{method}@{scale:g}"


def markdown_table(result: dict) -> str:
    lines = ["| method | scale | joint success | removed | retention | unprompted | consistency | corruption "
             "| videos |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["methods"].values():
        scale = "-" if r["method"] == "none" else f"{r['scale']:g}"
        lines.append(f"| {r['method']} | {scale} | {100 * r['joint_success']:.1f}% | {100 * r['success']:.1f}% | "
                     f"{100 * r['retention']:.1f}% | {100 * r['unprompted']:.1f}% | {100 * r['consistency']:.1f}% | "
                     f"{100 * r['corruption']:.2f}% | {r['videos']} |")
    return "\n".join(lines)


def plot_sweep(result: dict, path: str | Path) -> bool:
    """PNG: joint success, removal and retention against alpha (none drawn at alpha = 0), drawn with Pillow."""
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
    for key, color in (("joint_success", (20, 140, 40)), ("success", (200, 30, 30)), ("retention", (30, 80, 200))):
        points = [xy(a, r[key]) for a, r in rows]
        draw.line(points, fill=color, width=3)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    draw.text((pad + 10, 12), "joint success", fill=(20, 140, 40))
    draw.text((pad + 130, 12), "removed", fill=(200, 30, 30))
    draw.text((pad + 220, 12), "retention", fill=(30, 80, 200))
    tmp = Path(path).with_name(f".{Path(path).name}.partial.png")
    img.save(tmp)
    os.replace(tmp, path)
    return True
