"""The fully connected layers of one SVD UNet evaluation, alone: ours (modules.layers.Linear, graph mode by default:
the oneDNN 3 matmul of modules/kernels) against torch.nn.functional.linear, on the same shapes and call counts.

    python benchmarks/bench_linear.py                     # SVD's guidance batch, 2 x 14 frames at 128x128
    python benchmarks/bench_linear.py --frames 25 --height 576 --width 1024 --side ours

Half of a UNet evaluation's FLOPs are in these layers, so their speed bounds the evaluation's ratio. The shapes follow
the SVD UNet's architecture: at each of its three transformer levels (320, 640 and 1280 channels, at 1/8, 1/16 and
1/32 of the image's size) five spatio-temporal transformers, and one in the middle block at 1/64, each with ten
C x C layers (projections in and out, the self-attentions' q, k, v and output in both of its blocks), three GEGLU
projections C -> 8C and three C*4 -> C; rows are the guidance batch's tokens. The cross-attentions' layers see one
context token and are left out. The last line is `ours_s=... ref_s=... ratio=...` (median seconds for all calls).
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks import harness
from benchmarks.harness import Case, Measurement


def shapes(case: Case) -> list[tuple[int, int, int, int]]:
    """(rows, in features, out features, calls) of one evaluation's fully connected layers."""
    batch = 2 * case.frames
    pixels = (case.height // 8) * (case.width // 8)
    levels = [(320, pixels // 4**0, 5), (640, pixels // 4**1, 5), (1280, pixels // 4**2, 5), (1280, pixels // 4**3, 1)]
    out = []
    for channels, level_pixels, transformers in levels:
        rows = batch * level_pixels
        out += [
            (rows, channels, channels, 10 * transformers),
            (rows, channels, 8 * channels, 3 * transformers),
            (rows, 4 * channels, channels, 3 * transformers),
        ]
    return out


def gflop(case: Case) -> float:
    return sum(2 * m * k * n * calls for m, k, n, calls in shapes(case)) / 1e9


def ours(case: Case) -> Measurement:
    from mindspore import Tensor

    harness.mindspore_setup(case)
    from modules.layers import Linear

    rng = np.random.default_rng(0)
    calls = [
        (Linear(k, n), (Tensor(rng.standard_normal((m, k), dtype=np.float32)),), count)
        for m, k, n, count in shapes(case)
    ]
    measured = harness.time_our_calls(case, calls)
    measured.notes["kernel"] = kernel_name(*shapes(case)[0][:3])
    return measured


def kernel_name(m: int, k: int, n: int) -> str:
    """What runs our forward matmul of m x k by k x n: oneDNN 3's implementation, `onednn 2.2` or `MindSpore`."""
    import ctypes

    from modules import kernels

    if kernels.linear_op(True) is None:
        return "MindSpore"
    lib = kernels.linear_op(True).func.rsplit(":", 1)[0]
    if lib != kernels.matmul_library():
        return "oneDNN 2.2"
    impl = ctypes.CDLL(lib).SvdMatmulImpl
    impl.restype, impl.argtypes = ctypes.c_char_p, [ctypes.c_int] + [ctypes.c_int64] * 3
    return "oneDNN 3 " + impl(0, m, k, n).decode()


def ref(case: Case) -> Measurement:
    import torch

    harness.torch_setup(case)
    linear = torch.nn.functional.linear
    calls = [(linear, (torch.randn(m, k), torch.randn(n, k), torch.randn(n)), count) for m, k, n, count in shapes(case)]
    return harness.time_ref_calls(case, calls, gflop(case))


def describe(case: Case) -> str:
    return (
        f"fully connected layers of one UNet evaluation: 2 x {case.frames} frames of {case.height}x{case.width}, "
        f"{sum(c for *_, c in shapes(case))} calls, {gflop(case):.1f} GFLOP"
    )


if __name__ == "__main__":
    parser = harness.base_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(preset="svd")
    sys.exit(harness.main(parser, ours, ref, describe=describe))
