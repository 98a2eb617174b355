"""Training noise levels. Draws come from a numpy Generator so a resumed run repeats them exactly."""

from __future__ import annotations

import numpy as np


class EDMSampling:
    """ln(sigma) ~ N(p_mean, p_std^2) (Karras et al. 2022, sec. 5); SVD fine-tunes with p_mean 1.0, p_std 1.6."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        self.p_mean = p_mean
        self.p_std = p_std

    def __call__(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.exp(self.p_mean + self.p_std * rng.standard_normal(n)).astype(np.float32)


class DiscreteSampling:
    """Uniform over a fixed set of sigmas (for example a discretization's levels)."""

    def __init__(self, sigmas: list[float]):
        self.table = np.asarray(sigmas, np.float32)

    def __call__(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.table[rng.integers(0, len(self.table), n)]
