"""The recipe parts (schedule, scalings, guiders, sampler step, embeddings) against diffusers' SVD scheduler."""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from mindspore import Tensor

from modules.conditioner import ConcatTimestepEmbedderND
from modules.diffusion.denoiser import EDMWeighting, VScalingWithEDMcNoise
from modules.diffusion.discretization import EDMDiscretization
from modules.diffusion.guiders import LinearPredictionGuider, TrianglePredictionGuider, VanillaCFG
from modules.diffusion.loss import StandardDiffusionLoss
from modules.diffusion.sampler import EulerEDMSampler
from modules.diffusion.sigma_sampling import EDMSampling
from tests.conftest import SVD_SCHEDULER_CONFIG, rel_err


def svd_scheduler(steps):
    sched = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("steps", [3, 25])
def test_sigma_schedule_matches_diffusers(steps):
    ours = EDMDiscretization(sigma_max=700.0)(steps)
    ref = svd_scheduler(steps).sigmas.numpy()
    assert ours.shape == (steps + 1,) and ours[-1] == 0
    assert rel_err(ours, ref) <= 1e-6
    assert np.all(np.diff(ours) < 0)


def test_scalings_match_diffusers_v_prediction():
    sigma = np.array([0.002, 0.1, 1.0, 30.0, 700.0], np.float32)
    c_skip, c_out, c_in, c_noise = (x.asnumpy() for x in VScalingWithEDMcNoise()(Tensor(sigma)))
    sched = svd_scheduler(25)
    # diffusers' continuous v-prediction timestep and input scaling
    assert rel_err(c_noise, 0.25 * np.log(sigma)) <= 1e-6
    assert rel_err(c_in, 1 / np.sqrt(sigma**2 + 1)) <= 1e-6
    # x0 = c_out * v + c_skip * x is diffusers' v_prediction formula
    assert rel_err(c_out, -sigma / np.sqrt(sigma**2 + 1)) <= 1e-6
    assert rel_err(c_skip, 1 / (sigma**2 + 1)) <= 1e-6
    assert sched.config.prediction_type == "v_prediction"
    w = EDMWeighting(sigma_data=1.0)(Tensor(sigma)).asnumpy()
    assert rel_err(w, (sigma**2 + 1) / sigma**2) <= 1e-6


def test_euler_sampler_matches_diffusers_scheduler(rng):
    """Three Euler steps with a fixed toy denoiser, ours vs diffusers' scheduler loop."""
    steps = 3
    x0 = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    target = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)

    def v_model(x_in, sigma):  # a smooth stand-in for the network's v output
        return np.tanh(x_in * 0.5 + target) * (1 + 0.1 * sigma)

    sched = svd_scheduler(steps)
    x = torch.tensor(x0) * sched.init_noise_sigma
    for t in sched.timesteps:
        sigma = float(sched.sigmas[sched.step_index or 0])
        inp = sched.scale_model_input(x, t)
        v = torch.tensor(v_model(inp.numpy(), 0.25 * np.log(sigma)))
        x = sched.step(v, t, x).prev_sample
    ref = x.numpy()

    scaling = VScalingWithEDMcNoise()

    def denoise(x, sigma, cond):
        s = sigma.reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = scaling(s)
        v = Tensor(v_model((x * c_in).asnumpy(), c_noise.asnumpy()).astype(np.float32))
        return v * c_out + x * c_skip

    sampler = EulerEDMSampler(
        steps, {"target": "modules.diffusion.discretization.EDMDiscretization", "params": {"sigma_max": 700.0}}
    )
    ours = sampler(denoise, Tensor(x0), {}, {}, num_frames=1).asnumpy()
    assert rel_err(ours, ref) <= 1e-5


def test_linear_guider_per_frame_scales():
    t, b = 5, 2
    x_u = np.zeros((b * t, 1), np.float32)
    x_c = np.ones((b * t, 1), np.float32)
    g = LinearPredictionGuider(max_scale=3.0, min_scale=1.5)
    out = g(Tensor(np.concatenate([x_u, x_c])), None, num_frames=t).asnumpy().reshape(b, t)
    np.testing.assert_allclose(out, np.tile(np.linspace(1.5, 3.0, t), (b, 1)), rtol=1e-6)
    assert g.needs_uncond(t)
    assert not LinearPredictionGuider(max_scale=1.0, min_scale=1.0).needs_uncond(t)
    np.testing.assert_allclose(VanillaCFG(2.0).frame_scales(3), [2.0, 2.0, 2.0])
    tri = TrianglePredictionGuider(max_scale=3.0, min_scale=1.0).frame_scales(5)
    np.testing.assert_allclose(tri, [1.0, 2.0, 3.0, 2.0, 1.0], rtol=1e-6)


def test_guider_prepare_inputs_orders_uncond_first():
    g = LinearPredictionGuider(max_scale=2.0)
    c = {"crossattn": Tensor(np.ones((2, 1, 3), np.float32)), "vector": Tensor(np.ones((2, 4), np.float32))}
    uc = {"crossattn": Tensor(np.zeros((2, 1, 3), np.float32)), "vector": Tensor(np.full((2, 4), 5, np.float32))}
    x, s, cond = g.prepare_inputs(Tensor(np.ones((2, 1), np.float32)), Tensor(np.ones(2, np.float32)), c, uc)
    assert x.shape == (4, 1) and s.shape == (4,)
    assert cond["crossattn"].asnumpy()[:2].sum() == 0 and cond["crossattn"].asnumpy()[2:].min() == 1
    assert cond["vector"].asnumpy()[0, 0] == 5


def test_micro_condition_embedding_matches_diffusers_time_proj():
    from diffusers.models.embeddings import Timesteps

    ids = np.array([6.0, 127.0, 0.02], np.float32)
    ref = Timesteps(256, True, downscale_freq_shift=0)(torch.tensor(ids)).numpy()
    ours = ConcatTimestepEmbedderND(256)(Tensor(ids)).asnumpy()
    assert rel_err(ours, ref) <= 1e-5
    two = ConcatTimestepEmbedderND(8)(Tensor(np.array([[1.0, 2.0]], np.float32))).asnumpy()
    assert two.shape == (1, 16)


def test_sigma_sampling_and_loss(rng):
    s = EDMSampling(p_mean=1.0, p_std=1.6)(20000, rng)
    assert abs(np.log(s).mean() - 1.0) < 0.05 and abs(np.log(s).std() - 1.6) < 0.05
    loss = StandardDiffusionLoss()
    pred = Tensor(np.ones((2, 3, 2, 2), np.float32))
    target = Tensor(np.zeros((2, 3, 2, 2), np.float32))
    np.testing.assert_allclose(loss(pred, target, Tensor(np.array([1.0, 2.0], np.float32))).asnumpy(), [1.0, 2.0])
    noise = StandardDiffusionLoss(offset_noise_level=0.1).sample_noise((2, 3, 4, 4), np.random.default_rng(0))
    assert noise.shape == (2, 3, 4, 4)
