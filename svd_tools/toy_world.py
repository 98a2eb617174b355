"""A procedural toy world of short videos with known motion: one coloured disc or square of a fixed size on a plain
or gradient background, moving in a straight line at a fixed speed, or still.

The direction is a rule of the world that the first frame shows: discs move to the right, squares move down, and
each kind has its own colours (discs warm: yellow, orange; squares cool: cyan, sky blue), so that a model can tell
them apart from their colour as well as their outline, which at 8x downsampling is about two latent pixels. Shapes
start where their whole path over a clip of CLIP_FRAMES frames stays inside the picture, so they never reach a
border. Only the speed is hidden, and a clip's motion bucket (measured from its pixels) tells it. So a model
conditioned on the first frame and the motion bucket has one right answer to learn, and a generated video can be
checked against it. Each rule removes an ambiguity that a model trained for an hour on a CPU could not resolve and
would average into smeared or dimmed shapes:
- a random direction per shape (it averages the directions);
- kinds told apart by their outline alone (one colour range for both): the model could not read the kind, and hedged
  by splitting the shape into a piece moving right and a piece moving down;
- bounces off the borders (it cannot tell from the first frame when the shape turns);
- shapes of many sizes, or several shapes (the measured motion grows with the moving area as well as the speed, so
  one bucket would mean several speeds);
- striped backgrounds (the tiny first stage could not reconstruct them, which capped the first frame's PSNR);
- shapes about as bright in grey as their background (a clip's motion bucket comes from optical flow on grey
  levels, which barely sees such a shape move, so fast clips got the buckets of slow ones).

Everything is drawn from a seed, so the same seed gives the same clip. Shapes are drawn with anti-aliased edges
(4x supersampling) so that slow motion is visible as sub-pixel change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BACKGROUND = (10, 70)  # the range of every background channel
# A shape's channels: BRIGHT for red (discs) or blue (squares), MIDDLE for green, DARK for the other one, so that a
# shape's brightest channel is far above every background channel, and so is its grey level (mostly green), which
# the motion buckets are measured on: at least 112 against at most 70
BRIGHT, MIDDLE, DARK = (210, 256), (150, 231), (0, 60)
SPEEDS = (0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5)  # pixels per frame; still clips twice as likely
CLIP_FRAMES = 16  # the longest clip; shapes are placed so that they stay whole and inside for this many frames
RADIUS = 0.12  # of the frame size: half the side of a square, the radius of a disc
DIRECTIONS = {"disc": (0.0, 1.0), "square": (1.0, 0.0)}  # (y, x) unit vectors: discs right, squares down


@dataclass
class Shape:
    kind: str  # "disc" or "square"
    radius: float
    color: np.ndarray  # (3,) uint8
    pos: np.ndarray  # (2,) float, (y, x) centre in pixels
    vel: np.ndarray  # (2,) float, pixels per frame


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A plain colour or a two-colour gradient along a random direction: (size, size, 3) float in 0..255."""
    base = rng.uniform(*BACKGROUND, 3)
    if rng.random() < 0.5:
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    other = rng.uniform(*BACKGROUND, 3)
    angle = rng.uniform(0, 2 * np.pi)
    u = np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)  # -0.71..0.71 along the gradient
    t = np.clip(0.5 + u / np.sqrt(2), 0, 1)[..., None]
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
    """The world's one shape, of its kind's colours, moving at `speed` (drawn from SPEEDS if None) from where its path
    over CLIP_FRAMES frames stays inside the picture. A list, as `render_clip` draws every shape of a scene."""
    speed = float(rng.choice(SPEEDS)) if speed is None else speed
    if speed < 0 or speed * (CLIP_FRAMES - 1) > size * (1 - 2 * RADIUS) - 2:
        raise ValueError(f"speed {speed} does not fit a {size}-pixel frame for {CLIP_FRAMES} frames")
    radius = RADIUS * size
    kind = str(rng.choice(["disc", "square"]))
    vel = speed * np.array(DIRECTIONS[kind])
    lo = radius + 1
    hi = size - radius - 1 - np.abs(vel) * (CLIP_FRAMES - 1)  # per axis: the path ends inside
    bright, middle, dark = rng.integers(*BRIGHT), rng.integers(*MIDDLE), rng.integers(*DARK)
    rgb = (bright, middle, dark) if kind == "disc" else (dark, middle, bright)
    color = np.array(rgb, dtype=np.uint8)
    return [Shape(kind=kind, radius=radius, color=color, pos=lo + rng.random(2) * (hi - lo), vel=vel)]


def scene(seed: int, size: int = 64, speed: float | None = None) -> tuple[np.ndarray, list[Shape]]:
    """The background and the shapes (at their first-frame positions) of the clip drawn from `seed`."""
    rng = np.random.default_rng(seed)
    return _background(rng, size), random_shapes(rng, size, speed)


def render_clip(
    seed: int, num_frames: int = CLIP_FRAMES, size: int = 64, speed: float | None = None
) -> tuple[np.ndarray, float]:
    """A clip of `num_frames` (at most CLIP_FRAMES) frames (T, size, size, 3) uint8 and its shapes' speed in pixels
    per frame."""
    if not 1 <= num_frames <= CLIP_FRAMES:
        raise ValueError(f"num_frames must be in 1..{CLIP_FRAMES}, got {num_frames}")
    background, shapes = scene(seed, size, speed)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        img = background.copy()
        for s in shapes:
            a = _coverage(s, size)[..., None]
            img = img * (1 - a) + s.color.astype(np.float32) * a
            s.pos = s.pos + s.vel
        frames[t] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return frames, float(np.linalg.norm(shapes[0].vel))
