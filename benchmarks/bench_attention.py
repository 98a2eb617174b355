"""The attention products of one SVD UNet evaluation and of the VAE decoder's attention block, alone: ours
(modules.layers.Attention, graph mode by default: the fused kernel of modules/kernels/onednn.cc, or with
SVD_ATTENTION_KERNEL=0 the permutations, BatchMatMul and softmax kernel) against torch's
scaled_dot_product_attention on the same shapes.

    python benchmarks/bench_attention.py                                     # 2 x 14 frames at 128x128
    python benchmarks/bench_attention.py --frames 8 --height 576 --width 1024 --vae_only --side ours

The shapes follow the architecture: the self-attention of each spatial transformer over the h*w tokens of each
frame (five transformers at each of the three levels, 64-channel heads, one in the middle block) and of its
temporal block over the frames of each token, on the guidance batch; and the VAE decoder's one single-head
attention over the latent's h*w positions of each frame (512 channels, channels first, as the block holds them),
on `--frames` frames at once (the decoder's chunk). The cross-attentions see one context token and need no
products. The peak memory column shows what the score tensors cost; the last line is `ours_s=... ref_s=...
ratio=...` (median seconds for all calls).
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks import harness
from benchmarks.harness import Case, Measurement


def shapes(case: Case) -> list[tuple[int, int, int, int, bool, int]]:
    """(batch, tokens, heads, head width, channels first, calls) of the attention calls."""
    batch = 2 * case.frames
    h, w = case.height // 8, case.width // 8
    vae = [(case.frames, h * w, 1, 512, True, 1)]
    if case.extra["vae_only"]:
        return vae
    out = []
    for channels, pixels, transformers in ((320, h * w, 5), (640, h * w // 4, 5), (1280, h * w // 16, 5)):
        out += [
            (batch, pixels, channels // 64, 64, False, transformers),
            (2 * pixels, case.frames, channels // 64, 64, False, transformers),
        ]
    pixels = h * w // 64
    out += [(batch, pixels, 20, 64, False, 1), (2 * pixels, case.frames, 20, 64, False, 1)]
    return out + vae


def gflop(case: Case) -> float:
    return sum(4 * b * n * n * heads * d * calls for b, n, heads, d, _, calls in shapes(case)) / 1e9


def _layout(b: int, n: int, heads: int, d: int, first: bool) -> tuple[int, int, int]:
    return (b, heads * d, n) if first else (b, n, heads * d)


def ours(case: Case) -> Measurement:
    from mindspore import Tensor

    harness.mindspore_setup(case)
    from modules.layers import Attention

    rng = np.random.default_rng(0)
    calls = []
    for b, n, heads, d, first, count in shapes(case):
        qkv = tuple(Tensor(rng.standard_normal(_layout(b, n, heads, d, first), dtype=np.float32)) for _ in range(3))
        calls.append((Attention(heads, channels_first=first), qkv, count))
    return harness.time_our_calls(case, calls)


def _sdpa(q, k, v, heads: int, first: bool):
    """torch's SDPA on q, k, v laid out as our cell takes them, with the heads split and merged as diffusers does:
    (B, L, H*D), or (B, C, L) channels first."""
    import torch

    def split(x):  # -> (B, H, L, D)
        if first:
            x = x.transpose(1, 2)
        return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    y = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    y = y.transpose(1, 2).reshape(q.shape[0], -1, q.shape[1] if first else q.shape[2])
    return y.transpose(1, 2).contiguous() if first else y


def ref(case: Case) -> Measurement:
    import torch

    harness.torch_setup(case)
    calls = []
    for b, n, heads, d, first, count in shapes(case):
        qkv = tuple(torch.randn(_layout(b, n, heads, d, first)) for _ in range(3))
        calls.append((_sdpa, (*qkv, heads, first), count))
    return harness.time_ref_calls(case, calls, gflop(case))


def describe(case: Case) -> str:
    what = "the VAE decoder's attention" if case.extra["vae_only"] else "attention products of one UNet evaluation"
    return f"{what}: {case.frames} frames of {case.height}x{case.width}, {gflop(case):.1f} GFLOP"


if __name__ == "__main__":
    parser = harness.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--vae_only", action="store_true", help="only the VAE decoder's attention block")
    parser.set_defaults(preset="svd")
    sys.exit(harness.main(parser, ours, ref, describe=describe, extra_keys=("vae_only",)))
