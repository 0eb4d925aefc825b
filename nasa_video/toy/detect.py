"""Which of the world's named objects are visible in each frame, from pixels alone.

For each palette colour: the pixels close to it form the object's mask; its shape is the shape template
(circle, square, triangle at either size) that best overlaps the mask near its centroid. Pixels near the
background or near a palette colour are "explained"; the rest measure corruption.
"""
from __future__ import annotations

import numpy as np

from .world import COLORS, OBJECTS, RADIUS, SHAPES, SIZE, background, shape_mask

COLOR_DISTANCE = 60.0  # RGB distance from the background-to-colour line that still counts as that colour
BACKGROUND_DISTANCE = 40.0
MIN_AREA = 20  # pixels; a small circle is 69
MIN_IOU = 0.4  # a blob that matches no shape this well is not an object


def _template_bank() -> dict[tuple[str, str], np.ndarray]:
    """Each shape and size drawn at the centre of a 2x canvas; crops of it are the shape at any position."""
    bank = {}
    for shape in SHAPES:
        for size, r in RADIUS.items():
            canvas = np.zeros((2 * SIZE, 2 * SIZE), bool)
            canvas[SIZE // 2:SIZE // 2 + SIZE, SIZE // 2:SIZE // 2 + SIZE] = shape_mask(shape, SIZE / 2, SIZE / 2, r)
            bank[(shape, size)] = canvas
    return bank


_TEMPLATES = _template_bank()


def _template_at(key, cx: int, cy: int) -> np.ndarray:
    """The template with its centre on pixel (cx, cy) of a SIZE x SIZE frame."""
    cx, cy = min(max(cx, 0), SIZE - 1), min(max(cy, 0), SIZE - 1)
    x0, y0 = SIZE - cx, SIZE - cy
    return _TEMPLATES[key][y0:y0 + SIZE, x0:x0 + SIZE]


def classify(mask: np.ndarray) -> str | None:
    """Shape of one colour's mask [H, W], or None when there is too little of it: the shape template (any
    size, centred within a pixel of the mask's centroid) that overlaps the mask best (intersection over union)."""
    area = int(mask.sum())
    if area < MIN_AREA:
        return None
    ys, xs = np.nonzero(mask)
    cx, cy = int(np.floor(xs.mean() + 0.5)), int(np.floor(ys.mean() + 0.5))
    best, best_iou = None, 0.0
    for key in _TEMPLATES:
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                template = _template_at(key, cx + dx, cy + dy)
                inter = np.logical_and(template, mask).sum()
                iou = inter / float(np.logical_or(template, mask).sum())
                if iou > best_iou:
                    best, best_iou = key[0], iou
    return best if best_iou >= MIN_IOU else None


def color_masks(frames: np.ndarray) -> dict[str, np.ndarray]:
    """frames [T, H, W, 3] uint8 -> per colour, bool [T, H, W]: pixels at least half way from the (known)
    background to that colour, and close to the line between them. Blurred edges count by their 50% level,
    so a soft-edged shape keeps its outline."""
    pixels = frames.astype(np.float32)
    bg = background()[None]
    out = {}
    for color, rgb in COLORS.items():
        direction = np.array(rgb, np.float32) - bg  # [1, H, W, 3]
        offset = pixels - bg
        amount = (offset * direction).sum(-1) / (direction * direction).sum(-1)
        residual = np.linalg.norm(offset - amount[..., None] * direction, axis=-1)
        out[color] = (amount > 0.5) & (residual < COLOR_DISTANCE)
    return out


def detect(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per object name, bool [T]: the object is visible in that frame."""
    out = {name: np.zeros(len(frames), bool) for name in OBJECTS}
    for color, masks in color_masks(frames).items():
        for f, mask in enumerate(masks):
            shape = classify(mask)
            if shape is not None:
                out[f"{color} {shape}"][f] = True
    return out


def corruption(frames: np.ndarray) -> float:
    """Share of pixels explained neither by the background nor by a palette colour."""
    pixels = frames.astype(np.float32)
    near_bg = np.linalg.norm(pixels - background()[None], axis=-1) < BACKGROUND_DISTANCE
    near_obj = np.zeros_like(near_bg)
    for mask in color_masks(frames).values():
        near_obj |= mask
    return float(1.0 - (near_bg | near_obj).mean())


def agreement(predicted: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> float:
    """Share of (frame, object name) decisions that agree."""
    hits = sum(int((predicted[n] == truth[n]).sum()) for n in OBJECTS)
    return hits / float(len(OBJECTS) * len(next(iter(truth.values()))))
