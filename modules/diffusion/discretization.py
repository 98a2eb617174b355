"""Noise-level schedules for sampling, as plain float32 arrays from the highest sigma down to 0."""

from __future__ import annotations

import numpy as np


class EDMDiscretization:
    """Karras et al. 2022, eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho.

    SVD samples with sigma_max = 700 (the model was trained at very high noise for the image-to-video task).
    Computed in float64 and rounded once, then a final 0 is appended.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.rho = rho

    def get_sigmas(self, n: int) -> np.ndarray:
        ramp = np.linspace(0.0, 1.0, n, dtype=np.float64)
        lo, hi = self.sigma_min ** (1.0 / self.rho), self.sigma_max ** (1.0 / self.rho)
        return (hi + ramp * (lo - hi)) ** self.rho

    def __call__(self, n: int, do_append_zero: bool = True) -> np.ndarray:
        if n < 1:
            raise ValueError(f"the number of sampling steps must be at least 1, got {n}")
        sigmas = self.get_sigmas(n)
        if do_append_zero:
            sigmas = np.append(sigmas, 0.0)
        return sigmas.astype(np.float32)
