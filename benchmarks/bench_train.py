"""One fine-tuning step (temporal layers only by default) on a random clip with random weights: ours (train.py's
Trainer: VAE sample and conditioner outside the gradient, then the compiled loss, gradients and AdamW) against the
same step written with diffusers and torch.optim.AdamW, as the public SVD fine-tuning scripts do.

    python benchmarks/bench_train.py                      # the tiny config, 4 frames of 64x64
    python benchmarks/bench_train.py --preset svd         # the real SVD (1.5 B UNet), 14 frames of 128x128
    python benchmarks/bench_train.py --preset small       # configs/tiny/svd_small.yaml, 8 frames of 128x128
    python benchmarks/bench_train.py --side ours --full_unet --recompute     # ours only, other settings

Both sides: one clip per step, one sigma per clip from the config's log-normal, EDM weighting, v-prediction, AdamW
(lr 1e-5, betas 0.9/0.999, weight decay 0.01), no accumulation, fp32. The last line is `ours_s=... ref_s=...
ratio=...` (median seconds per optimizer step); the trained parameter counts of both sides are printed to compare.
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks import harness
from benchmarks.harness import Case, Measurement
from benchmarks.models import model_params

# diffusers' names of the temporal layers (ours: modules.unet.TEMPORAL_KEYWORDS)
DIFFUSERS_TEMPORAL = ("temporal_res_block", "temporal_transformer_blocks", "time_pos_embed", "time_mixer")


def clip(case: Case) -> np.ndarray:
    """(frames, 3, H, W) in [-1, 1]."""
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (case.frames, 3, case.height, case.width)).astype(np.float32)


def our_step(case: Case):
    """(run, trained parameters): `run()` is one step of our trainer (its first call compiles the graphs)."""
    from mindspore import Tensor

    harness.mindspore_setup(case)
    from modules.training import (
        OptimizerSettings,
        SchedulerSettings,
        StepSettings,
        Trainer,
        build_training_engine,
        lr_schedule,
        select_trainable,
    )

    engine = build_training_engine(case.config, None, case.extra["recompute"], 0.1)
    harness.log_memory("after the build")
    rng = np.random.default_rng(0)
    for p in engine.unet.get_parameters():  # fill zero-initialised layers so that every layer gets gradients
        if not p.asnumpy().any():
            p.set_data(Tensor(rng.normal(0.0, 0.02, p.shape).astype(np.float32)))
    params = select_trainable(engine, not case.extra["full_unet"])
    steps = case.warmup + case.runs + 1
    lr = lr_schedule(SchedulerSettings(name="constant", lr=1e-5), steps)
    trainer = Trainer(engine, params, case.frames, lr, OptimizerSettings(betas=[0.9, 0.999]), StepSettings())
    harness.log_memory("with every weight set and the trainer built")
    frames = clip(case)
    batch = {
        "frames": frames[None],
        "cond_frames_without_noise": frames[:1],
        "cond_frames": frames[:1] + 0.02 * rng.standard_normal(frames[:1].shape, dtype=np.float32),
        "fps_id": np.full((1,), 6.0, np.float32),
        "motion_bucket_id": np.full((1,), 127.0, np.float32),
        "cond_aug": np.full((1,), 0.02, np.float32),
    }
    step = [0]

    def run():
        if step[0] == 0:
            inputs = trainer.prepare(batch, trainer.rng(0, 0))
            harness.log_memory("after the first batch's VAE and conditioner")
            result = trainer.micro_step(inputs)
            harness.log_memory("after the first step (its graph compiled)")
        else:
            result = trainer.train_batch(batch, step[0])
        step[0] += 1
        return result

    return run, params


def ours(case: Case) -> Measurement:
    import mindspore as ms

    from modules.memory import peak_memory_mb
    from modules.training import param_count

    run, params = our_step(case)
    times, first = harness.timed(run, case.runs, case.warmup)
    return Measurement(
        times, first, peak_memory_mb(), matmul_gflops=harness.mindspore_matmul_gflops(),
        notes={"trained_params": param_count(params), "steps_per_s": round(1 / np.median(times), 3),
               "device": ms.get_context("device_target")},
    )  # fmt: skip


def ref_step(case: Case):
    """(run, trained parameters): `run()` is one step of the diffusers and torch.optim fine-tuning loop."""
    import torch

    harness.torch_setup(case)
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

    from benchmarks.models import diffusers_pipeline

    pipe = diffusers_pipeline(case.config)
    unet, vae = pipe.unet, pipe.vae
    if case.extra["recompute"]:
        unet.enable_gradient_checkpointing()
    unet.train()
    for name, p in unet.named_parameters():
        p.requires_grad_(case.extra["full_unet"] or any(k in name for k in DIFFUSERS_TEMPORAL))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    sampler = model_params(case.config)["sigma_sampler_config"]["params"]
    scale = model_params(case.config)["scale_factor"]
    frames = torch.from_numpy(clip(case))
    gen = torch.Generator().manual_seed(0)

    def run():
        with torch.no_grad():  # frozen parts: VAE sample, CLIP embedding, conditioning-frame latent
            latents = vae.encode(frames).latent_dist.sample(gen)[None] * scale  # 1 t c h w
            small = _resize_with_antialiasing(frames[:1], (224, 224))  # the pipeline's CLIP preprocessing
            image = pipe._encode_image((small + 1) / 2, "cpu", 1, False)
            cond = vae.encode(frames[:1] + 0.02 * torch.randn(frames[:1].shape, generator=gen)).latent_dist.mode()
            cond = cond[None].repeat(1, case.frames, 1, 1, 1)
        log_sigma = sampler["p_mean"] + sampler["p_std"] * torch.randn((1, 1, 1, 1, 1), generator=gen)
        sigma = log_sigma.exp()
        noise = torch.randn(latents.shape, generator=gen)
        noised = latents + noise * sigma
        c_in, c_skip, c_out = 1 / (sigma**2 + 1).sqrt(), 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1).sqrt()
        time_ids = torch.tensor([[6.0, 127.0, 0.02]])
        v = unet(torch.cat([noised * c_in, cond], 2), 0.25 * log_sigma.flatten(), image, time_ids).sample
        pred = v * c_out + noised * c_skip
        weight = (sigma**2 + 1) / sigma**2
        loss = (weight * (pred - latents) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    return run, params


def ref(case: Case) -> Measurement:
    run, params = ref_step(case)
    times, first = harness.timed(run, case.runs, case.warmup)
    return Measurement(
        times, first, harness.torch_peak_mb(), matmul_gflops=harness.torch_matmul_gflops(),
        notes={"trained_params": sum(p.numel() for p in params), "steps_per_s": round(1 / np.median(times), 3)},
    )  # fmt: skip


def describe(case: Case) -> str:
    what = "whole UNet" if case.extra["full_unet"] else "temporal layers"
    how = ", recompute" if case.extra["recompute"] else ""
    return f"training step ({what}{how}): {case.config}, 1 clip of {case.frames} frames of {case.height}x{case.width}"


if __name__ == "__main__":
    parser = harness.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--full_unet", action="store_true", help="train the whole UNet, not only temporal layers")
    parser.add_argument("--recompute", action="store_true", help="activation checkpointing on both sides")
    sys.exit(harness.main(parser, ours, ref, ("full_unet", "recompute"), describe))
