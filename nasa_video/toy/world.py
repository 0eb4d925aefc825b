"""A procedural world: 2-3 coloured shapes of two sizes moving over a fixed background, with a caption
naming them. Objects never overlap and stay inside the frame, so each named object is visible in every
frame; visibility() still reports it per frame from the rendered label map, the ground truth the detector
is checked against."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32  # frames are SIZE x SIZE pixels
COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 245), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
RADIUS = {"small": 4.5, "large": 6.5}
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEED = 1.0  # pixels per frame
OBJECTS = [f"{c} {s}" for c in COLORS for s in SHAPES]  # the 12 names the detector knows


@dataclass(frozen=True)
class Thing:
    color: str
    shape: str
    size: str
    motion: str
    x: float
    y: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    caption: str

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.things]


def background() -> np.ndarray:
    """A fixed, dim diagonal gradient: the same in every video, so it is easy to tell apart from objects."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    base = 40 + 25 * (0.6 * xx + 0.4 * yy)
    return np.stack([base, base + 5, base + 15], -1).astype(np.float32)


def positions(thing: Thing, frames: int) -> np.ndarray:
    """[frames, 2] centres; a shape bounces off the walls."""
    r = RADIUS[thing.size]
    lo, hi = r + 0.5, SIZE - r - 0.5
    dx, dy = MOTIONS[thing.motion]
    out = np.zeros((frames, 2), np.float32)
    x, y = thing.x, thing.y
    for f in range(frames):
        out[f] = (x, y)
        x, y = x + dx * SPEED, y + dy * SPEED
        if not lo <= x <= hi:
            dx, x = -dx, float(np.clip(x, lo, hi))
        if not lo <= y <= hi:
            dy, y = -dy, float(np.clip(y, lo, hi))
    return out


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    # Centres snap to pixel centres, so every shape digitises to the same symmetric pixel pattern.
    cx, cy = np.floor(cx) + 0.5, np.floor(cy) + 0.5
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        half = r * 0.9
        return (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    # an upright isosceles triangle, apex on top, as wide at the base as it is tall
    top, bottom = cy - r, cy + r
    half_width = (yy - top) / (2 * r) * r
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)


def caption_for(things, rng: np.random.Generator, p_size: float = 0.5, p_motion: float = 0.5) -> str:
    parts = []
    for t in things:
        words = ["a"] + ([t.size] if rng.random() < p_size else []) + [t.color, t.shape]
        if rng.random() < p_motion:
            words += ["moving", t.motion]
        parts.append(" ".join(words))
    return " and ".join(parts)


def caption_objects(caption: str) -> list[str]:
    """The object names of a caption_for caption, in order: "a small red circle moving left and a blue square"
    -> ["red circle", "blue square"]."""
    return [" ".join(part.split(" moving")[0].split()[-2:]) for part in caption.split(" and ")]


def sample_scene(rng: np.random.Generator, frames: int, names: list[str] | None = None,
                 p_size: float = 0.5, p_motion: float = 0.5) -> Scene:
    """A random scene (or one with the given object names, in that order) whose objects never overlap."""
    for _ in range(1000):
        if names is None:
            count = int(rng.integers(2, 4))
            colors = rng.choice(list(COLORS), size=count, replace=False)
            chosen = [(c, str(rng.choice(SHAPES))) for c in colors]
        else:
            chosen = [tuple(n.split()) for n in names]
        things = []
        for color, shape in chosen:
            size = str(rng.choice(list(RADIUS)))
            r = RADIUS[size]
            things.append(Thing(str(color), shape, size, str(rng.choice(list(MOTIONS))),
                                float(rng.uniform(r + 0.5, SIZE - r - 0.5)), float(rng.uniform(r + 0.5, SIZE - r - 0.5))))
        paths = [positions(t, frames) for t in things]
        ok = all(np.min(np.linalg.norm(paths[i] - paths[j], axis=1)) > RADIUS[a.size] + RADIUS[b.size] + 2.0
                 for i, a in enumerate(things) for j, b in enumerate(things) if i < j)
        if ok:
            return Scene(tuple(things), caption_for(things, rng, p_size, p_motion))
    raise RuntimeError("could not place the objects without overlap")


def render(scene: Scene, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 video [frames, SIZE, SIZE, 3] and the label map [frames, SIZE, SIZE] (0 = background, i+1 = thing i)."""
    bg = background()
    video = np.repeat(bg[None], frames, 0)
    labels = np.zeros((frames, SIZE, SIZE), np.int16)
    for i, thing in enumerate(scene.things):
        path = positions(thing, frames)
        for f in range(frames):
            mask = shape_mask(thing.shape, path[f, 0], path[f, 1], RADIUS[thing.size])
            video[f][mask] = COLORS[thing.color]
            labels[f][mask] = i + 1
    return np.clip(video, 0, 255).astype(np.uint8), labels


def visibility(scene: Scene, labels: np.ndarray, min_fraction: float = 0.5) -> dict[str, np.ndarray]:
    """Per object name, bool [frames]: at least min_fraction of the shape's full area is on screen."""
    out = {name: np.zeros(len(labels), bool) for name in OBJECTS}
    for i, thing in enumerate(scene.things):
        r = RADIUS[thing.size]
        full = shape_mask(thing.shape, SIZE / 2, SIZE / 2, r).sum()
        out[thing.name] = (labels == i + 1).reshape(len(labels), -1).sum(1) >= min_fraction * full
    return out
