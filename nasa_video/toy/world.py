"""A procedural world: one to four coloured shapes over a fixed background, with a caption naming them.

The caption fixes the picture, so a small model can learn to draw exactly what it is told and the removal
benchmark measures guidance, not what the model fails to draw:
- each of the 9 objects (a colour and a shape) has its own place on a line across the frame (LINE, HOME_X), so a
  scene may hold two objects of one colour or of one shape (a red circle beside a red square), and the place
  comes from the object, never from its colour alone;
- the line is ordered so that neighbours differ in colour and shape and objects of one colour sit 13 px apart
  (2 px of background between them); a scene never holds two neighbours of the line, so the objects it holds
  overlap by at most 3 px: the one further right is drawn over (DEPTH: fixed, whatever the caption's order),
  and taking it out uncovers what it hid;
- the shape (circle, square, triangle) is named next to its colour; all shapes have one size;
- a caption ending in "moving up" / "moving down" moves every shape 1 px per frame up or down through its
  place; unstated, they stay still at the frame's middle. The scene moves as one: with a motion word per object,
  the two-layer text encoder could not tell which object a motion belongs to (as it could not tell which
  shape belongs to which colour before the pair tokens), so the model drew an average of the paths, a shape
  that stalls mid-column, blurs at the clip's ends and jumps.
Objects stay inside the frame; visibility() reports each per frame from the rendered label map, the ground
truth the detector is checked against.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

HEIGHT, WIDTH = 32, 48  # frames are HEIGHT x WIDTH pixels
COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 245)}
SHAPES = ("circle", "square", "triangle")
RADIUS = 5.5  # every shape is 11 px across
MOTIONS = {"up": -1.0, "down": 1.0}  # pixels per frame; no motion word: still
TRAVEL = 5.0  # a moving shape starts this far from the middle and crosses it
OBJECTS = [f"{c} {s}" for c in COLORS for s in SHAPES]  # the 9 names the detector knows
# The objects' places, left to right: a Latin square (each colour and each shape once in every three), so
# neighbours share nothing and one colour's objects are three places (13 px) apart.
LINE = ("red circle", "green square", "blue triangle", "red square", "green triangle", "blue circle",
        "red triangle", "green circle", "blue square")
HOME_X = dict(zip(LINE, (6.5, 10.5, 15.5, 19.5, 24.5, 28.5, 32.5, 37.5, 41.5)))  # pixel centres
DEPTH = {name: i for i, name in enumerate(LINE)}  # drawn in this order: the right one of an overlap is on top
MAX_OBJECTS = 4


@dataclass(frozen=True)
class Thing:
    color: str
    shape: str
    motion: str | None  # "up", "down" or None (still)

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
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = 40 + 25 * (0.6 * xx / (WIDTH - 1) + 0.4 * yy / (HEIGHT - 1))
    return np.stack([base, base + 5, base + 15], -1).astype(np.float32)


def positions(thing: Thing, frames: int) -> np.ndarray:
    """[frames, 2] centres (x, y): x is the object's place (HOME_X). A moving shape starts TRAVEL px on the far
    side of the frame's middle and
    bounces between middle - TRAVEL and middle + TRAVEL, so a stream of any length stays in the frame."""
    middle = HEIGHT / 2
    speed = MOTIONS[thing.motion] if thing.motion else 0.0
    phase = np.arange(frames, dtype=np.float32) % (4 * TRAVEL)  # a triangle wave over 2 x (2 x TRAVEL) frames
    offset = np.where(phase <= 2 * TRAVEL, phase, 4 * TRAVEL - phase) - TRAVEL  # -TRAVEL -> +TRAVEL -> back
    y = middle + np.sign(speed) * offset if speed else np.full(frames, middle, np.float32)
    return np.stack([np.full(frames, HOME_X[thing.name], np.float32), y.astype(np.float32)], 1)


def shape_mask(shape: str, cx: float, cy: float, r: float = RADIUS, height: int = HEIGHT,
               width: int = WIDTH) -> np.ndarray:
    # Centres snap to pixel centres, so every shape digitises to the same symmetric pixel pattern.
    cx, cy = np.floor(cx) + 0.5, np.floor(cy) + 0.5
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        half = r * 0.82  # 9 px wide at every size within 10% of RADIUS (odd widths: centres are pixel centres)
        return (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    # an upright isosceles triangle, apex on top, as wide at the base as it is tall
    top, bottom = cy - r, cy + r
    half_width = (yy - top) / (2 * r) * r
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)


def caption_for(things) -> str:
    """"a red circle and a blue square moving up": the scene's motion, when it moves, is named once at the end
    (an unnamed one would leave the model to guess the path and draw the average of both)."""
    motions = {t.motion for t in things}
    if len(motions) > 1:
        raise ValueError("the world moves a scene as one: give every object the same motion (or none)")
    motion = motions.pop() if motions else None
    return " and ".join(f"a {t.color} {t.shape}" for t in things) + (f" moving {motion}" if motion else "")


def caption_objects(caption: str) -> list[str]:
    """The object names of a caption_for caption, in order: "a red circle and a blue square moving up"
    -> ["red circle", "blue square"]."""
    return [" ".join(part.split()[-2:]) for part in re.sub(r" moving \w+", "", caption).split(" and ")]


def scene_from_caption(caption: str) -> Scene:
    """caption_for's inverse: the scene a caption asks for (its exact render is the ground truth)."""
    moving = re.search(r" moving (\w+)$", caption)
    motion = moving.group(1) if moving else None
    things = tuple(Thing(*name.split(), motion) for name in caption_objects(caption))
    return Scene(things, caption)


def compatible(names) -> bool:
    """Can these objects share a scene? Each at most once, and no two of them neighbours on the LINE."""
    places = sorted(LINE.index(n) for n in names)
    return len(set(places)) == len(places) and all(b - a >= 2 for a, b in zip(places, places[1:]))


def _compositions() -> dict[int, list[frozenset[str]]]:
    """Every scene's set of object names, by count (1 to MAX_OBJECTS): 9, 28, 35 and 15 of them."""
    import itertools

    return {count: [frozenset(c) for c in itertools.combinations(LINE, count) if compatible(c)]
            for count in range(1, MAX_OBJECTS + 1)}


COMPOSITIONS = _compositions()
HELD_OUT_EVERY = 4  # of the compositions of two, three and four objects, this share is never drawn in training


def _held_out_compositions() -> frozenset[frozenset[str]]:
    """A quarter of the compositions of each count from two on, chosen by a hash of their names: the same split
    on every machine and run."""
    chosen = set()
    for count in range(2, MAX_OBJECTS + 1):
        compositions = sorted(COMPOSITIONS[count], key=lambda names: zlib.crc32(",".join(sorted(names)).encode()))
        chosen.update(compositions[:len(compositions) // HELD_OUT_EVERY])
    return frozenset(chosen)


HELD_OUT = _held_out_compositions()


def held_out(names) -> bool:
    """Is this composition (its object names, whatever their order and motion) kept out of training? The
    benchmark's held-out rows ask only about these, which no training draw (teacher, student or NASA-T caption)
    contains. Single objects are all trained (the model must know each object)."""
    return frozenset(names) in HELD_OUT


def sample_scene(rng: np.random.Generator, frames: int | None = None, names: list[str] | None = None,
                 p_still: float = 1 / 3, training: bool = False, counts=None) -> Scene:
    """A random scene (or one with the given object names, in that order): a count of objects from `counts`
    (default 1 to MAX_OBJECTS, equally likely), then one of that count's compositions, in a random order in the
    caption; all still with probability p_still, else all moving up or all moving down. training: never a
    held-out composition (drawn again until it is not).
    `frames` is accepted for symmetry with render(); every scene fits any length the world is drawn at."""
    counts = list(counts or range(1, MAX_OBJECTS + 1))
    if names is None:
        while True:
            pool = COMPOSITIONS[int(rng.choice(counts))]
            chosen = sorted(pool[int(rng.integers(len(pool)))])
            if not (training and held_out(chosen)):
                break
        names = [chosen[i] for i in rng.permutation(len(chosen))]
    motion = None if rng.random() < p_still else str(rng.choice(list(MOTIONS)))
    things = tuple(Thing(*name.split(), motion) for name in names)
    return Scene(things, caption_for(things))


def render(scene: Scene, frames: int, jitter: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 video [frames, HEIGHT, WIDTH, 3] and the label map [frames, HEIGHT, WIDTH] (0 = background,
    i+1 = thing i, the one on top where two overlap). jitter: draw each shape in each frame up to a pixel off its path and up to 10% off its
    size, as a generator's imperfect shapes are (for checking the detector on frames like generated ones)."""
    video = np.repeat(background()[None], frames, 0)
    labels = np.zeros((frames, HEIGHT, WIDTH), np.int16)
    for i in sorted(range(len(scene.things)), key=lambda i: DEPTH[scene.things[i].name]):
        thing = scene.things[i]
        path = positions(thing, frames)
        for f in range(frames):
            (x, y), r = path[f], RADIUS
            if jitter is not None:
                x, y = x + jitter.uniform(-1, 1), y + jitter.uniform(-1, 1)
                r = RADIUS * jitter.uniform(0.9, 1.1)
            mask = shape_mask(thing.shape, x, y, r)
            video[f][mask] = COLORS[thing.color]
            labels[f][mask] = i + 1
    return np.clip(video, 0, 255).astype(np.uint8), labels


def degrade(video: np.ndarray, rng: np.random.Generator, blur: float = 0.8, noise: float = 8.0,
            color_shift: float = 15.0) -> np.ndarray:
    """A rendered video made to look generated: Gaussian blur (sigma in px), per-pixel noise (sigma in levels)
    and one random colour offset per channel (up to color_shift levels)."""
    x = video.astype(np.float32)
    if blur > 0:
        taps = np.arange(-2, 3, dtype=np.float32)
        kernel = np.exp(-taps ** 2 / (2 * blur ** 2))
        kernel /= kernel.sum()
        for axis in (1, 2):
            padded = np.pad(x, [(2, 2) if a == axis else (0, 0) for a in range(4)], mode="edge")
            x = sum(k * np.take(padded, range(i, i + x.shape[axis]), axis=axis) for i, k in enumerate(kernel))
    x = x + rng.normal(0, noise, x.shape) + rng.uniform(-color_shift, color_shift, 3)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def visibility(scene: Scene, labels: np.ndarray, min_fraction: float = 0.5) -> dict[str, np.ndarray]:
    """Per object name, bool [frames]: at least min_fraction of the shape's full area is on screen."""
    out = {name: np.zeros(len(labels), bool) for name in OBJECTS}
    for i, thing in enumerate(scene.things):
        full = shape_mask(thing.shape, WIDTH / 2, HEIGHT / 2).sum()
        out[thing.name] = (labels == i + 1).reshape(len(labels), -1).sum(1) >= min_fraction * full
    return out
