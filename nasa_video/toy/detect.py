"""Which of the world's named objects are visible in each frame, from pixels alone.

For each palette colour: the pixels close to it form the object's mask; its shape is read from the mask's
geometry (an apex: the top rows much narrower than the bottom rows, is a triangle; otherwise a mask that
fills its bounding box is a square, else a circle). Pixels near the background or in a detected object's
(slightly grown) bounding box are "explained"; the rest measure corruption.
"""
from __future__ import annotations

import numpy as np

from .world import COLORS, OBJECTS, background

COLOR_DISTANCE = 90.0  # RGB distance to a palette colour that still counts as that colour
BACKGROUND_DISTANCE = 40.0
MIN_AREA = 20  # pixels; a small circle is about 64


def classify(mask: np.ndarray) -> str | None:
    """Shape of one colour's mask [H, W], or None when there is too little of it."""
    area = int(mask.sum())
    if area < MIN_AREA:
        return None
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    widths = mask[y0:y1].sum(1).astype(np.float32)
    quarter = max(1, (y1 - y0) // 4)
    if widths[:quarter].mean() < 0.55 * widths[-quarter:].mean():  # an apex on top
        return "triangle"
    # A square fills the corners of its bounding box; a circle leaves them empty.
    u = (xs + 0.5 - (x0 + x1) / 2) / ((x1 - x0) / 2)
    v = (ys + 0.5 - (y0 + y1) / 2) / ((y1 - y0) / 2)
    corners = float(np.mean(np.abs(u) + np.abs(v) > 1.5))
    return "square" if corners > 0.03 else "circle"


def color_masks(frames: np.ndarray) -> dict[str, np.ndarray]:
    """frames [T, H, W, 3] uint8 -> per colour, bool [T, H, W]."""
    pixels = frames.astype(np.float32)
    return {c: np.linalg.norm(pixels - np.array(rgb, np.float32), axis=-1) < COLOR_DISTANCE
            for c, rgb in COLORS.items()}


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
