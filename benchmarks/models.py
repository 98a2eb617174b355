"""Models for the benchmarks, built from one of our model YAMLs: ours (MindSpore) and the matching diffusers ones.

The diffusers side is derived from the same config (widths, depths, heads, context sizes), so both sides always have
the same architecture: configs/tiny/svd_tiny.yaml gives the tiny models of the parity tests, configs/svd.yaml the
1.5 B-parameter SVD UNet and its temporal VAE. Weights are random; speed and memory do not depend on their values as
long as activations stay finite, so both sides use fan-in scaled normal weights.

Imports of torch/diffusers and of mindspore happen inside the functions, so that one benchmark process only ever
loads one framework.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from modules.config import load_config, to_container

# ----------------------------------------------------------------------------------------------------------------------
# Config access


def model_params(config: str) -> dict:
    """The `model.params` node of a model YAML as plain dicts."""
    return to_container(load_config(config))["model"]["params"]


def unet_params(config: str) -> dict:
    return dict(model_params(config)["network_config"]["params"])


def decoder_params(config: str) -> dict:
    return dict(model_params(config)["first_stage_config"]["params"]["decoder_config"]["params"])


def embedder_params(config: str, target_suffix: str) -> list[dict]:
    """Params of the conditioner embedders whose target ends with `target_suffix`, in config order."""
    models = model_params(config)["conditioner_config"]["params"]["emb_models"]
    return [dict(m.get("params") or {}) for m in models if m["target"].endswith(target_suffix)]


def latent_size(config: str, height: int, width: int) -> tuple[int, int]:
    f = 2 ** (len(decoder_params(config)["ch_mult"]) - 1)
    return height // f, width // f


# ----------------------------------------------------------------------------------------------------------------------
# diffusers / transformers (PyTorch)


def randomize(module: Any, seed: int) -> None:
    """Every parameter random (zero-initialised output layers and mix factors included), fan-in scaled."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.2))


def diffusers_unet_kwargs(config: str) -> dict:
    """UNetSpatioTemporalConditionModel arguments equal to the config's VideoUNet."""
    p = unet_params(config)
    mc, mult = p["model_channels"], list(p["channel_mult"])
    attn = set(p["attention_resolutions"])
    has_attn = [2**level in attn for level in range(len(mult))]
    chans = [mc * m for m in mult]
    if p.get("num_head_channels", -1) != -1:
        heads = [c // p["num_head_channels"] for c in chans]
    else:
        heads = [p["num_heads"]] * len(chans)
    time_dims = [e["outdim"] for e in embedder_params(config, "ConcatTimestepEmbedderND")]
    return dict(
        in_channels=p["in_channels"],
        out_channels=p["out_channels"],
        down_block_types=tuple(
            "CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal" for a in has_attn
        ),
        up_block_types=tuple(
            "CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal" for a in reversed(has_attn)
        ),
        block_out_channels=tuple(chans),
        addition_time_embed_dim=time_dims[0],
        projection_class_embeddings_input_dim=p["adm_in_channels"],
        layers_per_block=p["num_res_blocks"],
        cross_attention_dim=p["context_dim"],
        transformer_layers_per_block=p.get("transformer_depth", 1),
        num_attention_heads=tuple(heads),
        num_frames=model_params(config).get("num_frames", 14),
    )


def diffusers_unet(config: str, seed: int = 0, **overrides: Any):
    from diffusers import UNetSpatioTemporalConditionModel

    unet = UNetSpatioTemporalConditionModel(**{**diffusers_unet_kwargs(config), **overrides})
    randomize(unet, seed)
    return unet.eval().requires_grad_(False)


def diffusers_vae_kwargs(config: str) -> dict:
    p = decoder_params(config)
    chans = tuple(p["ch"] * m for m in p["ch_mult"])
    return dict(
        in_channels=p["in_channels"],
        out_channels=p["out_ch"],
        down_block_types=("DownEncoderBlock2D",) * len(chans),
        block_out_channels=chans,
        layers_per_block=p["num_res_blocks"],
        latent_channels=p["z_channels"],
    )


def diffusers_vae(config: str, seed: int = 1, **overrides: Any):
    from diffusers import AutoencoderKLTemporalDecoder

    vae = AutoencoderKLTemporalDecoder(**{**diffusers_vae_kwargs(config), **overrides})
    randomize(vae, seed)
    return vae.eval().requires_grad_(False)


def transformers_clip_config(config: str):
    """CLIPVisionConfig equal to the config's OpenCLIP image tower (ViT-H/14 or a custom one)."""
    from transformers import CLIPVisionConfig

    clip = embedder_params(config, "FrozenOpenCLIPImagePredictionEmbedder")[0]["open_clip_embedding_config"]["params"]
    if clip.get("arch", "ViT-H-14") == "ViT-H-14":
        width, layers, heads, patch, size, out, mlp = 1280, 32, 16, 14, 224, 1024, 4.0
    else:
        width, layers, heads = clip["width"], clip["layers"], clip["heads"]
        patch, size, out, mlp = clip["patch_size"], clip["image_size"], clip["output_dim"], clip.get("mlp_ratio", 4.0)
    return CLIPVisionConfig(
        image_size=size,
        patch_size=patch,
        hidden_size=width,
        intermediate_size=int(width * mlp),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=out,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


def diffusers_pipeline(config: str, seed: int = 0, unet_kwargs: dict | None = None, vae_kwargs: dict | None = None):
    """A random-weight diffusers StableVideoDiffusionPipeline with the config's architecture (`*_kwargs` override
    constructor arguments that do not change the weights, such as sample_size)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = diffusers_unet(config, seed, **(unet_kwargs or {}))
    vae = diffusers_vae(config, seed + 1, **(vae_kwargs or {}))
    clip = CLIPVisionModelWithProjection(transformers_clip_config(config))
    randomize(clip, seed + 2)
    clip = clip.eval().requires_grad_(False)
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=clip,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG),
        feature_extractor=CLIPImageProcessor(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The scheduler config shipped with the official diffusers SVD weights.
SVD_SCHEDULER_CONFIG = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    sigma_max=700.0,
    sigma_min=0.002,
    steps_offset=1,
    timestep_spacing="leading",
    timestep_type="continuous",
    use_karras_sigmas=True,
)


def tiny_diffusers_pipeline(path: str | None = None, config: str = "configs/tiny/svd_tiny.yaml"):
    """The tiny random-weight diffusers SVD pipeline matching configs/tiny/svd_tiny.yaml, saved under `path` if given
    (the parity tests import it through our converter's diffusers path)."""
    pipe = diffusers_pipeline(config, seed=0, unet_kwargs={"sample_size": 8}, vae_kwargs={"sample_size": 64})
    if path is not None:
        pipe.save_pretrained(path)
    return pipe


# ----------------------------------------------------------------------------------------------------------------------
# ours (MindSpore)


def fill_random(cell: Any, seed: int = 0) -> None:
    """Give every parameter of a (possibly lazily built) cell random values: fan-in scaled normal weights, and the
    constructor's own initial values for 1-D parameters (norm scales, biases, mix factors)."""
    import mindspore as ms
    from mindspore import Tensor

    rng = np.random.default_rng(seed)
    for p in cell.get_parameters():
        if len(p.shape) > 1:
            fan_in = int(np.prod(p.shape[1:]))
            data = rng.standard_normal(p.shape, dtype=np.float32)
            data *= 0.5 / math.sqrt(max(1, fan_in))
            p.set_data(Tensor(data, ms.float32))
        elif p.has_init:
            p.init_data()


def our_unet(config: str, seed: int = 0):
    """The config's VideoUNet with random weights, built without the default initialisation."""
    from mindspore.nn.utils import no_init_parameters

    from modules.config import instantiate

    node = model_params(config)["network_config"]
    with no_init_parameters():
        unet = instantiate(node)
    fill_random(unet, seed)
    return unet.set_train(False)


def our_denoiser(config: str, seed: int = 0):
    """A DenoiseCell (scalings + concat + UNet) over a random-weight UNet, without the rest of the engine."""
    from modules.config import instantiate
    from modules.engine import DenoiseCell, DiffusionWrapper

    denoiser = instantiate(model_params(config)["denoiser_config"])
    cell = DenoiseCell(DiffusionWrapper(our_unet(config, seed)), denoiser.scaling)
    return cell.set_train(False)


def our_decoder(config: str, seed: int = 1):
    """The config's first-stage decoder (VideoDecoder) with random weights."""
    from mindspore.nn.utils import no_init_parameters

    from modules.config import instantiate

    node = model_params(config)["first_stage_config"]["params"]["decoder_config"]
    with no_init_parameters():
        decoder = instantiate(node)
    fill_random(decoder, seed)
    return decoder.set_train(False)


def our_engine(config: str, seed: int = 0):
    """The whole engine (UNet, conditioner with CLIP and encoder, first stage) with random weights."""
    from modules.build import build_engine

    engine = build_engine(config, lazy=True)
    # one image encoder for the first stage and the conditioning frame, as diffusers' pipeline has (and as
    # build_engine loads a checkpoint that holds the same encoder twice)
    for prefix in engine.image_encoder_copies():
        engine.share_image_encoder(prefix)
    fill_random(engine, seed)
    return engine.set_train(False)
