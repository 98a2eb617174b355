"""Synthetic videos with known motion, for tests that need real video files.

Every generator returns `(frames, motion)`: frames are (T, H, W, 3) uint8 RGB, and `motion` is the true mean
displacement of the picture per second, averaged over all pixels, as a fraction of the frame's shorter side (a still
image is 0; a pan moves every pixel; a moving shape moves only the pixels it covers). `write_synthetic` writes one of
them with `data.video_io.write_video`.

Textures are smooth random noise so that optical flow has something to track; everything is seeded.
"""

from __future__ import annotations

import os

import numpy as np

from data.video_io import write_video


def texture(height: int, width: int, seed: int = 0, sigma: float = 2.0) -> np.ndarray:
    """(H, W, 3) uint8 smooth colour noise: uniform noise, Gaussian-blurred by `sigma` pixels, stretched to 0..255."""
    import cv2

    x = np.random.default_rng(seed).random((height, width, 3)).astype(np.float32)
    x = cv2.GaussianBlur(x, (0, 0), sigma)
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-9)
    return (x * 255).round().astype(np.uint8)


def still(size: int = 64, seconds: float = 3.0, fps: float = 8.0, seed: int = 0) -> tuple[np.ndarray, float]:
    """One textured image repeated."""
    n = round(seconds * fps)
    return np.repeat(texture(size, size, seed)[None], n, axis=0), 0.0


def _bounce(pos: np.ndarray, span: int) -> np.ndarray:
    """Positions reflected into [0, span] (a triangle wave), so a shape bounces off the borders instead of leaving."""
    period = 2 * span
    p = np.mod(pos, period)
    return np.where(p > span, period - p, p)


def moving_shape(
    size: int = 64,
    seconds: float = 3.0,
    fps: float = 8.0,
    speed: float = 1.0,
    shape: int = 16,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """A textured `shape`x`shape` square sliding right at `speed` pixels per frame over a still textured background.

    The square bounces off the right border if the clip is long enough to reach it; choose `speed * frames` below
    `size - shape - 4` to keep the motion uniform.
    """
    n = round(seconds * fps)
    background = texture(size, size, seed)
    patch = texture(shape, shape, seed + 1000)
    # a lighter patch with a dark rim: a clear edge against the background
    patch = (128 + patch // 2).astype(np.uint8)
    patch[[0, -1], :] = 0
    patch[:, [0, -1]] = 0
    xs = np.round(_bounce(2 + speed * np.arange(n), size - shape - 2)).astype(int)
    y = (size - shape) // 2
    frames = np.repeat(background[None], n, axis=0)
    for t, x in enumerate(xs):
        frames[t, y : y + shape, x : x + shape] = patch
    motion = speed * fps * (shape * shape) / (size * size) / size
    return frames, motion


def camera_pan(
    size: int = 64, seconds: float = 3.0, fps: float = 8.0, speed: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, float]:
    """A `size`x`size` window sliding right over a wider texture at `speed` pixels per frame (the whole picture
    moves left by `speed` per frame). Non-integer speeds are rendered by resampling a 4x finer texture."""
    n = round(seconds * fps)
    over = 4  # texture drawn 4x finer, so that quarter-pixel steps are exact
    span = int(np.ceil(speed * n)) + 2
    big = texture(size * over, (size + span) * over, seed, sigma=2.0 * over)
    frames = np.empty((n, size, size, 3), np.uint8)
    for t in range(n):
        x0 = round(speed * t * over)
        window = big[:, x0 : x0 + size * over].astype(np.float32)
        # average over-by-over blocks back to size x size
        frames[t] = window.reshape(size, over, size, over, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    return frames, speed * fps / size


GENERATORS = {"still": still, "shape": moving_shape, "pan": camera_pan}


def write_synthetic(path: str, kind: str, fps: float = 8.0, **kwargs) -> float:
    """Write a synthetic video (`kind` = still, shape or pan; kwargs go to the generator) as MP4 or GIF by the
    extension of `path`; returns its true motion (see the module docstring)."""
    frames, motion = GENERATORS[kind](fps=fps, **kwargs)
    fmt = "gif" if path.endswith(".gif") else "mp4"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_video(frames, path, fps, output_format=fmt)
    return motion


def write_corrupt(path: str, kind: str = "garbage", source: str | None = None) -> str:
    """A broken video file: "garbage" (random bytes), "empty" (zero bytes) or "truncated" (the first third of
    `source`, an existing video)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if kind == "garbage":
        data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    elif kind == "empty":
        data = b""
    elif kind == "truncated":
        with open(source, "rb") as f:
            data = f.read()
        data = data[: len(data) // 3]
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    with open(path, "wb") as f:
        f.write(data)
    return path
