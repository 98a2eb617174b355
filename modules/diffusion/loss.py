"""The denoising score-matching loss of the EDM recipe, one value per sample."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops


class StandardDiffusionLoss:
    """mean over non-batch axes of w(sigma) * |D(x + n sigma; sigma) - x|^p, in float32 (p = 2 for "l2", 1 for "l1").

    `offset_noise_level` adds a per-(sample, channel) constant to the noise, which helps very dark or bright frames.
    """

    def __init__(self, loss_type: str = "l2", offset_noise_level: float = 0.0, keep_loss_fp32: bool = True):
        if loss_type not in ("l2", "l1"):
            raise ValueError(f"loss_type must be 'l2' or 'l1', got {loss_type!r}")
        self.loss_type = loss_type
        self.offset_noise_level = offset_noise_level
        self.keep_loss_fp32 = keep_loss_fp32

    def sample_noise(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """Standard normal noise for a (N, C, ...) batch, plus the optional per-(sample, channel) offset."""
        noise = rng.standard_normal(shape).astype(np.float32)
        if self.offset_noise_level > 0:
            offset = rng.standard_normal(shape[:2] + (1,) * (len(shape) - 2)).astype(np.float32)
            noise = noise + self.offset_noise_level * offset
        return noise

    def noise_input(self, x: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """x + noise * sigma, with sigma broadcast to x's rank."""
        return x + noise * sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))

    def __call__(self, pred: Tensor, target: Tensor, w: Tensor) -> Tensor:
        if self.keep_loss_fp32:
            pred, target, w = pred.astype(ms.float32), target.astype(ms.float32), w.astype(ms.float32)
        diff = pred - target
        err = diff * diff if self.loss_type == "l2" else ops.abs(diff)
        w = w.reshape(w.shape + (1,) * (err.ndim - w.ndim))
        return (w * err).reshape(err.shape[0], -1).mean(axis=1)
