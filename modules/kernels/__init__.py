"""Compiled CPU kernels for the operations where MindSpore's own CPU kernels are the bottleneck.

- The exact GELU: MindSpore's CPU erf is slow (242 ms for the 18 M values of one SVD feed-forward at 14 frames of
  128x128, against 16 ms for the loop of `gelu.cc` on 2 cores), and the SVD UNet runs 48 of them per evaluation.
  `gelu.cc` computes GELU, its derivative and the gated GEGLU with vectorised erfc and exp from glibc's vector math
  library, on all cores.
- GroupNorm, alone or followed by SiLU (`group_norm.cc`): three passes over memory where MindSpore's operators take
  about ten; the VAE's decoder and every ResBlock run it on their largest activations.

The sources are built with g++ at first use into one library in a cache folder (`$XDG_CACHE_HOME/svd_mindspore`,
else `~/.cache/svd_mindspore`), once per source, compiler flags and CPU, and loaded as MindSpore AOT custom
operators. Where they cannot be used (the device is not the CPU, no g++, a glibc older than 2.35, or
`SVD_CPU_KERNELS=0`), the op factories return None and the layers use MindSpore's own operators, whose results agree
to float32 rounding.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings

import mindspore as ms
from mindspore import ops

__all__ = ["enabled", "gelu_op", "geglu_op", "group_norm_op", "library"]

SOURCES = [os.path.join(os.path.dirname(os.path.abspath(__file__)), name) for name in ("gelu.cc", "group_norm.cc")]
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "svd_mindspore")


def _cpu_flags() -> str:
    """The CPU's model and instruction-set flags (Linux), so that a cache folder shared between machines never
    serves a library built for another CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


@functools.cache
def library() -> str | None:
    """Path of the built kernel library, building it on the first call; None if it cannot be built or loaded."""
    key = hashlib.sha256()
    for source in SOURCES:
        with open(source, "rb") as f:
            key.update(f.read())
    key.update(" ".join(FLAGS).encode() + _cpu_flags().encode())  # -march=native: one build per CPU kind
    folder = _cache_dir()
    path = os.path.join(folder, f"kernels-{key.hexdigest()[:16]}.so")
    if not os.path.isfile(path):
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
            try:
                subprocess.run(["g++", *FLAGS, *SOURCES, "-o", tmp], check=True, capture_output=True, text=True)
                os.replace(tmp, path)  # complete or absent, also with several processes building at once
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            warnings.warn(f"CPU kernels not built ({detail.strip().splitlines()[-1] if detail.strip() else e}); "
                          "using MindSpore's own operators", stacklevel=2)  # fmt: skip
            return None
    try:
        import ctypes

        ctypes.CDLL(path)  # a missing vector math symbol (glibc before 2.35) shows here, not mid-network
    except OSError as e:
        warnings.warn(f"CPU kernels not loaded ({e}); using MindSpore's own operators", stacklevel=2)
        return None
    return path


def enabled() -> bool:
    """Whether the compiled kernels are used: on the CPU device, unless SVD_CPU_KERNELS=0, once they build."""
    if os.environ.get("SVD_CPU_KERNELS", "1") == "0" or ms.get_context("device_target") != "CPU":
        return False
    return library() is not None


def _like_first(first, *_):
    """Shape or dtype inference: the output is like the first input."""
    return first


def _half_last(shape):
    return list(shape[:-1]) + [shape[-1] // 2]


def _custom(forward: str, backward: str, out_shape):
    """The library's `forward` kernel as a custom operator whose gradient is its `backward` kernel (which takes the
    input and the output's gradient and gives the input's gradient); None where the kernels are not used."""
    if not enabled():
        return None
    lib = library()
    grad = ops.Custom(f"{lib}:{backward}", _like_first, _like_first, func_type="aot")

    def bprop(x, out, dout):
        return (grad(x, dout),)

    return ops.Custom(f"{lib}:{forward}", out_shape, _like_first, func_type="aot", bprop=bprop)


def gelu_op():
    """The exact GELU of a float32 tensor, with its gradient; or None (see the module)."""
    return _custom("GeluForward", "GeluBackward", _like_first)


def geglu_op():
    """`h * gelu(g)` of a float32 tensor (..., 2d) whose halves are h and g, giving (..., d), with its gradient; or
    None (see the module)."""
    return _custom("GegluForward", "GegluBackward", _half_last)


def group_norm_op(groups: int, silu: bool):
    """GroupNorm of a float32 (N, C, *) tensor in `groups` groups with a per-channel weight and bias, followed by
    SiLU if `silu`, with its gradients; or None (see the module). Called as `op(x, weight, bias, eps)` with eps a
    one-element float32 tensor; gives (y, mean, rstd), the last two (N, groups), float32."""
    if not enabled():
        return None
    lib = library()
    name = "GroupNormSilu" if silu else "GroupNorm"

    def stats(x, *_):
        return [x[0], groups]

    def out_shape(x, *_):
        return x, stats(x), stats(x)

    def out_dtype(x, *_):
        return x, ms.float32, ms.float32

    def grad_shape(x, weight, bias, *_):
        return x, weight, bias

    grad = ops.Custom(f"{lib}:{name}Backward", grad_shape, grad_shape, func_type="aot")

    def bprop(x, weight, bias, eps, out, dout):
        dx, dweight, dbias = grad(x, weight, bias, out[1], out[2], dout[0])
        return dx, dweight, dbias, ops.zeros_like(eps)

    return ops.Custom(f"{lib}:{name}Forward", out_shape, out_dtype, func_type="aot", bprop=bprop)
