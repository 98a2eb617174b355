"""Temporal VAE decoding of one video's latents into frames: ours (the VideoDecoder, graph mode by default)
against diffusers' AutoencoderKLTemporalDecoder, both decoding `--decode_chunk_size` frames per call.

    python benchmarks/bench_vae.py                        # the tiny config, 4 frames of 64x64
    python benchmarks/bench_vae.py --preset svd           # the SVD temporal decoder, 14 frames of 128x128
    python benchmarks/bench_vae.py --preset svd --decode_chunk_size 2    # less memory

The last line is `ours_s=... ref_s=... ratio=...` (ours / reference, median wall time of one decode).
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks import harness
from benchmarks.harness import Case, Measurement
from benchmarks.models import decoder_params, diffusers_vae, latent_size, our_decoder


def latents(case: Case) -> np.ndarray:
    h, w = latent_size(case.config, case.height, case.width)
    c = decoder_params(case.config)["z_channels"]
    return np.random.default_rng(0).standard_normal((case.frames, c, h, w), dtype=np.float32)


def chunks(case: Case) -> list[tuple[int, int]]:
    n = case.extra.get("decode_chunk_size") or case.frames
    return [(i, min(i + n, case.frames)) for i in range(0, case.frames, n)]


def ours(case: Case) -> Measurement:
    from mindspore import Tensor

    harness.mindspore_setup(case)
    from modules.memory import peak_memory_mb

    decoder = our_decoder(case.config)
    z = Tensor(latents(case))

    def run():
        return [decoder(z[i:j], timesteps=j - i).asnumpy() for i, j in chunks(case)]

    times, first = harness.timed(run, case.runs, case.warmup)
    return Measurement(times, first, peak_memory_mb(), matmul_gflops=harness.mindspore_matmul_gflops())


def ref(case: Case) -> Measurement:
    import torch

    harness.torch_setup(case)
    vae = diffusers_vae(case.config)
    z = torch.from_numpy(latents(case))

    def run():
        with torch.inference_mode():
            return [vae.decode(z[i:j], num_frames=j - i).sample for i, j in chunks(case)]

    times, first = harness.timed(run, case.runs, case.warmup)
    gflop = harness.count_flops(run)
    return Measurement(times, first, harness.torch_peak_mb(), gflop=gflop, matmul_gflops=harness.torch_matmul_gflops())


def describe(case: Case) -> str:
    n = case.extra.get("decode_chunk_size") or case.frames
    return f"temporal VAE decode: {case.config}, {case.frames} frames of {case.height}x{case.width}, chunks of {n}"


if __name__ == "__main__":
    parser = harness.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--decode_chunk_size", type=int, default=0, help="frames per decoder call (0: all)")
    sys.exit(harness.main(parser, ours, ref, ("decode_chunk_size",), describe))
