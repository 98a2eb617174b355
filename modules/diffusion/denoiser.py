"""Denoiser scalings and loss weightings (Karras et al. 2022, "Elucidating the Design Space", Table 1).

A denoiser turns the network F into D(x; sigma) = c_skip * x + c_out * F(c_in * x, c_noise). The scalings and
weightings take sigma already broadcast to the sample's rank and work on MindSpore tensors.
"""

from __future__ import annotations

from mindspore import Tensor, jit_class, ops


@jit_class
class VScalingWithEDMcNoise:
    """v-prediction with EDM's noise conditioning, sigma_data = 1 (the SVD parametrisation).

    c_skip = 1/(s^2+1), c_out = -s/sqrt(s^2+1), c_in = 1/sqrt(s^2+1), c_noise = ln(s)/4.
    """

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s2 = sigma * sigma + 1.0
        c_skip = 1.0 / s2
        c_out = -sigma / ops.sqrt(s2)
        c_in = 1.0 / ops.sqrt(s2)
        c_noise = 0.25 * ops.log(sigma)
        return c_skip, c_out, c_in, c_noise


@jit_class
class EDMScaling:
    """EDM preconditioning for x0 targets with a given sigma_data (Karras et al. 2022, eq. 7)."""

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma * sigma + sd2)
        c_out = sigma * self.sigma_data / ops.sqrt(sigma * sigma + sd2)
        c_in = 1.0 / ops.sqrt(sigma * sigma + sd2)
        c_noise = 0.25 * ops.log(sigma)
        return c_skip, c_out, c_in, c_noise


@jit_class
class EDMWeighting:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2, which makes the loss unit-variance."""

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def __call__(self, sigma: Tensor) -> Tensor:
        return (sigma * sigma + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


class VWeighting(EDMWeighting):
    """The EDM weighting at sigma_data = 1, i.e. the v-prediction loss."""

    def __init__(self):
        super().__init__(sigma_data=1.0)


@jit_class
class EpsWeighting:
    """lambda(sigma) = sigma^-2, the epsilon-prediction loss."""

    def __call__(self, sigma: Tensor) -> Tensor:
        return 1.0 / (sigma * sigma)


@jit_class
class UnitWeighting:
    def __call__(self, sigma: Tensor) -> Tensor:
        return ops.ones_like(sigma)


class Denoiser:
    """Holds the scaling (and the training weighting) a config picks; the engine applies them around the UNet."""

    def __init__(self, scaling_config: dict, weighting_config: dict | None = None):
        from modules.config import instantiate

        self.scaling = instantiate(scaling_config)
        self.weighting = instantiate(weighting_config) if weighting_config else UnitWeighting()
