"""EDM samplers (Karras et al. 2022, Algorithm 2), driven by a denoiser function and a guider."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from mindspore import Tensor
from tqdm.auto import tqdm

from modules.config import instantiate

# denoise_fn(x, sigma, cond) -> D(x; sigma), with x (N, C, H, W) and sigma (N,)
DenoiseFn = Callable[[Tensor, Tensor, dict], Tensor]
# callback(step, num_steps, sigma, x, denoised)
StepCallback = Callable[[int, int, float, Tensor, Tensor], None]


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma."""
    return (x - denoised) / sigma


class EulerEDMSampler:
    """Euler steps along the probability-flow ODE, with optional stochastic churn (s_churn = 0: deterministic).

    Each step: sigma_hat = sigma_i (1 + gamma); optionally add noise up to sigma_hat; D = denoise(x, sigma_hat);
    x <- x + (sigma_{i+1} - sigma_hat) (x - D) / sigma_hat.
    """

    def __init__(
        self,
        num_steps: int,
        discretization_config: dict,
        guider_config: dict | None = None,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        verbose: bool = False,
    ):
        self.num_steps = num_steps
        self.discretization = instantiate(discretization_config)
        self.guider = instantiate(guider_config or {"target": "modules.diffusion.guiders.IdentityGuider"})
        self.s_churn = s_churn
        self.s_tmin = s_tmin
        self.s_tmax = s_tmax
        self.s_noise = s_noise
        self.verbose = verbose

    def sigmas(self, num_steps: int | None = None) -> np.ndarray:
        return self.discretization(num_steps or self.num_steps)

    def guided_denoise(
        self, denoise_fn: DenoiseFn, x: Tensor, sigma: float, cond: dict, uc: dict, num_frames: int
    ) -> Tensor:
        s = Tensor(np.full((x.shape[0],), sigma, np.float32))
        if not self.guider.needs_uncond(num_frames):
            return denoise_fn(x, s, cond)
        xg, sg, cg = self.guider.prepare_inputs(x, s, cond, uc)
        return self.guider(denoise_fn(xg, sg, cg), sg, num_frames)

    def __call__(
        self,
        denoise_fn: DenoiseFn,
        noise: Tensor,
        cond: dict,
        uc: dict,
        num_frames: int,
        num_steps: int | None = None,
        callback: StepCallback | None = None,
        rng: np.random.Generator | None = None,
    ) -> Tensor:
        """Sample from pure noise x_T = noise * sqrt(1 + sigma_0^2) (the model's input scale at sigma_0)."""
        sigmas = self.sigmas(num_steps)
        n = len(sigmas) - 1
        x = noise * float(math.sqrt(1.0 + float(sigmas[0]) ** 2))
        for i in tqdm(range(n), desc="sampling", disable=not self.verbose, leave=False):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            gamma = min(self.s_churn / n, 2**0.5 - 1) if self.s_tmin <= sigma <= self.s_tmax else 0.0
            sigma_hat = sigma * (gamma + 1.0)
            if gamma > 0:
                rng = rng or np.random.default_rng()
                eps = Tensor(rng.standard_normal(x.shape).astype(np.float32)) * self.s_noise
                x = x + eps * float(math.sqrt(sigma_hat**2 - sigma**2))
            denoised = self.guided_denoise(denoise_fn, x, sigma_hat, cond, uc, num_frames)
            x = x + to_d(x, sigma_hat, denoised) * (sigma_next - sigma_hat)
            if callback is not None:
                callback(i, n, sigma_hat, x, denoised)
        return x
