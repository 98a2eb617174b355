"""A whole generation (conditioning, a few guided Euler steps, temporal decoding) from one image: ours (SVDPipeline,
graph mode by default) against diffusers' StableVideoDiffusionPipeline with the same architecture and settings.

    python benchmarks/bench_pipeline.py                   # the tiny config, 4 frames of 64x64, 2 steps
    python benchmarks/bench_pipeline.py --preset svd      # real SVD (UNet, temporal VAE, ViT-H/14), 14 x 128x128
    python benchmarks/bench_pipeline.py --preset svd --decode_chunk_size 2 --forward_chunk_size 1   # less memory
    python benchmarks/bench_pipeline.py --preset svd --mode 1 --model_offload   # one part's weights at a time
    python benchmarks/bench_pipeline.py --preset svd --side ours --half   # the UNet in float16 (amp O2)

Peak memory is the whole process's, weights included. On Linux the notes add the peak of the generations alone
(`generation_peak_mb`: the peak count restarted after the build, so weights held then still count) and the peak
of the build (`build_peak_mb`). The last line is `ours_s=... ref_s=... ratio=...`.
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks import harness
from benchmarks.harness import Case, Measurement
from benchmarks.models import diffusers_pipeline, our_engine


def image(case: Case) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (case.height, case.width, 3), dtype=np.uint8)


def settings(case: Case) -> dict:
    return dict(
        num_frames=case.frames,
        num_inference_steps=case.extra["steps"],
        min_guidance_scale=1.0,
        max_guidance_scale=2.5,
        fps=7,
        motion_bucket_id=127,
        noise_aug_strength=0.02,
        decode_chunk_size=case.extra.get("decode_chunk_size") or case.frames,
    )


def ours(case: Case) -> Measurement:
    harness.mindspore_setup(case)
    from modules.memory import peak_memory_mb
    from modules.pipeline import SVDPipeline

    pipe = SVDPipeline(our_engine(case.config), amp_level="O2" if case.extra.get("half") else "O0", verbose=False)
    if case.extra.get("forward_chunk_size"):
        pipe.enable_forward_chunking(case.extra["forward_chunk_size"])
    if case.extra.get("model_offload"):
        pipe.enable_model_offload()
    img = image(case)
    stages = {}

    def run():
        out = pipe(img, seed=0, output_type="np", **settings(case))
        stages.update({k: round(v, 3) for k, v in out.timings.items()})
        stages.update({f"peak_mb_after_{k}": round(v) for k, v in out.stage_peak_mb.items()})
        return out

    times, first, peaks = harness.timed_after_build(run, case.runs, case.warmup, peak_memory_mb())
    stages.update(peaks)
    return Measurement(times, first, peak_memory_mb(), matmul_gflops=harness.mindspore_matmul_gflops(), notes=stages)


def ref(case: Case) -> Measurement:
    import torch
    from PIL import Image

    harness.torch_setup(case)
    pipe = diffusers_pipeline(case.config)
    if case.extra.get("forward_chunk_size"):
        pipe.unet.enable_forward_chunking(case.extra["forward_chunk_size"], dim=1)
    img = Image.fromarray(image(case))

    def run():
        with torch.inference_mode():
            return pipe(img, height=case.height, width=case.width, generator=torch.Generator().manual_seed(0),
                        output_type="np", **settings(case))  # fmt: skip

    times, first, notes = harness.timed_after_build(run, case.runs, case.warmup, harness.torch_peak_mb())
    return Measurement(times, first, harness.torch_peak_mb(), matmul_gflops=harness.torch_matmul_gflops(), notes=notes)


def describe(case: Case) -> str:
    s = settings(case)
    return (f"whole generation: {case.config}, {case.frames} frames of {case.height}x{case.width}, "
            f"{s['num_inference_steps']} steps, decode chunks of {s['decode_chunk_size']}")  # fmt: skip


if __name__ == "__main__":
    parser = harness.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="sampling steps")
    parser.add_argument("--decode_chunk_size", type=int, default=0, help="frames per decoder call (0: all)")
    parser.add_argument("--forward_chunk_size", type=int, default=0, help="feed-forward chunking (0: off)")
    parser.add_argument("--model_offload", action="store_true",
                        help="ours only: hold only the running part's weights (PyNative). The reference runs "
                             "as it is: diffusers' model offload parks weights in host memory for a GPU")  # fmt: skip
    parser.add_argument("--half", action="store_true",
                        help="ours only: the UNet's weights and activations in float16 (amp O2: half its weight "
                             "memory); the reference stays float32")  # fmt: skip
    extra = ("steps", "decode_chunk_size", "forward_chunk_size", "model_offload", "half")
    sys.exit(harness.main(parser, ours, ref, extra, describe))
