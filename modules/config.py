"""Config-driven construction: every `{target: dotted.path, params: {...}}` node becomes an object.

The model YAML keeps the sgm `target`/`params` shape. Official sgm target paths are accepted too and resolve to this
project's classes, so an official config file can be used as it is.
"""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

# Official sgm class paths -> ours.
SGM_ALIASES = {
    "sgm.models.diffusion.DiffusionEngine": "modules.engine.VideoDiffusionEngine",
    "sgm.modules.diffusionmodules.video_model.VideoUNet": "modules.unet.VideoUNet",
    "sgm.modules.diffusionmodules.denoiser.Denoiser": "modules.diffusion.denoiser.Denoiser",
    "sgm.modules.diffusionmodules.denoiser_scaling.VScalingWithEDMcNoise": "modules.diffusion.denoiser.VScalingWithEDMcNoise",
    "sgm.modules.diffusionmodules.denoiser_scaling.EDMScaling": "modules.diffusion.denoiser.EDMScaling",
    "sgm.modules.diffusionmodules.denoiser_weighting.EDMWeighting": "modules.diffusion.denoiser.EDMWeighting",
    "sgm.modules.diffusionmodules.denoiser_weighting.VWeighting": "modules.diffusion.denoiser.VWeighting",
    "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting": "modules.diffusion.denoiser.EpsWeighting",
    "sgm.modules.diffusionmodules.discretizer.EDMDiscretization": "modules.diffusion.discretization.EDMDiscretization",
    "sgm.modules.diffusionmodules.sampling.EulerEDMSampler": "modules.diffusion.sampler.EulerEDMSampler",
    "sgm.modules.diffusionmodules.guiders.LinearPredictionGuider": "modules.diffusion.guiders.LinearPredictionGuider",
    "sgm.modules.diffusionmodules.guiders.TrianglePredictionGuider": "modules.diffusion.guiders.TrianglePredictionGuider",
    "sgm.modules.diffusionmodules.guiders.VanillaCFG": "modules.diffusion.guiders.VanillaCFG",
    "sgm.modules.diffusionmodules.guiders.IdentityGuider": "modules.diffusion.guiders.IdentityGuider",
    "sgm.modules.diffusionmodules.loss.StandardDiffusionLoss": "modules.diffusion.loss.StandardDiffusionLoss",
    "sgm.modules.diffusionmodules.sigma_sampling.EDMSampling": "modules.diffusion.sigma_sampling.EDMSampling",
    "sgm.modules.GeneralConditioner": "modules.conditioner.GeneralConditioner",
    "sgm.modules.encoders.modules.GeneralConditioner": "modules.conditioner.GeneralConditioner",
    "sgm.modules.encoders.modules.FrozenOpenCLIPImagePredictionEmbedder": "modules.clip.FrozenOpenCLIPImagePredictionEmbedder",
    "sgm.modules.encoders.modules.FrozenOpenCLIPImageEmbedder": "modules.clip.FrozenOpenCLIPImageEmbedder",
    "sgm.modules.encoders.modules.ConcatTimestepEmbedderND": "modules.conditioner.ConcatTimestepEmbedderND",
    "sgm.modules.encoders.modules.VideoPredictionEmbedderWithEncoder": "modules.conditioner.VideoPredictionEmbedderWithEncoder",
    "sgm.models.autoencoder.AutoencodingEngine": "modules.autoencoder.AutoencodingEngine",
    "sgm.models.autoencoder.AutoencoderKLModeOnly": "modules.autoencoder.AutoencoderKLModeOnly",
    "sgm.modules.diffusionmodules.model.Encoder": "modules.autoencoder.Encoder",
    "sgm.modules.diffusionmodules.model.Decoder": "modules.autoencoder.Decoder",
    "sgm.modules.autoencoding.temporal_ae.VideoDecoder": "modules.autoencoder.VideoDecoder",
    "sgm.modules.autoencoding.regularizers.DiagonalGaussianRegularizer": "modules.autoencoder.DiagonalGaussianRegularizer",
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
