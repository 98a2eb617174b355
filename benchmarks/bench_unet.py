"""One denoiser evaluation with the guidance batch (conditional and unconditional video, 2 x frames latents):
ours (the VideoUNet in a DenoiseCell, graph mode by default) against diffusers' UNetSpatioTemporalConditionModel.

    python benchmarks/bench_unet.py                       # the tiny config, 4 frames of 64x64
    python benchmarks/bench_unet.py --preset svd          # the real SVD UNet (1.5 B), 14 frames of 128x128
    python benchmarks/bench_unet.py --preset svd --forward_chunk_size 1    # feed-forward chunking: less memory

The last line is `ours_s=... ref_s=... ratio=...` (ours / reference, median wall time of one evaluation).
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks import harness
from benchmarks.harness import Case, Measurement
from benchmarks.models import diffusers_unet, latent_size, our_denoiser, unet_params


def inputs(case: Case) -> dict[str, np.ndarray]:
    """The same random inputs for both sides: (2 t) latents, the concat frame, one CLIP token, the vector."""
    p = unet_params(case.config)
    h, w = latent_size(case.config, case.height, case.width)
    n = 2 * case.frames
    c = p["out_channels"]
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((n, c, h, w), dtype=np.float32) * 10.0,
        "sigma": np.full((n,), 10.0, np.float32),
        "concat": rng.standard_normal((n, p["in_channels"] - c, h, w), dtype=np.float32),
        "context": rng.standard_normal((n, 1, p["context_dim"]), dtype=np.float32),
        "y": rng.standard_normal((n, p["adm_in_channels"]), dtype=np.float32),
        "time_ids": np.tile(np.array([[6.0, 127.0, 0.02]], np.float32), (2, 1)),
    }


def ours(case: Case) -> Measurement:
    from mindspore import Tensor

    harness.mindspore_setup(case)
    from modules.memory import peak_memory_mb

    cell = our_denoiser(case.config)
    if case.extra.get("forward_chunk_size"):
        cell.model.diffusion_model.enable_forward_chunking(case.extra["forward_chunk_size"])
    a = {k: Tensor(v) for k, v in inputs(case).items() if k != "time_ids"}

    def run():
        return cell(a["x"], a["sigma"], a["concat"], a["context"], a["y"], case.frames)

    times, first = harness.timed(run, case.runs, case.warmup, lambda r: r.asnumpy())
    return Measurement(times, first, peak_memory_mb(), matmul_gflops=harness.mindspore_matmul_gflops())


def ref(case: Case) -> Measurement:
    import torch

    harness.torch_setup(case)
    unet = diffusers_unet(case.config)
    if case.extra.get("forward_chunk_size"):
        unet.enable_forward_chunking(case.extra["forward_chunk_size"], dim=1)
    a = inputs(case)
    b, t = 2, case.frames
    sigma = float(a["sigma"][0])
    x = torch.from_numpy(a["x"]).reshape(b, t, *a["x"].shape[1:])
    concat = torch.from_numpy(a["concat"]).reshape(b, t, *a["concat"].shape[1:])
    context = torch.from_numpy(a["context"]).reshape(b, t, 1, -1)[:, 0]  # one token per video
    time_ids = torch.from_numpy(a["time_ids"])
    c_in = 1.0 / (sigma**2 + 1.0) ** 0.5

    def run():
        with torch.inference_mode():  # the scheduler's scalings around the UNet, as in the pipeline's loop
            v = unet(torch.cat([x * c_in, concat], 2), 0.25 * np.log(sigma), context, time_ids, return_dict=False)[0]
            return x / (sigma**2 + 1.0) - v * sigma / (sigma**2 + 1.0) ** 0.5

    times, first = harness.timed(run, case.runs, case.warmup)
    gflop = harness.count_flops(run)
    return Measurement(times, first, harness.torch_peak_mb(), gflop=gflop, matmul_gflops=harness.torch_matmul_gflops())


def describe(case: Case) -> str:
    h, w = latent_size(case.config, case.height, case.width)
    return f"UNet evaluation: {case.config}, 2 x {case.frames} frames of {case.height}x{case.width} ({h}x{w} latents)"


if __name__ == "__main__":
    parser = harness.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--forward_chunk_size", type=int, default=0, help="feed-forward chunking (0: off)")
    sys.exit(harness.main(parser, ours, ref, ("forward_chunk_size",), describe))
