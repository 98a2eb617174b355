"""A procedural toy world of short videos with known motion: coloured discs and squares on plain or textured
backgrounds, moving in a straight line at a fixed speed (bouncing off the borders), some of them still.

The direction is a rule of the world that the first frame shows: discs move to the right, squares move down, and
both turn back at the borders. Only the speed is hidden, and a clip's motion bucket (measured from its pixels) tells
it. So a model conditioned on the first frame and the motion bucket has one right answer to learn, and a generated
video can be checked against it. (With a random direction per shape, a model trained for an hour on a CPU averages
the directions it cannot tell apart and smears the shapes.)

Everything is drawn from a seed, so the same seed gives the same clip. Shapes are drawn with anti-aliased edges
(4x supersampling) so that slow motion is visible as sub-pixel change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPEEDS = (0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0)  # pixels per frame; still clips twice as likely
DIRECTIONS = {"disc": (0.0, 1.0), "square": (1.0, 0.0)}  # (y, x) unit vectors: discs right, squares down


@dataclass
class Shape:
    kind: str  # "disc" or "square"
    radius: float
    color: np.ndarray  # (3,) uint8
    pos: np.ndarray  # (2,) float, (y, x) centre in pixels
    vel: np.ndarray  # (2,) float, pixels per frame


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A plain colour, a two-colour gradient or soft stripes: (size, size, 3) float in 0..255."""
    base = rng.uniform(20, 120, 3)
    kind = rng.integers(0, 3)
    if kind == 0:
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    other = rng.uniform(20, 120, 3)
    if kind == 1:
        t = (y if rng.random() < 0.5 else x)[..., None]
        return (base * (1 - t) + other * t).astype(np.float32)
    freq = rng.uniform(2, 5)
    angle = rng.uniform(0, np.pi)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * x + np.sin(angle) * y))[..., None]
    return (base * (1 - t) + other * t).astype(np.float32)


def _coverage(shape: Shape, size: int, ss: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by the shape, by ss x ss supersampling: (size, size) float."""
    g = (np.arange(size * ss, dtype=np.float32) + 0.5) / ss
    y, x = g[:, None], g[None, :]
    dy, dx = y - shape.pos[0], x - shape.pos[1]
    if shape.kind == "disc":
        inside = dy * dy + dx * dx <= shape.radius**2
    else:
        inside = (np.abs(dy) <= shape.radius) & (np.abs(dx) <= shape.radius)
    return inside.reshape(size, ss, size, ss).mean(axis=(1, 3))


def random_shapes(rng: np.random.Generator, size: int, speed: float | None = None) -> list[Shape]:
    """One or two shapes of contrasting colours; all move at `speed` (drawn from SPEEDS if None)."""
    speed = float(rng.choice(SPEEDS)) if speed is None else speed
    shapes = []
    for _ in range(int(rng.integers(1, 3))):
        radius = float(rng.uniform(size * 0.09, size * 0.15))
        kind = str(rng.choice(["disc", "square"]))
        shapes.append(
            Shape(
                kind=kind,
                radius=radius,
                color=rng.integers(150, 256, 3).astype(np.uint8),
                pos=rng.uniform(radius + 1, size - radius - 1, 2),
                vel=speed * np.array(DIRECTIONS[kind]),
            )
        )
    return shapes


def scene(seed: int, size: int = 64, speed: float | None = None) -> tuple[np.ndarray, list[Shape]]:
    """The background and the shapes (at their first-frame positions) of the clip drawn from `seed`."""
    rng = np.random.default_rng(seed)
    return _background(rng, size), random_shapes(rng, size, speed)


def render_clip(
    seed: int, num_frames: int = 24, size: int = 64, speed: float | None = None
) -> tuple[np.ndarray, float]:
    """A clip of `num_frames` frames (T, size, size, 3) uint8 and its shapes' speed in pixels per frame."""
    background, shapes = scene(seed, size, speed)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        img = background.copy()
        for s in shapes:
            a = _coverage(s, size)[..., None]
            img = img * (1 - a) + s.color.astype(np.float32) * a
            # move, bouncing off the borders so the shape stays whole
            s.pos = s.pos + s.vel
            for axis in range(2):
                lo, hi = s.radius, size - s.radius
                if s.pos[axis] < lo or s.pos[axis] > hi:
                    s.vel[axis] = -s.vel[axis]
                    s.pos[axis] = np.clip(s.pos[axis], lo, hi)
        frames[t] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return frames, float(np.linalg.norm(shapes[0].vel))
