"""The convolutions of one SVD UNet evaluation, alone: ours (modules.layers.Conv2d and TemporalConv, graph mode by
default: the oneDNN kernel of modules/kernels) against torch.nn.functional.conv2d and conv3d, on the same shapes and
call counts.

    python benchmarks/bench_conv.py                                   # SVD's guidance batch, 2 x 14 frames at 128x128
    SVD_CONV_WINOGRAD=1 python benchmarks/bench_conv.py --side ours   # Winograd wherever oneDNN has it
    SVD_CONV_WINOGRAD=0 SVD_CONV_GEMM=0 python benchmarks/bench_conv.py --side ours   # oneDNN's direct kernels only

The shapes follow the SVD UNet's architecture (320, 640 and 1280 channels at 1/8, 1/16 and 1/32 of the image's
size and a fourth level at 1/64; two residual blocks per level down, three up, two in the middle; the skip
connections' channels): its 3x3 convolutions (stride 1, and the three downsamplers' stride 2), the residual blocks'
1x1 skips, and the temporal (3, 1, 1) convolutions over each clip. The last line is `ours_s=... ref_s=...
ratio=...` (median seconds for all calls).
"""

from __future__ import annotations

import functools
import sys

import numpy as np

from benchmarks import harness
from benchmarks.harness import Case, Measurement

# (in channels, out channels, kernel, stride, level, calls): level 0 is 1/8 of the image's size, each next one half
# of it; a kernel of 3 in time is a temporal (3, 1, 1) convolution over the clip's frames
_SPATIAL = [
    (8, 320, 3, 1, 0, 1), (320, 320, 3, 1, 0, 7), (320, 320, 3, 2, 0, 1), (320, 640, 3, 1, 1, 1),
    (320, 640, 1, 1, 1, 1), (640, 640, 3, 1, 1, 6), (640, 640, 3, 2, 1, 1), (640, 1280, 3, 1, 2, 1),
    (640, 1280, 1, 1, 2, 1), (1280, 1280, 3, 1, 2, 7), (1280, 1280, 3, 2, 2, 1), (1280, 1280, 3, 1, 3, 11),
    (2560, 1280, 3, 1, 3, 3), (2560, 1280, 1, 1, 3, 3), (2560, 1280, 3, 1, 2, 2), (2560, 1280, 1, 1, 2, 2),
    (1920, 1280, 3, 1, 2, 1), (1920, 1280, 1, 1, 2, 1), (1280, 1280, 3, 1, 1, 1), (1920, 640, 3, 1, 1, 1),
    (1920, 640, 1, 1, 1, 1), (1280, 640, 3, 1, 1, 1), (1280, 640, 1, 1, 1, 1), (960, 640, 3, 1, 1, 1),
    (960, 640, 1, 1, 1, 1), (640, 640, 3, 1, 0, 1), (960, 320, 3, 1, 0, 1), (960, 320, 1, 1, 0, 1),
    (640, 320, 3, 1, 0, 2), (640, 320, 1, 1, 0, 2), (320, 4, 3, 1, 0, 1),
]  # fmt: skip
_TEMPORAL = [(320, 0, 10), (640, 1, 10), (1280, 2, 10), (1280, 3, 14)]  # (channels, level, calls)


def shapes(case: Case) -> list[tuple[str, tuple[int, ...], tuple[int, ...], int, int]]:
    """(kind, input shape, weight shape, stride, calls) of one evaluation's convolutions; kind "2d" or "3d"."""
    h, w = case.height // 8, case.width // 8
    out = []
    for c, o, k, stride, level, calls in _SPATIAL:
        out.append(("2d", (2 * case.frames, c, h >> level, w >> level), (o, c, k, k), stride, calls))
    for c, level, calls in _TEMPORAL:
        out.append(("3d", (2, c, case.frames, h >> level, w >> level), (c, c, 3, 1, 1), 1, calls))
    return out


def gflop(case: Case) -> float:
    """Multiply-adds x 2 of the dense convolutions (taps past the border counted, as torch's counter does)."""
    total = 0
    for _, x, wt, stride, calls in shapes(case):
        pixels = np.prod(x[2:]) // stride**2
        total += 2 * x[0] * pixels * np.prod(wt) * calls
    return total / 1e9


def _padding(kind: str, wt: tuple[int, ...]) -> int | tuple[int, int, int]:
    return (1, 0, 0) if kind == "3d" else wt[2] // 2


def ours(case: Case) -> Measurement:
    from mindspore import Tensor

    harness.mindspore_setup(case)
    from modules.layers import Conv2d, TemporalConv

    rng = np.random.default_rng(0)
    calls = []
    for kind, x, wt, stride, count in shapes(case):
        if kind == "3d":
            cell = TemporalConv(wt[1], wt[0], (3, 1, 1))
        else:
            cell = Conv2d(wt[1], wt[0], wt[2], stride=stride, padding=_padding(kind, wt))
        calls.append((cell, (Tensor(rng.standard_normal(x, dtype=np.float32)),), count))
    return harness.time_our_calls(case, calls)


def ref(case: Case) -> Measurement:
    import torch
    import torch.nn.functional as F

    harness.torch_setup(case)
    calls = []
    for kind, x, wt, stride, count in shapes(case):
        conv = functools.partial(F.conv3d if kind == "3d" else F.conv2d, stride=stride, padding=_padding(kind, wt))
        calls.append((conv, (torch.randn(x), torch.randn(wt), torch.randn(wt[0])), count))
    return harness.time_ref_calls(case, calls, gflop(case))


def describe(case: Case) -> str:
    return (
        f"convolutions of one UNet evaluation: 2 x {case.frames} frames of {case.height}x{case.width}, "
        f"{sum(s[-1] for s in shapes(case))} calls, {gflop(case):.1f} GFLOP"
    )


if __name__ == "__main__":
    parser = harness.base_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(preset="svd")
    sys.exit(harness.main(parser, ours, ref, describe=describe))
