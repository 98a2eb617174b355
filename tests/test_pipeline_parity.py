"""End to end against diffusers: a tiny random-weight SVD saved as a diffusers folder, imported through the
converter's diffusers path, sampled for 3 steps with guidance and the same noise by both implementations."""

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.models import tiny_diffusers_pipeline
from modules.build import build_engine
from modules.pipeline import SVDPipeline
from tests.conftest import rel_err

TINY = "configs/tiny/svd_tiny.yaml"


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
