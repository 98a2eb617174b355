"""Config-driven construction: every `{target: dotted.path, params: {...}}` node becomes an object.

The model YAML keeps the sgm `target`/`params` shape. Official sgm target paths are accepted too and resolve to this
project's classes, so an official config file can be used as it is.
"""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

# Official sgm class paths -> ours.
_SGM = "sgm.modules.diffusionmodules."
_ENC = "sgm.modules.encoders.modules."
SGM_ALIASES = {
    "sgm.models.diffusion.DiffusionEngine": "modules.engine.VideoDiffusionEngine",
    _SGM + "video_model.VideoUNet": "modules.unet.VideoUNet",
    _SGM + "denoiser.Denoiser": "modules.diffusion.denoiser.Denoiser",
    _SGM + "denoiser_scaling.VScalingWithEDMcNoise": "modules.diffusion.denoiser.VScalingWithEDMcNoise",
    _SGM + "denoiser_scaling.EDMScaling": "modules.diffusion.denoiser.EDMScaling",
    _SGM + "denoiser_weighting.EDMWeighting": "modules.diffusion.denoiser.EDMWeighting",
    _SGM + "denoiser_weighting.VWeighting": "modules.diffusion.denoiser.VWeighting",
    _SGM + "denoiser_weighting.EpsWeighting": "modules.diffusion.denoiser.EpsWeighting",
    _SGM + "discretizer.EDMDiscretization": "modules.diffusion.discretization.EDMDiscretization",
    _SGM + "sampling.EulerEDMSampler": "modules.diffusion.sampler.EulerEDMSampler",
    _SGM + "guiders.LinearPredictionGuider": "modules.diffusion.guiders.LinearPredictionGuider",
    _SGM + "guiders.TrianglePredictionGuider": "modules.diffusion.guiders.TrianglePredictionGuider",
    _SGM + "guiders.VanillaCFG": "modules.diffusion.guiders.VanillaCFG",
    _SGM + "guiders.IdentityGuider": "modules.diffusion.guiders.IdentityGuider",
    _SGM + "loss.StandardDiffusionLoss": "modules.diffusion.loss.StandardDiffusionLoss",
    _SGM + "sigma_sampling.EDMSampling": "modules.diffusion.sigma_sampling.EDMSampling",
    "sgm.modules.GeneralConditioner": "modules.conditioner.GeneralConditioner",
    _ENC + "GeneralConditioner": "modules.conditioner.GeneralConditioner",
    _ENC + "FrozenOpenCLIPImagePredictionEmbedder": "modules.clip.FrozenOpenCLIPImagePredictionEmbedder",
    _ENC + "FrozenOpenCLIPImageEmbedder": "modules.clip.FrozenOpenCLIPImageEmbedder",
    _ENC + "ConcatTimestepEmbedderND": "modules.conditioner.ConcatTimestepEmbedderND",
    _ENC + "VideoPredictionEmbedderWithEncoder": "modules.conditioner.VideoPredictionEmbedderWithEncoder",
    "sgm.models.autoencoder.AutoencodingEngine": "modules.autoencoder.AutoencodingEngine",
    "sgm.models.autoencoder.AutoencoderKL": "modules.autoencoder.AutoencoderKL",
    "sgm.models.autoencoder.AutoencoderKLModeOnly": "modules.autoencoder.AutoencoderKLModeOnly",
    _SGM + "model.Encoder": "modules.autoencoder.Encoder",
    _SGM + "model.Decoder": "modules.autoencoder.Decoder",
    "sgm.modules.autoencoding.temporal_ae.VideoDecoder": "modules.autoencoder.VideoDecoder",
    "sgm.modules.autoencoding.regularizers.DiagonalGaussianRegularizer": (
        "modules.autoencoder.DiagonalGaussianRegularizer"
    ),
    "torch.nn.Identity": "modules.layers.Identity",
}


def get_obj(path: str) -> Any:
    """Import `package.module.Name`."""
    path = SGM_ALIASES.get(path, path)
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"config target {path!r} is not a dotted path")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"config target {path!r} cannot be imported: {e}") from e


def to_container(cfg: Any) -> Any:
    """OmegaConf nodes to plain dicts and lists, resolving interpolations."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def instantiate(config: Any, **overrides: Any) -> Any:
    """Build `config["target"](**config["params"], **overrides)`."""
    config = to_container(config)
    if not isinstance(config, dict) or "target" not in config:
        raise ValueError(f"expected a {{target, params}} node, got {config!r}")
    params = dict(config.get("params") or {})
    params.update(overrides)
    return get_obj(config["target"])(**params)


def load_config(path: str) -> DictConfig:
    """Read a model YAML; the engine node may sit under `model:` (sgm layout) or at the top."""
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError as e:
        raise ValueError(f"config file not found: {path}") from e
    except Exception as e:  # omegaconf raises several yaml error types
        raise ValueError(f"config file {path} is not valid YAML: {e}") from e
    if "model" not in cfg:
        raise ValueError(f"config file {path} has no `model:` section")
    return cfg
