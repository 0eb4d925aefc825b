"""Is the video the one asked for, minus what the negative names? A judge with the world's ground truth.

The bundled world's caption fixes the picture, so the video a negative asks for is known exactly: the positive's
scene without the objects the negative names, rendered (world.render). The judge compares a generated video with
that render, frame by frame, over the frames it is asked about (a change sent mid-stream is judged from the block
that must show it):

  kept        every object the negative leaves must be in every judged frame: its colour, its size (area within
              AREA_RATIO of what the render shows of it) and its place on the caption's path (centroid within
              POSITION_PX of the render's: its place on the line, the motion and its direction, the frame order;
              where an object over it hides part of it, only what shows is compared), and its shape (no other shape's template
              fits it better by SHAPE_MARGIN on average, SHAPE_FRAME_MARGIN in a frame). One frame missing, a
              wrong place, a still object that should move, jitter past POSITION_PX: that object is not kept.
  trace       no visible trace of a removed object, of any size, strength or duration: in its footprint (its
              render's outline, grown by TRACE_MARGIN px, less the kept objects), TRACE_PIXELS pixels at least
              TRACE_AMOUNT of the way from the expected picture to its colour, in any one frame, are a trace.
  unprompted  nothing else appears, of any colour: a solid BLOB x BLOB block of pixels (survives a BLOB x BLOB
              opening) more than BLOB_DIFF from the render in any judged frame is an object nobody asked for
              (thin edges from a shape drawn a pixel off do not count; a second copy, a stray colour, the negative
              drawn elsewhere, a kept object far off its place do; a removed object left in its place is a
              trace, not this).
  corruption  share of pixels the pixel detector explains by neither the background nor an object (detect.py)
  joint       every object kept, no trace, nothing unprompted, corruption at most CORRUPTION_LIMIT
  kept_error  mean absolute error (grey levels, 0-255) on the kept objects' rendered pixels: how unharmed
              they are (the toy analogue of a quality score)

Thresholds and their calibration (`nasa-video eval judge`, tests/test_removal_metric.py): exact renders pass;
renders degraded like generated frames (world.degrade: blur, noise, a colour shift; and jittered shapes) pass
at the rate the calibration states; every hand-made failure class fails.

Which objects a negative names (`names`): a negative is a colour, a shape, or both ("red", "triangle", "red
circle"); it names every object with those attributes, and a negative naming nothing in the scene asks for the
video unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .detect import COLOR_DISTANCE, color_masks, connected_regions, corruption, dilate, regions, shape_ious, toward
from .world import COLORS, SHAPES, Scene, Thing, positions, render, shape_mask

POSITION_PX = 2.0      # a kept object's centroid within this of its rendered centroid (the world moves 1 px/frame)
AREA_RATIO = 1.45      # its area within this factor of the render's (a 1.5x-wide object has 2.25x the area)
SHAPE_MARGIN = 0.05    # another shape's template may fit it this much better (IoU) on average over the frames,
SHAPE_FRAME_MARGIN = 0.2  # and this much in any one frame
TRACE_MARGIN = 2       # px around a removed object's outline that are still its footprint
TRACE_AMOUNT = 0.3     # of the way from the expected pixel to the removed object's colour
TRACE_PIXELS = 5       # pixels of that in one frame make a trace
BLOB_DIFF = 70.0       # RGB distance from the render that a pixel of an unprompted object has
BLOB = 3               # an unprompted object is at least a solid BLOB x BLOB block of such pixels
CORRUPTION_LIMIT = 0.02


def names(negative: str, things) -> list[Thing]:
    """The objects a negative names: every thing whose colour and shape agree with the ones the negative gives."""
    words = negative.lower().split()
    colors = [w for w in words if w in COLORS]
    shapes = [w for w in words if w in SHAPES]
    if not colors and not shapes:
        return []
    return [t for t in things if (not colors or t.color in colors) and (not shapes or t.shape in shapes)]


def expected_scene(scene: Scene, negatives) -> tuple[Scene, list[Thing]]:
    """The scene the negatives ask for (the positive's, without what they name) and the things they take out."""
    removed = {t for negative in negatives for t in names(negative, scene.things)}
    kept = tuple(t for t in scene.things if t not in removed)
    return Scene(kept, scene.caption), [t for t in scene.things if t in removed]


@dataclass(frozen=True)
class Span:
    """Frames [start, stop) that must show `scene` without what `negatives` name."""
    start: int
    stop: int
    scene: Scene
    negatives: tuple[str, ...] = ()


def _opened(mask: np.ndarray, size: int) -> np.ndarray:
    """bool [..., H, W]: the pixels of solid size x size blocks of the mask (erosion, then dilation)."""
    h, w = mask.shape[-2:]
    solid = np.ones(mask.shape[:-2] + (h - size + 1, w - size + 1), bool)
    for dy in range(size):
        for dx in range(size):
            solid &= mask[..., dy:dy + h - size + 1, dx:dx + w - size + 1]
    out = np.zeros_like(mask)
    for dy in range(size):
        for dx in range(size):
            out[..., dy:dy + h - size + 1, dx:dx + w - size + 1] |= solid
    return out


def _toward(frames: np.ndarray, expected: np.ndarray, color: str) -> np.ndarray:
    """float [T, H, W]: how far each pixel has gone from the expected picture towards `color` (0 there, 1 at the
    colour), where it stays near that line (the detector's COLOR_DISTANCE); 0 elsewhere."""
    amount, residual = toward(frames, expected, np.array(COLORS[color], np.float32))
    return np.where(residual < COLOR_DISTANCE, amount, 0.0)


def _kept_in_frame(labels: np.ndarray, shape: str, visible: np.ndarray, hidden: np.ndarray) -> float | None:
    """Is the thing in this frame where and as large as the render draws it? labels: its colour's connected
    regions in the frame; visible: its pixels in the render (less what an object over it hides); hidden: the
    pixels of its outline that objects over it hide. The region that overlaps its visible pixels most must have
    its centroid within POSITION_PX of theirs and about their area. Its shape is fitted with the hidden pixels
    not counted against any template (what is hidden cannot be judged). Returns how much better another shape
    fits that region than the thing's own (0: its own fits best), or None when it is not there."""
    ids, counts = np.unique(labels[visible & (labels > 0)], return_counts=True)
    if not len(ids):
        return None
    region = labels == ids[np.argmax(counts)]
    ys, xs = np.nonzero(region)
    wy, wx = np.nonzero(visible)
    if np.hypot(xs.mean() - wx.mean(), ys.mean() - wy.mean()) > POSITION_PX:
        return None
    if not 1 / AREA_RATIO <= len(xs) / len(wx) <= AREA_RATIO:
        return None
    ious = shape_ious(region, hidden)
    return max(ious.values()) - ious[shape]


def _kept(margins: list[float | None]) -> bool:
    """A kept object: there in every judged frame, and its own shape fits it (SHAPE_MARGIN on average over the
    frames, SHAPE_FRAME_MARGIN in each: a shape drawn a pixel off fits its template a little worse, another shape
    fits far better)."""
    if any(m is None for m in margins):
        return False
    return max(margins) <= SHAPE_FRAME_MARGIN and float(np.mean(margins)) <= SHAPE_MARGIN


def judge(frames: np.ndarray, spans: list[Span]) -> dict:
    """Per-video scores (see the module docstring) over the frames the spans name; frames outside every span
    (a change's transition) are not judged."""
    frames_f = frames.astype(np.float32)
    total = len(frames)
    kept_ok, trace_frames, blob_frames, errors, judged = [], 0, 0, [], 0
    detected = regions(frames)
    for span in spans:
        stop = min(span.stop, total)
        if stop <= span.start:
            continue
        kept_scene, removed = expected_scene(span.scene, span.negatives)
        expected_video, labels = render(kept_scene, total)
        expected = expected_video[span.start:stop].astype(np.float32)
        got = frames_f[span.start:stop]
        labels_of = {c: connected_regions(m) for c, m in color_masks(frames[span.start:stop]).items()}
        judged += stop - span.start
        for i, thing in enumerate(kept_scene.things):
            path = positions(thing, total)[span.start:stop]
            on_thing = labels[span.start:stop] == i + 1
            outline = np.stack([shape_mask(thing.shape, x, y) for x, y in path])
            kept_ok.append(_kept([_kept_in_frame(labels_of[thing.color][f], thing.shape, on_thing[f],
                                                 outline[f] & ~on_thing[f]) for f in range(stop - span.start)]))
            errors.append(float(np.abs(got - expected)[on_thing].mean()))
        kept_area = dilate(labels[span.start:stop] > 0, 1)
        traced = np.zeros(stop - span.start, bool)
        footprints = np.zeros(got.shape[:3], bool)
        for thing in removed:
            footprint = np.stack([shape_mask(thing.shape, x, y) for x, y in positions(thing, total)[span.start:stop]])
            footprint = dilate(footprint, TRACE_MARGIN) & ~kept_area
            strong = (_toward(got, expected, thing.color) >= TRACE_AMOUNT) & footprint
            traced |= strong.reshape(len(strong), -1).sum(1) >= TRACE_PIXELS
            footprints |= footprint
        trace_frames += int(traced.sum())
        # a removed object left in its place is a trace, not an unprompted object
        far = (np.linalg.norm(got - expected, axis=-1) > BLOB_DIFF) & ~footprints
        blob_frames += int(_opened(far, BLOB).reshape(len(far), -1).any(1).sum())
    kept = float(np.mean(kept_ok)) if kept_ok else 1.0
    out = {"kept": kept, "removed": float(trace_frames == 0), "trace_frames": float(trace_frames),
           "unprompted": float(blob_frames > 0), "blob_frames": float(blob_frames),
           "corruption": corruption(frames, detected),
           "kept_error": float(np.mean(errors)) if errors else 0.0, "judged_frames": float(judged)}
    out["joint"] = float(all(kept_ok) and trace_frames == 0 and blob_frames == 0
                         and out["corruption"] <= CORRUPTION_LIMIT)
    return out


def judge_caption(frames: np.ndarray, positive: str, negatives=()) -> dict:
    """judge() of a whole video asked for with one prompt and negatives from its first frame."""
    from .world import scene_from_caption

    return judge(frames, [Span(0, len(frames), scene_from_caption(positive), tuple(negatives))])


def mean_change(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel change between two videos, in grey levels."""
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def calibration(rng: np.random.Generator, videos: int, frames: int) -> dict[str, float]:
    """The judge's pass rates on videos that are what was asked for (a scene of two or three objects, one named
    as the negative, drawn without it): rendered exactly (must be 1.0), degraded like generated frames
    (world.degrade: blur, noise, a colour shift), and degraded with every shape jittered in every frame on its
    own (up to a pixel off its path, 10% off its size: harsher than the bundled model draws, whose objects stay
    within 1 px of their paths)."""
    from .world import degrade, sample_scene

    passed = {"exact": [], "degraded": [], "jittered": []}
    while len(passed["exact"]) < videos:
        scene = sample_scene(rng)
        if len(scene.things) < 2:
            continue
        negative = scene.things[int(rng.integers(len(scene.things)))].name
        spans = [Span(0, frames, scene, (negative,))]
        kept, _ = expected_scene(scene, (negative,))
        exact = render(kept, frames)[0]
        passed["exact"].append(judge(exact, spans)["joint"])
        passed["degraded"].append(judge(degrade(exact, rng), spans)["joint"])
        passed["jittered"].append(judge(degrade(render(kept, frames, jitter=rng)[0], rng), spans)["joint"])
    return {name: float(np.mean(values)) for name, values in passed.items()}
