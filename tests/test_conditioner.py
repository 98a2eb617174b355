"""The conditioner's routing, unconditional embeddings and conditioning dropout on the tiny config."""

import numpy as np
import pytest
from mindspore import Tensor

from modules.build import build_engine
from modules.conditioner import scalar_batch
from modules.env import available_device


@pytest.fixture(scope="module")
def conditioner():
    return build_engine("configs/tiny/svd_tiny.yaml").conditioner


def batch(n_frames=3, n_images=1, seed=0):
    img = np.random.default_rng(seed).uniform(-1, 1, (n_images, 3, 64, 64)).astype(np.float32)
    scalars = scalar_batch({"fps_id": 6, "motion_bucket_id": 127, "cond_aug": 0.02}, n_frames)
    return {"cond_frames_without_noise": Tensor(img), "cond_frames": Tensor(img), **scalars}


def test_routing_by_rank(conditioner):
    out = conditioner.construct_dict(batch())
    assert out["crossattn"].shape == (1, 1, 32)  # CLIP image embedding
    assert out["concat"].shape == (1, 4, 8, 8)  # VAE latent of the conditioning frame
    assert out["vector"].shape == (3, 48)  # fps_id | motion_bucket_id | cond_aug, 16 each


def test_unconditional_zeroes_only_the_image_embeddings(conditioner):
    c, uc = conditioner.get_unconditional_conditioning(
        batch(), force_uc_zero_embeddings=["cond_frames", "cond_frames_without_noise"]
    )
    assert np.abs(c["crossattn"].asnumpy()).max() > 0 and np.abs(c["concat"].asnumpy()).max() > 0
    assert np.all(uc["crossattn"].asnumpy() == 0) and np.all(uc["concat"].asnumpy() == 0)
    np.testing.assert_array_equal(uc["vector"].asnumpy(), c["vector"].asnumpy())


def test_ucg_dropout_zeroes_whole_samples(conditioner):
    rates = conditioner.ucg_rates
    conditioner.ucg_rates = [0.5, 0.0, 0.0, 0.5, 0.0]
    try:
        out = conditioner.construct_dict(batch(n_frames=64, n_images=64), ucg_rng=np.random.default_rng(1))
    finally:
        conditioner.ucg_rates = rates
    clip = np.abs(out["crossattn"].asnumpy()).reshape(64, -1).max(axis=1)
    lat = np.abs(out["concat"].asnumpy()).reshape(64, -1).max(axis=1)
    assert 10 < (clip == 0).sum() < 54 and 10 < (lat == 0).sum() < 54
    assert (clip > 0).sum() + (clip == 0).sum() == 64  # whole samples, never parts
    assert np.all(np.abs(out["vector"].asnumpy()).max(axis=1) > 0)  # rate 0: never dropped
    # the draws are independent per embedder
    assert not np.array_equal(clip == 0, lat == 0)


def test_device_is_picked_automatically():
    assert available_device() in ("CPU", "GPU", "Ascend")
