"""The removal benchmark with ground truth: is each video the one asked for, minus what its negative names?

Rows (benchmark_rows) ask the questions users ask, each on compositions held out of training (`held-out`,
world.held_out: no training draw, NASA-T's included, contains them) and, reported apart, on trained ones
(`in-distribution`):
  object         the negative names one object of the scene by colour and shape ("red circle")
  shared         it names one object of a scene holding another of its colour ("red square" beside a red
                 circle): only the named one goes
  colour         it names only a colour ("red"): every object of that colour goes
  shape          only a shape ("triangle"): every object of that shape goes, and only those
  absent         an object that is not there, sharing nothing with what is: the video must stay unchanged
  absent-shared  an absent object that shares an attribute with a present one ("red square" beside a red
                 circle): nothing may go
  two            two negatives at once, two objects of a scene of three or four
  mid-negative   a still scene; the object negative is sent after block MID_BLOCK: from the next block on, the
                 object must be gone
  mid-prompt     a still scene; the prompt is switched after block MID_BLOCK to one naming an extra object: from
                 the second block after the switch, the new object must be drawn (and the others kept); no
                 negative, so it is run once, without guidance
Every video is judged against the exact render of what was asked for (judge.py: every kept object in every
frame in its colour, shape, size, place and motion; no trace of what the negative names; nothing unprompted;
a clean picture), and its kept objects' pixel error against that render is the quality beside removal. The
absent rows also report how much the video changed from the one made without guidance (grey levels).
Per method: joint success per kind and split with a 95% bootstrap interval over the rows.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .judge import CORRUPTION_LIMIT, Span, judge, mean_change
from .world import COMPOSITIONS, HOME_X, LINE, MAX_OBJECTS, MOTIONS, compatible, held_out, scene_from_caption

# consistency of one detected object across the clip (the detector's calibration, `eval detector`)
PRESENT_FRAMES, SAME_SHAPE_FRAMES, AREA_TOLERANCE, MAX_STEP = 0.9, 0.9, 0.35, 3.0
KINDS = ("object", "shared", "colour", "shape", "absent", "absent-shared", "two", "mid-negative", "mid-prompt")
GUIDED_KINDS = KINDS[:-1]  # the prompt switch has no negative: it is the same video under every method
MID_BLOCK, MID_BLOCKS = 1, 4  # a mid-stream change is sent after this block, of a video of this many blocks
SPLITS = ("held-out", "in-distribution")


@dataclass(frozen=True)
class Row:
    """One question: `positive` with `negatives` (from the start, or from after block `change_after`), or for
    mid-prompt, `positive` switched to `switch_to` after block `change_after`."""
    kind: str
    split: str
    positive: str
    negatives: tuple[str, ...] = ()
    change_after: int | None = None
    switch_to: str | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.positive}|{','.join(self.negatives)}|{self.switch_to or ''}"


def _caption(names, motion) -> str:
    return " and ".join(f"a {n}" for n in names) + (f" moving {motion}" if motion else "")


def negative_of_kind(kind: str, names: list[str], rng: np.random.Generator):
    """The negatives a question of this kind asks of a composition (for mid-prompt: the new prompt's extra
    object), or None when the composition cannot ask it. Also NASA-T's training negatives (toy/train.py)."""
    colors = [n.split()[0] for n in names]
    shapes = [n.split()[1] for n in names]
    if kind in ("object", "mid-negative"):
        return (str(rng.choice(names)),)
    if kind == "shared":
        shared = [n for n, c in zip(names, colors) if colors.count(c) > 1]
        return (str(rng.choice(shared)),) if shared else None
    if kind == "colour":
        return (str(rng.choice(sorted(set(colors)))),)
    if kind == "shape":
        return (str(rng.choice(sorted(set(shapes)))),)
    absent = [n for n in LINE if n not in names]
    if kind == "absent":
        free = [n for n in absent if n.split()[0] not in colors and n.split()[1] not in shapes]
        return (str(rng.choice(free)),) if free else None
    if kind == "absent-shared":
        shared = [n for n in absent if n.split()[0] in colors or n.split()[1] in shapes]
        return (str(rng.choice(shared)),) if shared else None
    if kind == "two":
        return tuple(str(n) for n in rng.choice(names, size=2, replace=False)) if len(names) >= 3 else None
    if kind == "mid-prompt":
        free = [n for n in absent if compatible(list(names) + [n])]
        return (str(rng.choice(free)),) if free else None
    raise ValueError(kind)


def benchmark_rows(held_out_rows: int = 8, in_distribution_rows: int = 4, seed: int = 1234) -> list[Row]:
    """A fixed, distinct list: per kind, `held_out_rows` rows on held-out compositions and
    `in_distribution_rows` on trained ones, each a distinct (positive, negatives) question."""
    rng = np.random.default_rng(seed)
    compositions = {split: [] for split in SPLITS}
    for count in range(2, MAX_OBJECTS + 1):
        for names in COMPOSITIONS[count]:
            compositions["held-out" if held_out(names) else "in-distribution"].append(sorted(names))
    rows = []
    for split, wanted in (("held-out", held_out_rows), ("in-distribution", in_distribution_rows)):
        for kind in KINDS:
            seen, tries = set(), 0
            while len(seen) < wanted and tries < 500:
                tries += 1
                pool = compositions[split]
                names = list(pool[int(rng.integers(len(pool)))])
                names = [names[i] for i in rng.permutation(len(names))]
                asked = negative_of_kind(kind, names, rng)
                if asked is None:
                    continue
                still = kind.startswith("mid")
                motion = None if still else rng.choice([None, *MOTIONS])
                positive = _caption(names, motion)
                if kind == "mid-prompt":
                    row = Row(kind, split, positive, change_after=MID_BLOCK, switch_to=_caption(names + list(asked),
                                                                                                   None))
                else:
                    row = Row(kind, split, positive, asked, MID_BLOCK if kind == "mid-negative" else None)
                if row.key not in seen:
                    seen.add(row.key)
                    rows.append(row)
    return rows


def run_row(gen, row: Row, method: str, scale: float, seed: int) -> tuple[np.ndarray, list[Span]]:
    """Generate the row's video with the method; the spans of frames that must show what was asked."""
    scene = scene_from_caption(row.positive)
    if row.change_after is None:
        frames = np.concatenate([c.frames for c in gen.stream(row.positive, list(row.negatives) or None, scale,
                                                               method, seed=seed)])
        return frames, [Span(0, len(frames), scene, row.negatives)]
    from ..config import pixel_frames

    blocks = pixel_frames(MID_BLOCKS * gen.spec.video.frames_per_block, gen.temporal_stride)
    stream = gen.stream(row.positive, None, scale if row.negatives else None, method, seed=seed, frames=blocks,
                        rolling=True)
    made, ends = [], []
    for chunk in stream:
        made.append(chunk.frames)
        ends.append(sum(len(m) for m in made))
        if len(made) == row.change_after:
            if row.switch_to is not None:
                stream.set_prompt(row.switch_to)
            else:
                stream.set_negative(list(row.negatives), scale)
    frames = np.concatenate(made)
    change = ends[row.change_after - 1]
    if row.switch_to is not None:  # the second block after the switch on shows the new scene
        return frames, [Span(0, change, scene), Span(ends[row.change_after], len(frames),
                                                     scene_from_caption(row.switch_to))]
    return frames, [Span(0, change, scene), Span(change, len(frames), scene, row.negatives)]


def score_row(gen, row: Row, method: str, scale: float, seed: int, references: dict | None = None) -> dict:
    """The judge's scores of the row's video; for the absent kinds also its mean change from the same row and
    seed without guidance. references: (row key, seed) -> that video, filled as they are made, so each is made
    once per run whatever the number of methods (made here when missing)."""
    frames, spans = run_row(gen, row, method, scale, seed)
    scores = judge(frames, spans)
    if row.kind in ("absent", "absent-shared"):
        references = {} if references is None else references
        if method == "none":
            references[row.key, seed] = frames
        elif (row.key, seed) not in references:
            references[row.key, seed] = run_row(gen, row, "none", 0.0, seed)[0]
        scores["change"] = mean_change(frames, references[row.key, seed])
    return scores


def object_consistent(track: list) -> bool:
    """track: per frame, the object's region or None (object_tracks). Does it stay one object?"""
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


def object_tracks(found: list) -> dict[str, list]:
    """found: regions() of each frame. Per object name, in each frame the largest region of its colour whose
    centroid is nearer its place (world.HOME_X) than any other place of that colour's objects (None where none
    is): a region is the object whose place it sits at, so two objects of one colour are told apart."""
    tracks = {name: [None] * len(found) for name in LINE}
    for f, frame in enumerate(found):
        for region in frame:  # largest first: keep the first each object gets
            name = min((n for n in LINE if n.startswith(region.color + " ")), key=lambda n: abs(HOME_X[n] - region.x))
            if tracks[name][f] is None:
                tracks[name][f] = region
    return tracks


def video_consistent(found: list) -> bool:
    """found: regions() of each frame. Does every object detected in at least half the frames stay one object?"""
    tracks = object_tracks(found)
    detected = [n for n, track in tracks.items() if sum(r is not None for r in track) >= len(found) / 2]
    return all(object_consistent(tracks[n]) for n in detected)


def bootstrap(values_by_row: list[list[float]], rng: np.random.Generator, draws: int = 2000) -> tuple[float, float]:
    """95% interval of the mean over rows (each row's videos averaged), resampling rows: a row's seeds share
    its question, so they are not independent draws."""
    means = np.array([np.mean(v) for v in values_by_row], np.float64)
    if len(means) < 2:
        return float(means.mean()), float(means.mean())
    picks = rng.integers(0, len(means), (draws, len(means)))
    boot = means[picks].mean(1)
    return float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def summarise(method: str, scale: float, scored: list[tuple[Row, list[dict]]]) -> dict:
    """Shares over the rows' videos (kept: share of kept objects; corruption: mean share of pixels; kept_error,
    change: mean grey levels) and joint success's bootstrap interval."""
    flat = [s for _, scores in scored for s in scores]
    mean = lambda key: float(np.mean([s[key] for s in flat if key in s])) if any(key in s for s in flat) else None  # noqa: E731
    low, high = bootstrap([[s["joint"] for s in scores] for _, scores in scored], np.random.default_rng(0))
    return {"method": method, "scale": scale, "rows": len(scored), "videos": len(flat),
            "joint_success": mean("joint"), "joint_low": low, "joint_high": high, "success": mean("removed"),
            "retention": mean("kept"), "unprompted": mean("unprompted"), "corruption": mean("corruption"),
            "kept_error": mean("kept_error"), "change": mean("change")}


def run_removal(gen, methods: list[tuple[str, float]], rows: list[Row] | None = None, seeds=(0, 1),
                progress: bool = True, resume: str | Path | None = None, model: str = "") -> dict:
    """methods: (guidance name, scale) list. Returns {"methods": {label: the held-out guided rows' summary},
    "kinds": {label: {split: {kind: summary}}}, ...}. The prompt-switch rows run once, without guidance, and are
    reported under "none" (or the first method without it). resume: a JSON-lines file of finished videos' scores, appended to as each video is
    scored and read back first, so an interrupted run keeps its work and continues; model (weights_fingerprint)
    keys them, so scores of other weights are never mixed in."""
    from tqdm import tqdm

    rows = rows if rows is not None else benchmark_rows()
    done = _read_scores(resume)
    switch_method = next((m for m in methods if m[0] == "none"), methods[0])  # runs the prompt-switch rows
    jobs = [(m, r, s) for m in methods for r in rows for s in seeds
            if (r.kind in GUIDED_KINDS or m == switch_method) and asks(m, r)]
    log = open(resume, "a") if resume else None
    references: dict = {}  # the absent rows' videos without guidance, made once each
    try:
        for (method, scale), row, seed in tqdm(jobs, desc="removal", disable=not progress):
            key = _key(model, method, scale, row, seed)
            if key in done:
                continue
            with warnings.catch_warnings():  # a colour- or shape-only negative is a question here, not a slip
                warnings.filterwarnings("ignore", message=".*names no shape")
                done[key] = score_row(gen, row, method, scale, seed, references)
            if log:
                log.write(json.dumps({"key": key, **done[key]}) + "\n")
                log.flush()
    finally:
        if log:
            log.close()
    kinds, results = {}, {}
    for method, scale in methods:
        name = label(method, scale)
        by = {split: {kind: [] for kind in KINDS} for split in SPLITS}
        for row in rows:
            scores = [done[_key(model, method, scale, row, s)] for s in seeds
                      if _key(model, method, scale, row, s) in done]
            if scores:
                by[row.split][row.kind].append((row, scores))
        kinds[name] = {split: {kind: summarise(method, scale, scored) for kind, scored in by[split].items() if scored}
                       for split in SPLITS}
        guided = [x for kind in GUIDED_KINDS for x in by["held-out"][kind]]
        if guided:
            results[name] = summarise(method, scale, guided)
    return {"rows": len(rows), "seeds": list(seeds), "corruption_limit": CORRUPTION_LIMIT,
            "kinds_asked": list(KINDS), "methods": results, "kinds": kinds}


def asks(method: tuple[str, float], row: Row) -> bool:
    """Can the method ask this row at its scale? CFG takes one negative; two negatives at weight 1 subtract twice
    the scale, which a method's range may not allow (NASA's alpha x 2 <= 3): such rows are left out of its
    figures (a "-" in the table)."""
    from ..errors import UserError
    from ..guidance import make_guidance

    name, scale = method
    if name == "none" or len(row.negatives) < 2:
        return True
    try:
        method = make_guidance(name)
        method.check_negatives(len(row.negatives))
        method.check_weights([1.0] * len(row.negatives), [scale])
    except UserError:
        return False
    return True


def _key(model: str, method: str, scale: float, row: Row, seed: int) -> str:
    return f"{model}|{label(method, scale)}|{row.key}|{seed}"


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


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    return f"{100 * r['joint_success']:.0f}% [{100 * r['joint_low']:.0f}, {100 * r['joint_high']:.0f}]"


def markdown_table(result: dict) -> str:
    """Two tables: per method, the held-out guided rows' scores; then joint success per kind and split (95%
    bootstrap intervals over rows)."""
    lines = ["| method | scale | joint success [95%] | removed | kept | unprompted | corruption | kept error | "
             "absent: change | videos |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["methods"].items():
        scale = "-" if r["method"] == "none" else f"{r['scale']:g}"
        absent = [result["kinds"][name]["held-out"].get(k) for k in ("absent", "absent-shared")]
        change = [a["change"] for a in absent if a and a["change"] is not None]
        lines.append(f"| {r['method']} | {scale} | {_cell(r)} | {100 * r['success']:.1f}% | "
                     f"{100 * r['retention']:.1f}% | {100 * r['unprompted']:.1f}% | {100 * r['corruption']:.2f}% | "
                     f"{r['kept_error']:.2f} | {np.mean(change) if change else float('nan'):.2f} | {r['videos']} |")
    kinds = result["kinds_asked"]
    lines += ["", "| method | split | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for name, splits in result["kinds"].items():
        for split, by_kind in splits.items():
            if by_kind:
                lines.append(f"| {name} | {split} | " + " | ".join(_cell(by_kind.get(k)) for k in kinds) + " |")
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
