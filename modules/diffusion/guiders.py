"""Classifier-free guidance on the denoised prediction.

A guider prepares the doubled batch (unconditional first, then conditional) and merges the two halves of the
denoiser's output. Guidance on the x0 prediction equals guidance on the network's v output, since D is affine in F
with the same scalings for both halves.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, ops

COND_KEYS = ("vector", "crossattn", "concat")


def _double(x: Tensor, sigma: Tensor, cond: dict, uc: dict, keys) -> tuple[Tensor, Tensor, dict]:
    merged = {}
    for k, v in cond.items():
        merged[k] = ops.cat([uc[k], v], axis=0) if k in keys else v
    return ops.cat([x, x], axis=0), ops.cat([sigma, sigma], axis=0), merged


class IdentityGuider:
    """No guidance: one evaluation of the conditional model."""

    def needs_uncond(self, num_frames: int) -> bool:
        return False

    def prepare_inputs(self, x: Tensor, sigma: Tensor, cond: dict, uc: dict) -> tuple[Tensor, Tensor, dict]:
        return x, sigma, cond

    def __call__(self, x: Tensor, sigma: Tensor, num_frames: int) -> Tensor:
        return x


class _PerFrameGuider:
    """out = x_u + scale_t * (x_c - x_u), with one scale per frame t of each clip; batch layout (b t) ..."""

    def __init__(self, additional_cond_keys: str | list[str] | None = None):
        extra = [additional_cond_keys] if isinstance(additional_cond_keys, str) else list(additional_cond_keys or [])
        self.cond_keys = COND_KEYS + tuple(extra)

    def frame_scales(self, num_frames: int) -> np.ndarray:
        raise NotImplementedError

    def needs_uncond(self, num_frames: int) -> bool:
        """A scale of exactly 1 on every frame returns the conditional prediction: the unconditional pass is skipped."""
        return bool(np.any(self.frame_scales(num_frames) != 1.0))

    def prepare_inputs(self, x: Tensor, sigma: Tensor, cond: dict, uc: dict) -> tuple[Tensor, Tensor, dict]:
        return _double(x, sigma, cond, uc, self.cond_keys)

    def __call__(self, x: Tensor, sigma: Tensor, num_frames: int) -> Tensor:
        x_u, x_c = ops.chunk(x, 2, axis=0)
        shape = x_u.shape
        b = shape[0] // num_frames
        scale = Tensor(self.frame_scales(num_frames).reshape((1, num_frames) + (1,) * (len(shape) - 1)), x.dtype)
        x_u = x_u.reshape((b, num_frames) + shape[1:])
        x_c = x_c.reshape((b, num_frames) + shape[1:])
        return (x_u + scale * (x_c - x_u)).reshape(shape)


class VanillaCFG(_PerFrameGuider):
    """One guidance scale for every frame."""

    def __init__(self, scale: float, additional_cond_keys: str | list[str] | None = None):
        super().__init__(additional_cond_keys)
        self.scale = scale

    def frame_scales(self, num_frames: int) -> np.ndarray:
        return np.full((num_frames,), self.scale, np.float32)


class LinearPredictionGuider(_PerFrameGuider):
    """The SVD guider: the scale grows linearly from min_scale at the first frame to max_scale at the last."""

    def __init__(
        self,
        max_scale: float,
        num_frames: int | None = None,
        min_scale: float = 1.0,
        additional_cond_keys: str | list[str] | None = None,
    ):
        super().__init__(additional_cond_keys)
        self.min_scale = min_scale
        self.max_scale = max_scale

    def frame_scales(self, num_frames: int) -> np.ndarray:
        return np.linspace(self.min_scale, self.max_scale, num_frames, dtype=np.float32)


class TrianglePredictionGuider(LinearPredictionGuider):
    """Scale rises from min_scale to max_scale at the middle frame and falls back (sgm's and ComfyUI's triangle)."""

    def frame_scales(self, num_frames: int) -> np.ndarray:
        t = np.linspace(0.0, 1.0, num_frames, dtype=np.float64)
        tri = 1.0 - np.abs(2.0 * t - 1.0)
        return (self.min_scale + (self.max_scale - self.min_scale) * tri).astype(np.float32)
