"""Compiled CPU kernels for the operations where MindSpore's own CPU kernels are the bottleneck.

- The exact GELU: MindSpore's CPU erf is slow (242 ms for the 18 M values of one SVD feed-forward at 14 frames of
  128x128, against 16 ms for the loop of `gelu.cc` on 2 cores), and the SVD UNet runs 48 of them per evaluation.
  `gelu.cc` computes GELU, its derivative and the gated GEGLU with vectorised erfc and exp from glibc's vector math
  library, on all cores.
- GroupNorm, alone or followed by SiLU (`group_norm.cc`): three passes over memory where MindSpore's operators take
  about ten; the VAE's decoder and every ResBlock run it on their largest activations.
- Convolutions through oneDNN (`onednn.cc`, linked to the oneDNN 2.2 inside MindSpore): its blocked direct and
  Winograd convolutions.
- Fully connected layers through oneDNN 3's matmul (`matmul.cc`, linked to the libdnnl.so.3 of the `onednn-cpu-gomp`
  package): its BRGEMM kernel, 1.2-1.4 times oneDNN 2.2's SGEMM on the SVD UNet's layers, with the bias added in the
  epilogue, on inputs of any rank as they are (a Linear through MindSpore's MatMul also needs a BiasAdd pass over
  the output and, in a graph, reshapes that copy). Without that library, oneDNN 2.2's matmul (`onednn.cc`).
  Outside training GEGLU's projection and gating are two of those matmuls with the GELU and the product in their
  epilogues (`geglu_linear_op`), and the transformer blocks' residuals ride in the epilogues of the layers before
  them (`linear_residual_op`).
- The optimizer (`optim.cc`): the gradient norm in one read-only pass, and AdamW with the gradient's unscaling,
  clipping and overflow guard in one pass that updates the parameter and moments in place, where MindSpore's
  operators take seven passes and gradient-sized temporaries.
- Softmax over the last axis and its gradient (`softmax.cc`): the attention probabilities.
- Multi-head attention in one kernel (`onednn.cc`): the heads read in place from the projections' (B, L, H*D)
  output with strided GEMMs, and the scores computed, normalised and used a block of query rows at a time, so the
  permutations to (B, H, L, D) and back and the (B, H, Lq, Lk) score tensor are gone.
- Column sums for the bias gradients (`reduce.cc`), where MindSpore's ReduceSum over the first axis is slow, and a
  row added to a group of rows (the residual of a cross-attention to one context token), and the video blocks'
  blend of their spatial and temporal paths in one pass.
- Nearest-neighbour 2x upsampling and its gradient (`resample.cc`): MindSpore's Tile, BroadcastTo and interpolate
  move 0.5-1 GB/s on it.
- Axis permutations (`permute.cc`): in PyNative MindSpore's transpose is a strided view whose copy into a contiguous
  tensor runs at about 0.5 GB/s; the kernel writes the permuted tensor directly. In a graph it is as fast as
  MindSpore's Transpose, and the SVD UNet's graph peaks 2.2 GB lower with it.

The sources are built with g++ at first use into one library in a cache folder (`$XDG_CACHE_HOME/svd_mindspore`,
else `~/.cache/svd_mindspore`), once per source (and the headers beside them), compiler flags and CPU, and loaded
as MindSpore AOT custom operators. Where they cannot be used (the device is not the CPU, no g++, a glibc older than
2.35, or `SVD_CPU_KERNELS=0`), the op factories return None and the layers use MindSpore's own operators, whose
results agree to float32 rounding.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import subprocess
import sys
import sysconfig
import tempfile
import warnings

import mindspore as ms
from mindspore import ops
from mindspore.ops import signature as sig

__all__ = [
    "add_rows_op",
    "attention_op",
    "attention_options",
    "blend_op",
    "conv2d_op",
    "conv_geometry",
    "enabled",
    "gelu_op",
    "geglu_linear_op",
    "geglu_op",
    "group_norm_op",
    "layer_norm_op",
    "library",
    "linear_op",
    "linear_residual_op",
    "matmul_library",
    "onednn_library",
    "optimizer_ops",
    "permute",
    "permute_enabled",
    "permute_op",
    "release_conv_memory",
    "softmax_op",
    "sum_rows_op",
    "upsample_op",
]

# GNU OpenMP's idle threads spin for a while after each parallel region before they sleep (on recent Xeons, where a
# PAUSE takes about 140 cycles, for milliseconds). Here the OpenMP regions are the fully connected layers' (oneDNN 3)
# and the elementwise kernels', and what follows them often runs on other threads (MindSpore's operators, the
# convolutions' pool), which the spinning thread would keep from one of the cores. So idle OpenMP threads sleep at
# once, unless the user chose otherwise; libgomp reads this when it loads, with the first kernel library. Two
# profiles of one UNet evaluation, each alternated with the default: 12.09 and 11.50 s of operator time against
# 12.67 and 12.25 s, the convolutions' and attention's share lower (`benchmarks/profile_unet.py --preset svd`).
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "0"

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [
    os.path.join(_HERE, name)
    for name in ("gelu.cc", "group_norm.cc", "permute.cc", "optim.cc", "reduce.cc", "resample.cc", "softmax.cc")
]
ONEDNN_SOURCE = os.path.join(_HERE, "onednn.cc")
MATMUL_SOURCE = os.path.join(_HERE, "matmul.cc")
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


def _build(stem: str, sources: list[str], flags: list[str]) -> str | None:
    """Path of the library built from `sources` with `flags`, building it on the first call; None (with a warning) if
    it cannot be built or loaded."""
    key = hashlib.sha256()
    headers = sorted(os.path.join(_HERE, name) for name in os.listdir(_HERE) if name.endswith(".h"))
    for source in [*sources, *headers]:  # the headers they may include: a change to one rebuilds
        with open(source, "rb") as f:
            key.update(f.read())
    key.update(" ".join(flags).encode() + _cpu_flags().encode())  # -march=native: one build per CPU kind
    folder = _cache_dir()
    path = os.path.join(folder, f"{stem}-{key.hexdigest()[:16]}.so")
    if not os.path.isfile(path):
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
            try:
                subprocess.run(["g++", *sources, *flags, "-o", tmp], check=True, capture_output=True, text=True)
                os.replace(tmp, path)  # complete or absent, also with several processes building at once
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = (getattr(e, "stderr", "") or str(e)).strip()
            reason = detail.splitlines()[-1] if detail else repr(e)
            warnings.warn(f"CPU kernels ({stem}) not built ({reason}); using MindSpore's own operators", stacklevel=3)
            return None
    try:
        import ctypes

        ctypes.CDLL(path)  # a missing symbol (glibc before 2.35, another libdnnl) shows here, not mid-network
    except OSError as e:
        warnings.warn(f"CPU kernels ({stem}) not loaded ({e}); using MindSpore's own operators", stacklevel=3)
        return None
    return path


@functools.cache
def library() -> str | None:
    """Path of the built GELU and GroupNorm kernel library, building it on the first call; None if it cannot be built
    or loaded."""
    return _build("kernels", SOURCES, FLAGS)


def _dnnl_version(header_dir: str) -> tuple[int, int] | None:
    try:
        with open(os.path.join(header_dir, "oneapi", "dnnl", "dnnl_version.h")) as f:
            text = f.read()
    except OSError:
        return None
    found = dict(re.findall(r"#define DNNL_VERSION_(MAJOR|MINOR) (\d+)", text))
    return (int(found["MAJOR"]), int(found["MINOR"])) if len(found) == 2 else None


def _mindspore_dnnl() -> tuple[str, tuple[int, int]] | None:
    """MindSpore's own libdnnl and its version, if it ships one."""
    import ctypes

    path = os.path.join(os.path.dirname(ms.__file__), "lib", "libdnnl.so.2")
    if not os.path.isfile(path):
        return None

    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]

    dnnl = ctypes.CDLL(path)
    dnnl.dnnl_version.restype = ctypes.POINTER(Version)
    version = dnnl.dnnl_version().contents
    return path, (version.major, version.minor)


@functools.cache
def onednn_library() -> str | None:
    """Path of the built oneDNN convolution library (`onednn.cc`), linked to MindSpore's own libdnnl with the
    headers of the same oneDNN version (the `onednn-devel-cpu-tbb` package of requirements.txt; only its headers
    are used); None, with a warning saying why, where that cannot be done."""
    shipped = _mindspore_dnnl()
    headers = os.path.join(sysconfig.get_path("data"), "include")
    wanted = _dnnl_version(headers)
    if shipped is None or wanted != shipped[1]:
        have = "no oneDNN headers" if wanted is None else "headers of oneDNN {}.{}".format(*wanted)
        need = "no libdnnl in MindSpore" if shipped is None else "MindSpore's oneDNN {}.{}".format(*shipped[1])
        warnings.warn(f"oneDNN kernels not built: {have} under {headers}, {need}; using MindSpore's own Conv2D",
                      stacklevel=2)  # fmt: skip
        return None
    lib_dir = os.path.dirname(shipped[0])
    flags = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-shared", "-fPIC", "-std=c++17",
             f"-I{headers}", shipped[0], f"-Wl,-rpath,{lib_dir}", "-pthread"]  # fmt: skip
    return _build("onednn", [ONEDNN_SOURCE], flags)


def _dnnl3() -> str | None:
    """The libdnnl.so.3 that the `onednn-cpu-gomp` package installs under the environment's lib folder."""
    for prefix in dict.fromkeys([sysconfig.get_path("data"), sys.prefix]):
        path = os.path.join(prefix, "lib", "libdnnl.so.3")
        if os.path.isfile(path):
            return path
    return None


@functools.cache
def matmul_library() -> str | None:
    """Path of the built fully connected layer library (`matmul.cc`), linked to oneDNN 3 (libdnnl.so.3 of the
    `onednn-cpu-gomp` package); None, with a warning saying why, where that cannot be done."""
    import ctypes

    dnnl = _dnnl3()
    if dnnl is None:
        warnings.warn("oneDNN 3 matmul not built: no libdnnl.so.3 (pip install onednn-cpu-gomp); using oneDNN 2.2's",
                      stacklevel=2)  # fmt: skip
        return None
    flags = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-fopenmp", dnnl,
             f"-Wl,-rpath,{os.path.dirname(dnnl)}"]  # fmt: skip
    lib = _build("matmul", [MATMUL_SOURCE], flags)
    if lib is not None and (major := ctypes.CDLL(lib).SvdMatmulVersion()) != 3:
        warnings.warn(f"oneDNN 3 matmul not used: {dnnl} is oneDNN {major}; using oneDNN 2.2's", stacklevel=2)
        return None
    return lib


def _on_cpu() -> bool:
    return os.environ.get("SVD_CPU_KERNELS", "1") != "0" and ms.get_context("device_target") == "CPU"


def enabled() -> bool:
    """Whether the compiled kernels are used: on the CPU device, unless SVD_CPU_KERNELS=0, once they build."""
    return _on_cpu() and library() is not None


def _like_first(first, *_):
    """Shape or dtype inference: the output is like the first input."""
    return first


def _half_last(shape):
    return list(shape[:-1]) + [shape[-1] // 2]


def _custom(forward: str, backward: str, out_shape, from_output: bool = False):
    """The library's `forward` kernel as a custom operator whose gradient is its `backward` kernel (which takes the
    input, or the output if `from_output`, and the output's gradient and gives the input's gradient); None where
    the kernels are not used."""
    if not enabled():
        return None
    lib = library()
    grad = ops.Custom(f"{lib}:{backward}", _like_first, _like_first, func_type="aot")

    def bprop(x, out, dout):
        return (grad(out if from_output else x, dout),)

    return ops.Custom(f"{lib}:{forward}", out_shape, _like_first, func_type="aot", bprop=bprop)


def gelu_op():
    """The exact GELU of a float32 tensor, with its gradient; or None (see the module)."""
    return _custom("GeluForward", "GeluBackward", _like_first)


def softmax_op():
    """Softmax over the last axis of a float32 tensor, with its gradient; or None (see the module)."""
    return _custom("SoftmaxForward", "SoftmaxBackward", _like_first, from_output=True)


def sum_rows_op():
    """`op(x)`: the column sums (C,) of a float32 (rows, C) tensor, by the compiled kernel where the kernels are
    used (the bias gradients; `reduce.cc`), else `x.sum(0)`."""
    if not enabled():
        return _sum_first_axis
    lib = library()

    def out_shape(x):
        return [x[1]]

    return ops.Custom(f"{lib}:SumRows", out_shape, _like_first, func_type="aot")


def _sum_first_axis(x):
    return x.sum(0)


def add_rows_op():
    """`op(x, y)`: x (G, R, C) + y (G, 1, C), the row of each group added to its R rows, with both gradients, by the
    compiled kernel (`reduce.cc`) where the kernels are used, else by tiling y."""
    if not enabled():
        return _add_tiled
    reduce_sum = ops.ReduceSum(keep_dims=True)

    def bprop(x, y, out, dout):
        return dout, reduce_sum(dout, 1)

    return ops.Custom(f"{library()}:AddRows", _like_first, _like_first, func_type="aot", bprop=bprop)


def blend_op():
    """`op(xs, xt, alpha)`: `alpha[g] * xs + (1 - alpha[g]) * xt` for float32 xs and xt of one shape and a float32
    alpha (G,), g numbering G equal consecutive slices of the flattened inputs (G = 1: one alpha for all), by the
    compiled kernel (`reduce.cc`), with the gradients of all three; or None (see the module)."""
    if not enabled():
        return None

    def bprop(xs, xt, alpha, out, dout):
        groups = alpha.shape[0]
        flat = dout.reshape(groups, -1)
        dxs = (flat * ops.broadcast_to(alpha.reshape(groups, 1), flat.shape)).reshape(dout.shape)
        dalpha = ((xs - xt).reshape(groups, -1) * flat).sum(1)
        return dxs, dout - dxs, dalpha

    return ops.Custom(f"{library()}:Blend", _like_first, _like_first, func_type="aot", bprop=bprop)


def _add_tiled(x, y):
    return x + ops.tile(y, (1, x.shape[1], 1))


def upsample_op():
    """`op(x)`: nearest-neighbour 2x upsampling of a float32, float16 or bfloat16 (N, C, H, W) tensor by the compiled
    kernel (`resample.cc`), with its gradient; or None (see the module)."""
    if not enabled():
        return None
    lib = library()
    grad = ops.Custom(f"{lib}:Upsample2xGrad", _halve_spatial, _like_first, func_type="aot")

    def bprop(x, out, dout):
        if dout.dtype == ms.bfloat16:  # the kernel sums float32 and float16
            n, c, h, w = x.shape
            return (dout.reshape(n, c, h, 2, w, 2).sum((3, 5)),)
        return (grad(dout),)

    return ops.Custom(f"{lib}:Upsample2x", _double_spatial, _like_first, func_type="aot", bprop=bprop)


def _double_spatial(shape):
    return [*shape[:2], 2 * shape[2], 2 * shape[3]]


def _halve_spatial(shape):
    return [*shape[:2], shape[2] // 2, shape[3] // 2]


def geglu_op():
    """`op(p, bias)`: `h * gelu(g)` where h and g are the halves of p + bias, for float32 p (..., 2d) and bias
    (2d,), giving (..., d), with the gradients of p and bias; or None (see the module). The bias is added inside
    the kernel, so the projection before it needs no BiasAdd of its own."""
    if not enabled():
        return None
    lib = library()
    grad = _geglu_grad(lib)
    column_sums = sum_rows_op()

    def bprop(p, bias, out, dout):
        dp = grad(p, bias, dout)
        return dp, column_sums(dp.reshape(-1, bias.shape[0]))

    def out_shape(p, _):
        return _half_last(p)

    return ops.Custom(f"{lib}:GegluForward", out_shape, _like_first, func_type="aot", bprop=bprop)


@functools.cache
def _geglu_grad(lib: str):
    """`op(p, bias, dy)`: the gradient of `geglu_op` with respect to p (that of the bias is its column sums)."""
    return ops.Custom(f"{lib}:GegluBackward", _like_first, _like_first, func_type="aot")


def optimizer_ops():
    """(sum_squares, adamw_step), or None (see the module): `sum_squares(g)` is the (1,) squared L2 norm of a
    float32 tensor; `adamw_step(param, m, v, g, settings)` updates the float32 parameter and its two moments in
    place from `settings` = (factor, lr, beta1, beta2, eps, weight decay, guard, 0) (see `optim.cc`) and returns a
    (1,) zero for the graph to order what follows after it."""
    if not enabled():
        return None
    lib = library()

    def one_value(*_):
        return [1]

    sum_squares = ops.Custom(f"{lib}:SumSquares", one_value, _like_first, func_type="aot")
    adamw_step = _InPlaceUpdate(f"{lib}:AdamWStep", one_value, _like_first, func_type="aot")
    adamw_step.add_prim_attr("side_effect_mem", True)  # as MindSpore's own optimizer primitives
    return sum_squares, adamw_step


class _InPlaceUpdate(ops.Custom):
    """A custom operator that writes its first three inputs (a parameter and its two moments), declared so as
    MindSpore's own AdamWeightDecay is: a graph passes those parameters themselves, not copies, and orders every
    other read and write of them around the call."""

    __mindspore_signature__ = (
        sig.make_sig("param", sig.sig_rw.RW_WRITE),
        sig.make_sig("m", sig.sig_rw.RW_WRITE),
        sig.make_sig("v", sig.sig_rw.RW_WRITE),
        sig.make_sig("g"),
        sig.make_sig("settings"),
    )


def permute_enabled() -> bool:
    """Whether `permute` is used: with the compiled kernels, unless SVD_PERMUTE_KERNEL=0."""
    return os.environ.get("SVD_PERMUTE_KERNEL", "1") != "0" and enabled()


def _permutation(lib: str, perm: tuple[int, ...], bprop=None):
    def out_shape(x, _):
        return [x[p] for p in perm]

    op = ops.Custom(f"{lib}:PermuteAxes", out_shape, _like_first, func_type="aot", bprop=bprop)
    op.add_prim_attr("perm", perm)  # PyNative caches shape inference by the primitive's attributes (see conv2d_op)
    return op, ms.Tensor(list(perm), ms.int64)


@functools.cache
def permute_op(perm: tuple[int, ...]):
    """(op, axes): `op(x, axes)` is `permute(x, perm)`, for a cell to hold (see `modules.layers.permuter`)."""
    lib = library()
    back, back_axes = _permutation(lib, tuple(sorted(range(len(perm)), key=perm.__getitem__)))

    def bprop(x, axes, out, dout):
        return back(dout, back_axes), ops.zeros_like(axes)

    return _permutation(lib, perm, bprop)


def permute(x, perm):
    """`x.transpose(perm)` written into a new contiguous tensor by the compiled kernel, with its gradient (where
    `permute_enabled()`)."""
    op, axes = permute_op(tuple(int(p) for p in perm))
    return op(x, axes)


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

    op = ops.Custom(f"{lib}:{name}Forward", out_shape, out_dtype, func_type="aot", bprop=bprop)
    op.add_prim_attr("groups", groups)  # PyNative caches shape inference by name and attributes (see conv2d_op)
    return op


def layer_norm_op():
    """LayerNorm over the last axis of a float32 (rows, C) tensor with a per-column weight and bias: the GroupNorm
    kernel with one group, which is about twice as fast as MindSpore's LayerNorm forward, and a gradient kernel of
    its own that splits the rows between the threads (GroupNorm's splits its work by group). Called as
    `op(x, weight, bias, eps)`; gives (y, mean, rstd), the last two (rows, 1). None where the kernels are not
    used."""
    if not enabled():
        return None
    lib = library()

    def out_shape(x, *_):
        return x, [x[0], 1], [x[0], 1]

    def out_dtype(x, *_):
        return x, ms.float32, ms.float32

    def grad_shape(x, weight, *_):
        return x, weight, weight

    grad = ops.Custom(f"{lib}:LayerNormBackward", grad_shape, grad_shape, func_type="aot")

    def bprop(x, weight, bias, eps, out, dout):
        dx, dweight, dbias = grad(x, weight, out[1], out[2], dout[0])
        return dx, dweight, dbias, ops.zeros_like(eps)

    op = ops.Custom(f"{lib}:GroupNormForward", out_shape, out_dtype, func_type="aot", bprop=bprop)
    op.add_prim_attr("groups", 1)
    return op


def _threads() -> int:
    """MindSpore's own thread count, at most the machine's cores."""
    threads = ms.get_context("runtime_num_threads") or os.cpu_count() or 1
    return min(int(threads), os.cpu_count() or 1)


@functools.cache
def _set_threads(lib: str, threads: int, setter: str = "SvdConvSetThreads") -> None:
    import ctypes

    getattr(ctypes.CDLL(lib), setter)(threads)


def conv2d_op(stride: tuple[int, int], padding: tuple[int, int, int, int]):
    """2D convolution of float32 tensors through oneDNN's direct kernels, with its gradients; or None (see the
    module). Called as `op(x, weight, geometry, bias)` with x (N, C, H, W), weight (O, C / groups, kh, kw), bias (O,)
    and geometry the int64 tensor `conv_geometry(stride, padding)`; padding is (top, bottom, left, right). Also
    takes x (N, C, T, H, W) with a weight (O, C, kt, 1, 1), stride 1 and no padding along W: the temporal
    convolution, run as the 2-D one over (N, C, T, H*W) without reshaping either."""
    if not _on_cpu():
        return None
    lib = onednn_library()
    if lib is None:
        return None
    _set_threads(lib, _threads())
    (sh, sw), (top, bottom, left, right) = stride, padding

    def out_shape(x, weight, *_):
        height = (x[2] + top + bottom - weight[2]) // sh + 1
        if len(x) == 5:  # a temporal convolution (see conv2d_op): the last two axes stay
            return [x[0], weight[0], height, x[3], x[4]]
        return [x[0], weight[0], height, (x[3] + left + right - weight[3]) // sw + 1]

    def weight_grads(x, weight, *_):
        return weight, [weight[0]]

    def weight_grad_types(x, *_):
        return x, x

    data = ops.Custom(f"{lib}:ConvBackwardData", _like_first, _like_first, func_type="aot")
    weights = ops.Custom(f"{lib}:ConvBackwardWeights", weight_grads, weight_grad_types, func_type="aot")

    def bprop(x, weight, geometry, bias, out, dout):
        dweight, dbias = weights(x, weight, geometry, dout)
        return data(x, weight, geometry, dout), dweight, ops.zeros_like(geometry), dbias

    op = ops.Custom(f"{lib}:ConvForward", out_shape, _like_first, func_type="aot", bprop=bprop)
    # PyNative caches shape inference by the primitive's name and attributes: without this, every convolution would
    # get the output shape of the first geometry it met
    op.add_prim_attr("geometry", (sh, sw, top, bottom, left, right))
    return op


def linear_op(bias: bool):
    """`op(x, weight, bias)` (or `op(x, weight)` without bias): x W^T + b for float32 x (..., in), weight (out, in)
    and bias (out,), giving (..., out), with the gradients of all three; or None (see `conv2d_op`). oneDNN's matmul
    adds the bias in its epilogue, so there is no BiasAdd pass over the output, and a graph has no reshapes to copy.
    Used in both modes unless SVD_LINEAR_KERNEL=0: with oneDNN 3's matmul, the fused GEGLU and the residuals in the
    epilogues, a PyNative SVD UNet evaluation took 0.90 of the reference's time against 1.16 with MindSpore's
    MatMul, and a whole PyNative generation peaked lower (10,275 against 10,318 MiB). oneDNN 3's matmul
    (`matmul.cc`) where it builds, unless SVD_LINEAR_DNNL3=0; else oneDNN 2.2's."""
    found = _linear_library()
    return None if found is None else _linear_ops(found[0], bias)


def _linear_library() -> tuple[str, bool] | None:
    """The library `linear_op` uses, and whether it is oneDNN 3's (`matmul.cc`), its threads set; None where the
    fully connected layers use MindSpore's MatMul."""
    if not _on_cpu() or os.environ.get("SVD_LINEAR_KERNEL", "1") == "0":
        return None
    if os.environ.get("SVD_LINEAR_DNNL3", "1") != "0" and (lib := matmul_library()) is not None:
        _set_threads(lib, _threads(), "SvdMatmulSetThreads")
        return lib, True
    lib = onednn_library()
    if lib is None:
        return None
    _set_threads(lib, _threads())
    return lib, False


def linear_residual_op():
    """`op(x, weight, bias, residual)`: x W^T + b + residual for float32 x (..., in), weight (out, in), bias (out,)
    and residual (..., out), as one oneDNN 3 matmul that adds the residual in its epilogue (`matmul.cc`), so no
    separate pass reads the output again, with the gradients of all four; None where `linear_op` would not use
    oneDNN 3, or with SVD_RESIDUAL_FUSED=0."""
    found = _linear_library()
    if found is None or not found[1] or os.environ.get("SVD_RESIDUAL_FUSED", "1") == "0":
        return None
    return _linear_residual(found[0])


@functools.cache
def _linear_residual(lib: str):
    grads = _linear_bias_grads(lib)

    def bprop(x, weight, bias, residual, out, dout):
        return (*grads(x, weight, bias, dout), dout)

    return ops.Custom(f"{lib}:LinearResidualForward", _linear_out_shape, _like_first, func_type="aot", bprop=bprop)


def geglu_linear_op():
    """`op(x, weight, bias)`: GEGLU's projection and gating, `h * gelu(g)` with h and g the halves of x W^T + b, for
    float32 x (..., in), weight (2d, in) and bias (2d,), giving (..., d), as two oneDNN 3 matmuls whose epilogues
    apply the exact GELU to the gate half and multiply it into the other (`matmul.cc`): the (..., 2d) projection is
    never written and there is no gating pass over it. For inference: its gradient recomputes the projection, an
    extra matmul, so training keeps the projection and the gating kernel apart. None where `linear_op` would not
    use oneDNN 3, where the gating kernel is not built, or with SVD_GEGLU_FUSED=0."""
    found = _linear_library()
    if found is None or not found[1] or os.environ.get("SVD_GEGLU_FUSED", "1") == "0" or geglu_op() is None:
        return None
    return _geglu_linear(found[0])


@functools.cache
def _geglu_linear(lib: str):
    project = _linear_ops(lib, False)
    gating_grad = _geglu_grad(library())
    grads = _linear_bias_grads(lib)

    def bprop(x, weight, bias, out, dout):
        return grads(x, weight, bias, gating_grad(project(x, weight), bias, dout))

    def out_shape(x, weight, _):
        return list(x[:-1]) + [weight[0] // 2]

    return ops.Custom(f"{lib}:GegluLinearForward", out_shape, _like_first, func_type="aot", bprop=bprop)


@functools.cache
def _linear_grads(lib: str):
    """`(data, weights)`: `data(dy, weight)` is the gradient of x, `weights(x, dy)` that of the weight."""

    def data_shape(dy, weight):
        return list(dy[:-1]) + [weight[1]]

    def like_second(_, second):
        return second

    def weight_shape(x, dy):
        return [dy[-1], x[-1]]

    data = ops.Custom(f"{lib}:LinearBackwardData", data_shape, like_second, func_type="aot")
    weights = ops.Custom(f"{lib}:LinearBackwardWeights", weight_shape, _like_first, func_type="aot")
    return data, weights


@functools.cache
def _linear_bias_grads(lib: str):
    """`grads(x, weight, bias, dy)`: the gradients of x, the weight and the bias of x W^T + b for the output gradient
    dy (that of the bias is dy's column sums)."""
    data, weights = _linear_grads(lib)
    column_sums = sum_rows_op()

    def grads(x, weight, bias, dy):
        return data(dy, weight), weights(x, dy), column_sums(dy.reshape(-1, bias.shape[0]))

    return grads


def _linear_out_shape(x, weight, *_):
    """Shape inference of x W^T (+ ...): x's leading axes and the weight's rows."""
    return list(x[:-1]) + [weight[0]]


@functools.cache
def _linear_ops(lib: str, bias: bool):
    """The operator of `linear_op`, one per library and kind: its output shape follows from the inputs' alone, so
    every layer can share it."""
    if bias:
        grads = _linear_bias_grads(lib)

        def bprop(x, weight, b, out, dout):
            return grads(x, weight, b, dout)

        return ops.Custom(f"{lib}:LinearForward", _linear_out_shape, _like_first, func_type="aot", bprop=bprop)

    data, weights = _linear_grads(lib)

    def bprop_no_bias(x, weight, out, dout):
        return data(dout, weight), weights(x, dout)

    return ops.Custom(
        f"{lib}:LinearForwardNoBias", _linear_out_shape, _like_first, func_type="aot", bprop=bprop_no_bias
    )


@functools.cache
def attention_op(heads: int, channels_first: bool = False):
    """`op(q, k, v, options)`: multi-head softmax attention of float32 q (B, Lq, H*D) to k and v (B, Lk, H*D),
    giving (B, Lq, H*D), in one oneDNN-library kernel that reads each head in place and never holds the whole score
    tensor (`onednn.cc`); `options` is the int64 tensor `attention_options(heads, channels_first)`. With
    `channels_first` every tensor is (B, H*D, L). Its gradient recomputes the probabilities with MindSpore's
    BatchMatMul and the permutation and softmax kernels. None where those kernels are not used, or with
    SVD_ATTENTION_KERNEL=0."""
    if not _on_cpu() or os.environ.get("SVD_ATTENTION_KERNEL", "1") == "0" or library() is None:
        return None
    lib = onednn_library()
    if lib is None:
        return None
    _set_threads(lib, _threads())
    to_heads, axes = permute_op((0, 2, 1, 3))  # its own inverse
    swap, swap_axes = permute_op((0, 2, 1))
    softmax = softmax_op()
    softmax_grad = ops.Custom(f"{library()}:SoftmaxBackward", _like_first, _like_first, func_type="aot")
    matmul, matmul_nt, matmul_tn = ops.BatchMatMul(), ops.BatchMatMul(transpose_b=True), ops.BatchMatMul(True)

    def split(x):  # (B, L, H*D) -> (B, H, L, D)
        if channels_first:
            x = swap(x, swap_axes)
        return to_heads(x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads), axes)

    def merge(x):  # (B, H, L, D) -> (B, L, H*D)
        x = to_heads(x, axes).reshape(x.shape[0], x.shape[2], x.shape[1] * x.shape[3])
        return swap(x, swap_axes) if channels_first else x

    def bprop(q, k, v, options, out, dout):
        scale = (q.shape[1 if channels_first else 2] // heads) ** -0.5
        qh, kh, vh, dh = split(q), split(k), split(v), split(dout)
        p = softmax(matmul_nt(qh, kh) * scale)
        ds = softmax_grad(p, matmul_nt(dh, vh)) * scale
        return merge(matmul(ds, kh)), merge(matmul_tn(ds, qh)), merge(matmul_tn(p, dh)), ops.zeros_like(options)

    op = ops.Custom(f"{lib}:AttentionForward", _like_first, _like_first, func_type="aot", bprop=bprop)
    op.add_prim_attr("heads", heads)  # one primitive per head count and layout (see conv2d_op)
    op.add_prim_attr("channels_first", channels_first)
    return op


def attention_options(heads: int, channels_first: bool = False):
    """The options input of `attention_op`: (heads, channels first) as int64."""
    return ms.Tensor([heads, int(channels_first)], ms.int64)


def release_conv_memory() -> None:
    """Frees the scratch buffers that the convolution and matmul kernels keep between calls (they grow to the
    largest call's blocked copies, working memory and GEGLU gate); a no-op where the kernels are not loaded."""
    import ctypes

    if not _on_cpu():
        return
    if onednn_library.cache_info().currsize and (lib := onednn_library()) is not None:
        ctypes.CDLL(lib).SvdConvRelease()
    if matmul_library.cache_info().currsize and (lib := matmul_library()) is not None:
        ctypes.CDLL(lib).SvdMatmulRelease()


def conv_geometry(stride: tuple[int, int], padding: tuple[int, int, int, int], inference: bool = False):
    """The geometry input of `conv2d_op`: stride (H, W), then padding (top, bottom, left, right), then 1 for a
    forward pass outside training (Winograd may then take more working memory: `onednn.cc`), as int64."""
    return ms.Tensor([*stride, *padding, int(inference)], ms.int64)
