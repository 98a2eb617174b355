"""End to end against diffusers: a tiny random-weight SVD saved as a diffusers folder, imported through the
converter's diffusers path, sampled for 3 steps with guidance and the same noise by both implementations."""

import numpy as np
import pytest
import torch
from PIL import Image

from modules.build import build_engine
from modules.pipeline import SVDPipeline
from tests.conftest import SVD_SCHEDULER_CONFIG, rel_err

TINY = "configs/tiny/svd_tiny.yaml"


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, zero-initialised output layers and mix factors included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.2))


def tiny_diffusers_pipeline(path):
    """A tiny random-weight diffusers SVD pipeline matching configs/tiny/svd_tiny.yaml, saved under `path`."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = UNetSpatioTemporalConditionModel(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),
        addition_time_embed_dim=16,
        projection_class_embeddings_input_dim=48,
        layers_per_block=2,
        cross_attention_dim=32,
        transformer_layers_per_block=1,
        num_attention_heads=(2, 4),
        num_frames=4,
    )
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        latent_channels=4,
        sample_size=64,
    )
    clip = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            image_size=224,
            patch_size=32,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        )
    )
    for i, m in enumerate((unet, vae, clip)):
        randomize(m, i)
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=clip,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG),
        feature_extractor=CLIPImageProcessor(),
    )
    pipe.save_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("svd_tiny_diffusers")
    torch.manual_seed(0)
    return path, tiny_diffusers_pipeline(path)


def test_three_step_sampling_matches_diffusers(tiny):
    tiny_folder, ref_pipe = tiny
    t, h, w, steps = 4, 64, 64, 3
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    latents = rng.standard_normal((t, 4, h // 8, w // 8)).astype(np.float32)
    image_noise = torch.randn((1, 3, h, w), generator=torch.Generator().manual_seed(3))
    kwargs = dict(
        num_frames=t,
        num_inference_steps=steps,
        min_guidance_scale=1.0,
        max_guidance_scale=2.5,
        fps=7,
        motion_bucket_id=127,
        noise_aug_strength=0.02,
        decode_chunk_size=3,  # does not divide the frame count: the last chunk is shorter
    )

    ref = ref_pipe(
        image,
        height=h,
        width=w,
        generator=torch.Generator().manual_seed(3),  # its first draw is the conditioning-frame noise
        latents=torch.tensor(latents[None]),
        output_type="np",
        **kwargs,
    ).frames[0]

    engine = build_engine(TINY, checkpoint=str(tiny_folder))
    ours = SVDPipeline(engine, verbose=False)(
        image, latents=latents, image_noise=image_noise.numpy(), output_type="np", **kwargs
    ).frames[0]
    assert ours.shape == ref.shape == (t, h, w, 3)
    assert rel_err(ours, ref) <= 1e-3

    latent_ours = SVDPipeline(engine, verbose=False)(
        image, latents=latents, image_noise=image_noise.numpy(), output_type="latent", **kwargs
    ).frames[0]
    latent_ref = ref_pipe(
        image,
        height=h,
        width=w,
        generator=torch.Generator().manual_seed(3),
        latents=torch.tensor(latents[None]),
        output_type="latent",
        **kwargs,
    ).frames[0]
    assert rel_err(latent_ours, latent_ref.numpy()) <= 1e-3
