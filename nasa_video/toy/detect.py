"""What the bundled world's frames show, from pixels alone.

Each palette colour's pixels (those at least half way from the known background towards that colour) split
into connected regions. A region of object size (MIN_AREA pixels or more) is a *colour region*: the colour is
there, whatever its outline. A colour region whose outline matches one of the world's shape templates (IoU at
least MIN_IOU, centred within a pixel of the region's centroid) is an *object* with that shape. Pixels that
are neither near the background nor on (or next to) an object are unexplained: smears of a palette colour,
stray colours, noise. The removal benchmark's scores (nasa_video/toy/removal.py) are read from these.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .world import COLORS, HEIGHT, OBJECTS, RADIUS, SHAPES, WIDTH, background, shape_mask

COLOR_DISTANCE = 60.0  # RGB distance from the background-to-colour line that still counts as that colour
BACKGROUND_DISTANCE = 40.0
MIN_AREA = 20  # pixels: a colour region of object size (the smallest shape, the triangle, is 85)
MIN_IOU = 0.5  # a region that matches no shape this well is not an object
SCALES = (0.85, 0.93, 1.0, 1.08, 1.15)  # template sizes: generated shapes are drawn a little off size


@dataclass(frozen=True)
class Region:
    """One connected colour region in one frame."""
    color: str
    shape: str | None  # the best-matching shape, None when no template matches well enough
    area: int
    x: float  # centroid
    y: float
    mask: np.ndarray  # bool [H, W]


def _template_bank() -> dict[tuple[str, float], np.ndarray]:
    """Each shape at each scale drawn with its centroid at the centre of a 2x canvas (a triangle's centroid is
    below its middle); crops of it are the shape at any position."""
    bank = {}
    for shape in SHAPES:
        for scale in SCALES:
            canvas = np.zeros((2 * HEIGHT, 2 * WIDTH), bool)
            mask = shape_mask(shape, WIDTH / 2, HEIGHT / 2, RADIUS * scale)
            ys, xs = np.nonzero(mask)  # centred on its centroid, as the regions it is laid on are
            mask = np.roll(mask, (int(np.round(HEIGHT / 2 - ys.mean())), int(np.round(WIDTH / 2 - xs.mean()))),
                           (0, 1))
            canvas[HEIGHT // 2:HEIGHT // 2 + HEIGHT, WIDTH // 2:WIDTH // 2 + WIDTH] = mask
            bank[shape, scale] = canvas
    return bank


_TEMPLATES = _template_bank()


def _template_at(key: tuple[str, float], cx: int, cy: int) -> np.ndarray:
    """The template with its centre on pixel (cx, cy) of a HEIGHT x WIDTH frame."""
    cx, cy = min(max(cx, 0), WIDTH - 1), min(max(cy, 0), HEIGHT - 1)
    x0, y0 = WIDTH - cx, HEIGHT - cy
    return _TEMPLATES[key][y0:y0 + HEIGHT, x0:x0 + WIDTH]


def shape_ious(mask: np.ndarray, hidden: np.ndarray | None = None) -> dict[str, float]:
    """Per shape, the best intersection over union of its templates (any of SCALES, centred within a pixel of
    the mask's centroid) with the mask. hidden: pixels another object covers, where a template's pixels are not
    missed (an object partly under another is judged by what shows)."""
    ys, xs = np.nonzero(mask)
    out = {shape: 0.0 for shape in SHAPES}
    if len(xs) == 0:
        return out
    cx, cy = int(np.floor(xs.mean() + 0.5)), int(np.floor(ys.mean() + 0.5))
    for key in _TEMPLATES:
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                template = _template_at(key, cx + dx, cy + dy)
                if hidden is not None:
                    template = template & ~hidden | (template & mask)
                iou = np.logical_and(template, mask).sum() / float(np.logical_or(template, mask).sum())
                out[key[0]] = max(out[key[0]], float(iou))
    return out


def match_shape(mask: np.ndarray, hidden: np.ndarray | None = None) -> tuple[str | None, float]:
    """The shape whose template overlaps the mask best (shape_ious), and its intersection over union; None
    below MIN_IOU."""
    ious = shape_ious(mask, hidden)
    best = max(SHAPES, key=lambda shape: ious[shape])  # the first of equals, as SHAPES orders them
    return (best if ious[best] >= MIN_IOU else None), ious[best]


def connected_regions(mask: np.ndarray) -> np.ndarray:
    """int labels [..., H, W] of the 8-connected regions of a bool mask [..., H, W] (0 = not in the mask):
    each pixel takes the smallest index in its region, spread by repeated 3x3 minimum filters."""
    big = np.iinfo(np.int64).max
    labels = np.where(mask, np.arange(mask.size, dtype=np.int64).reshape(mask.shape) + 1, big)
    while True:
        padded = np.pad(labels, [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)], constant_values=big)
        h, w = mask.shape[-2:]
        neighbours = [padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        spread = np.where(mask, np.minimum.reduce(neighbours), big)
        if np.array_equal(spread, labels):
            return np.where(mask, labels, 0)
        labels = spread


def color_masks(frames: np.ndarray) -> dict[str, np.ndarray]:
    """frames [T, H, W, 3] uint8 -> per colour, bool [T, H, W]: pixels at least half way from the (known)
    background to that colour, and close to the line between them. Blurred edges count by their 50% level,
    so a soft-edged shape keeps its outline."""
    pixels = frames.astype(np.float32)
    bg = background()[None]
    out = {}
    for color, rgb in COLORS.items():
        amount, residual = toward(pixels, bg, np.array(rgb, np.float32))
        out[color] = (amount > 0.5) & (residual < COLOR_DISTANCE)
    return out


def toward(pixels: np.ndarray, base: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How far each pixel has gone from `base` (a picture, broadcast) towards the colour `target` (0 at base, 1 at
    the colour), and its RGB distance from that line; float [..., H, W] each."""
    direction = target - base
    offset = pixels - base
    amount = (offset * direction).sum(-1) / np.maximum((direction * direction).sum(-1), 1.0)
    residual = np.linalg.norm(offset - amount[..., None] * direction, axis=-1)
    return amount, residual


def regions(frames: np.ndarray, masks: dict[str, np.ndarray] | None = None) -> list[list[Region]]:
    """Per frame, its colour regions of object size, largest first. A region's shape is matched with the pixels of
    the other colours (and the pixel around them, a blurred edge) taken as hidden: the world draws one object
    over another, and what it covers is not missing."""
    masks = color_masks(frames) if masks is None else masks
    out: list[list[Region]] = [[] for _ in range(len(frames))]
    for color, mask in masks.items():
        labels = connected_regions(mask)
        covered = dilate(np.logical_or.reduce([m for c, m in masks.items() if c != color]), 1) & ~mask
        for f in range(len(frames)):
            ids, counts = np.unique(labels[f][labels[f] > 0], return_counts=True)
            for i in ids[counts >= MIN_AREA]:
                region = labels[f] == i
                ys, xs = np.nonzero(region)
                out[f].append(Region(color, match_shape(region, covered[f])[0], len(xs), float(xs.mean()), float(ys.mean()),
                                     region))
    for frame in out:
        frame.sort(key=lambda r: -r.area)
    return out


def detect(frames: np.ndarray, found: list[list[Region]] | None = None) -> dict[str, np.ndarray]:
    """Per object name, bool [T]: an object of that colour and shape is in that frame."""
    found = regions(frames) if found is None else found
    out = {name: np.zeros(len(frames), bool) for name in OBJECTS}
    for f, frame in enumerate(found):
        for region in frame:
            if region.shape is not None:
                out[f"{region.color} {region.shape}"][f] = True
    return out


def dilate(mask: np.ndarray, px: int = 1) -> np.ndarray:
    """`px`-pixel 8-neighbour dilation of bool [..., H, W]."""
    h, w = mask.shape[-2:]
    for _ in range(px):
        padded = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)])
        mask = np.logical_or.reduce([padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                                     for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    return mask


def unexplained(frames: np.ndarray, found: list[list[Region]] | None = None) -> np.ndarray:
    """bool [T, H, W]: pixels neither near the background nor on (or one pixel around) a detected object."""
    found = regions(frames) if found is None else found
    near_bg = np.linalg.norm(frames.astype(np.float32) - background()[None], axis=-1) < BACKGROUND_DISTANCE
    on_object = np.zeros_like(near_bg)
    for f, frame in enumerate(found):
        for region in frame:
            if region.shape is not None:
                on_object[f] |= region.mask
    return ~(near_bg | dilate(on_object))


def corruption(frames: np.ndarray, found: list[list[Region]] | None = None) -> float:
    """Share of pixels explained neither by the background nor by a detected object (smears of a palette
    colour outside objects count)."""
    return float(unexplained(frames, found).mean())


def agreement(predicted: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> float:
    """Share of (frame, object name) decisions that agree."""
    hits = sum(int((predicted[n] == truth[n]).sum()) for n in OBJECTS)
    return hits / float(len(OBJECTS) * len(next(iter(truth.values()))))
