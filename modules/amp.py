"""Mixed precision levels.

O0: float32 everywhere. O2: the UNet's weights and activations in float16 (or bfloat16), with its normalisation
parameters in float32; normalisations, softmax and the timestep embeddings compute in float32 (see modules.layers),
and the denoiser's scalings and the sampler's state stay float32. The VAE and the CLIP image encoder stay float32:
they run once per video and the VAE is the part that overflows in half precision.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn

from modules.layers import GroupNorm, LayerNorm

AMP_DTYPES = {"fp16": ms.float16, "bf16": ms.bfloat16}


def half_precision_cast(cell: nn.Cell, dtype) -> int:
    """Cast every parameter of `cell` except normalisation weights and blend factors; returns how many were cast."""
    keep = set()
    for _, sub in cell.cells_and_names():
        if isinstance(sub, (GroupNorm, LayerNorm)):
            keep.update(id(p) for p in sub.get_parameters(expand=False))
    n = 0
    for p in cell.get_parameters():
        if id(p) in keep or p.name.endswith("mix_factor") or p.dtype == dtype:
            continue
        p.set_dtype(dtype)
        n += 1
    return n


def apply_amp(engine: nn.Cell, amp_level: str = "O0", dtype: str = "fp16") -> None:
    """Set the engine's precision level in place (see the module docstring)."""
    if amp_level == "O0":
        engine.compute_dtype = ms.float32
        return
    if amp_level != "O2":
        raise ValueError(f"amp_level must be O0 or O2, got {amp_level!r}")
    if dtype not in AMP_DTYPES:
        raise ValueError(f"amp dtype must be fp16 or bf16, got {dtype!r}")
    if dtype == "bf16" and ms.get_context("device_target") == "CPU":
        raise ValueError(
            "bf16 compute is not available on CPU in MindSpore 2.8 (no bf16 matmul/conv kernels): use fp16"
        )
    half_precision_cast(engine.unet, AMP_DTYPES[dtype])
    engine.compute_dtype = AMP_DTYPES[dtype]
