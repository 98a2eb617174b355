"""Building blocks shared by the UNet, the autoencoder and the CLIP vision tower.

Parameters are named `weight` and `bias` everywhere (as in PyTorch) so that the official checkpoints map by name.
Normalisations and softmax compute in float32 whatever the input dtype, which is what keeps mixed precision stable.
"""

from __future__ import annotations

import contextlib
import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import HeUniform, Uniform, initializer

from modules import kernels

__all__ = [
    "cast",
    "GroupNorm",
    "LayerNorm",
    "Linear",
    "Conv2d",
    "TemporalConv",
    "SiLU",
    "GELU",
    "Identity",
    "attention",
    "timestep_embedding",
    "zero_module",
    "upsample_nearest2x",
]


def _fan_in_uniform(fan_in: int) -> Uniform:
    return Uniform(1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)


def cast(x: Tensor, dtype) -> Tensor:
    """x as `dtype`: x itself when it already is. A cast to the same type is still an operator launch and a copy in
    PyNative (about 0.1 ms each, 0.33 s of the 3,343 casts of an SVD UNet evaluation)."""
    return x if x.dtype == dtype else x.astype(dtype)


class Identity(nn.Cell):
    def construct(self, x, *args, **kwargs):
        return x


class SiLU(nn.Cell):
    """x * sigmoid(x), computed in float32."""

    def construct(self, x):
        dtype = x.dtype
        x = x.astype(ms.float32)
        return (x * ops.sigmoid(x)).astype(dtype)


class _ExactGELU(nn.Cell):
    """x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2, with its derivative Phi(x) + x * phi(x) written out.

    The fallback of `GELU` where the compiled kernels of `modules.kernels` are not used. It avoids two slower CPU
    kernels that MindSpore's own `ops.gelu` uses: its forward divides x by sqrt 2 (a Div, 37 ms against 6 ms for a
    multiplication on the 18 M values of one SVD feed-forward), and its gradient squares x with a generic power
    kernel. Here both are multiplications; the erf itself stays MindSpore's, the slow part (242 ms there)."""

    def construct(self, x):
        xf = x.astype(ms.float32)
        half = xf * 0.5
        return (half + half * ops.erf(xf * _SQRT1_2)).astype(x.dtype)

    def bprop(self, x, out, dout):
        xf = x.astype(ms.float32)
        cdf = 0.5 + 0.5 * ops.erf(xf * _SQRT1_2)
        pdf = ops.exp(xf * xf * -0.5) * _INV_SQRT_2PI
        return ((dout.astype(ms.float32) * (cdf + xf * pdf)).astype(x.dtype),)


_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class GELU(nn.Cell):
    """Exact (erf) GELU, or the tanh approximation. On the CPU the exact one runs the compiled kernel of
    `modules.kernels` (in float32) where it builds, else `_ExactGELU`."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate
        exact = approximate == "none"
        self.kernel = kernels.gelu_op() if exact else None
        self.exact = _ExactGELU() if exact and self.kernel is None else None

    def construct(self, x):
        if self.kernel is not None:
            return cast(self.kernel(cast(x, ms.float32)), x.dtype)
        if self.exact is not None:
            return self.exact(x)
        return ops.gelu(x, approximate=self.approximate)


_NORM_GROUPS = [32]


@contextlib.contextmanager
def norm_groups(num_groups: int):
    """Build the networks inside this block with `num_groups` groups in every GroupNorm instead of SVD's 32.

    Narrow models need it: with 32 channels, 32 groups would normalise each channel on its own. Configs set it
    with the engine's `norm_num_groups`.
    """
    _NORM_GROUPS.append(int(num_groups))
    try:
        yield
    finally:
        _NORM_GROUPS.pop()


def default_norm_groups() -> int:
    """The GroupNorm group count of the networks being built (32 unless `norm_groups` says otherwise)."""
    return _NORM_GROUPS[-1]


class GroupNorm(nn.Cell):
    """GroupNorm over (N, C, *) with per-channel affine `weight`/`bias`, followed by SiLU if `silu` (the two always
    come together in SVD's blocks, and one kernel does both in three passes over memory). Statistics are taken in
    float32.

    On the CPU it runs the compiled kernel of `modules.kernels` where it builds. Otherwise each group is normalised
    as one row of a LayerNorm over (N, G, C/G * spatial), which is much faster on CPU than MindSpore's GroupNorm
    kernel, and the per-channel affine follows as a depthwise 1x1 convolution and a BiasAdd: spreading it over the
    LayerNorm's row shape instead costs a BroadcastTo as large as the input on every call, and broadcasting
    arithmetic keeps index tables as large as its output in graph mode.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, silu: bool = False):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.silu = silu
        if affine:
            self.weight = Parameter(initializer("ones", (num_channels,), ms.float32), name="weight")
            self.bias = Parameter(initializer("zeros", (num_channels,), ms.float32), name="bias")
        self.kernel = kernels.group_norm_op(num_groups, silu)
        if self.kernel is not None:
            self.eps_tensor = Tensor([eps], ms.float32)
            return
        self.layer_norm = ops.LayerNorm(2, 2, eps)  # normalise each (n, g) row; unit scale and zero shift
        if affine:
            self.scale = ops.Conv2D(num_channels, 1, group=num_channels)
            self.bias_add = ops.BiasAdd()

    def construct(self, x):
        dtype = x.dtype
        if self.kernel is not None:
            if self.affine:
                weight, bias = cast(self.weight, ms.float32), cast(self.bias, ms.float32)
            else:
                weight, bias = ops.ones((self.num_channels,), ms.float32), ops.zeros((self.num_channels,), ms.float32)
            y, _, _ = self.kernel(cast(x, ms.float32), weight, bias, self.eps_tensor)
            return cast(y, dtype)
        shape = x.shape
        xr = x.astype(ms.float32).reshape(shape[0], self.num_groups, -1)
        length = xr.shape[2]
        y, _, _ = self.layer_norm(xr, ops.ones((length,), ms.float32), ops.zeros((length,), ms.float32))
        if self.affine:
            c = self.num_channels
            y = self.scale(y.reshape(shape[0], c, -1, 1), self.weight.astype(ms.float32).reshape(c, 1, 1, 1))
            y = self.bias_add(y, self.bias.astype(ms.float32))
        y = y.reshape(shape)
        if self.silu:
            y = y * ops.sigmoid(y)
        return y.astype(dtype)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with `weight`/`bias`, computed in float32 (forward by the compiled GroupNorm
    kernel with one group where the kernels are used)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.affine = affine
        self.kernel = kernels.layer_norm_op()
        if self.kernel is not None:
            self.eps_tensor = Tensor([eps], ms.float32)
        else:
            self.layer_norm = ops.LayerNorm(-1, -1, eps)
        if affine:
            self.weight = Parameter(initializer("ones", (dim,), ms.float32), name="weight")
            self.bias = Parameter(initializer("zeros", (dim,), ms.float32), name="bias")

    def construct(self, x):
        dtype = x.dtype
        if self.affine:
            weight, bias = cast(self.weight, ms.float32), cast(self.bias, ms.float32)
        else:
            weight, bias = ops.ones((self.dim,), ms.float32), ops.zeros((self.dim,), ms.float32)
        if self.kernel is not None:
            shape = x.shape
            y, _, _ = self.kernel(cast(x.reshape(-1, self.dim), ms.float32), weight, bias, self.eps_tensor)
            return cast(y.reshape(shape), dtype)
        y, _, _ = self.layer_norm(x.astype(ms.float32), weight, bias)
        return y.astype(dtype)


class Linear(nn.Cell):
    """y = x W^T + b over the last axis of an input of any rank; W is (out, in) as in PyTorch.

    On the CPU the product and the bias are one oneDNN matmul (`modules.kernels.linear_op`, float32) where it builds,
    which takes x of any rank as it is; else MindSpore's MatMul over the rows and a BiasAdd."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = Parameter(
            initializer(HeUniform(math.sqrt(5)), (out_features, in_features), ms.float32), name="weight"
        )
        self.has_bias = bias
        if bias:
            self.bias = Parameter(initializer(_fan_in_uniform(in_features), (out_features,), ms.float32), name="bias")
        self.kernel = kernels.linear_op(bias)
        self.kernel_no_bias = kernels.linear_op(False) if bias else self.kernel
        self.kernel_residual = kernels.linear_residual_op() if bias else None
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.BiasAdd()

    def without_bias(self, x):
        """x W^T over the last axis: (..., out), for a caller that adds the bias itself."""
        if self.kernel_no_bias is not None:
            return cast(self.kernel_no_bias(cast(x, ms.float32), cast(self.weight, ms.float32)), x.dtype)
        y = self.matmul(x.reshape(-1, x.shape[-1]), self.weight.astype(x.dtype))
        return y.reshape(x.shape[:-1] + (self.out_features,))

    def with_residual(self, x, residual):
        """x W^T + b + residual, for a residual shaped like the output: the addition is in the matmul's epilogue
        where the kernel is oneDNN 3's (`kernels.linear_residual_op`)."""
        if self.kernel_residual is None:
            return self.construct(x) + residual
        weight, bias = cast(self.weight, ms.float32), cast(self.bias, ms.float32)
        return cast(self.kernel_residual(cast(x, ms.float32), weight, bias, cast(residual, ms.float32)), x.dtype)

    def construct(self, x):
        if not self.has_bias:
            return self.without_bias(x)
        if self.kernel is not None:
            weight, bias = cast(self.weight, ms.float32), cast(self.bias, ms.float32)
            return cast(self.kernel(cast(x, ms.float32), weight, bias), x.dtype)
        y = self.matmul(x.reshape(-1, x.shape[-1]), self.weight.astype(x.dtype))
        y = self.bias_add(y, self.bias.astype(x.dtype))  # not `y + bias`: see GroupNorm on broadcasting
        return y.reshape(x.shape[:-1] + (self.out_features,))


def _pad4(padding: int | tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Padding as (top, bottom, left, right), from one int or the four sides."""
    return (padding,) * 4 if isinstance(padding, int) else tuple(int(p) for p in padding)


class _Conv(nn.Cell):
    """The convolution shared by `Conv2d` and `TemporalConv`: the compiled oneDNN kernel of `modules.kernels` on the
    CPU where it builds (about 2.5x MindSpore's Conv2D there), else MindSpore's Conv2D and a BiasAdd. Computes in
    float32 with the kernel, in the input's dtype without."""

    def __init__(self, out_channels: int, kernel: tuple[int, int], stride: int, padding, groups: int, bias: bool):
        super().__init__()
        pad = _pad4(padding)
        self.pad, self.stride, self.groups, self.has_bias = pad, stride, groups, bias
        self.kernel = kernels.conv2d_op((stride, stride), pad)
        if self.kernel is not None:
            self.geometry = kernels.conv_geometry((stride, stride), pad)
            self.inference_geometry = kernels.conv_geometry((stride, stride), pad, inference=True)
            self.zero_bias = None if bias else Tensor(np.zeros(out_channels, np.float32))
            return
        self.conv = ops.Conv2D(out_channels, kernel, mode=1, pad_mode="pad", pad=pad, stride=stride, group=groups)
        self.bias_add = ops.BiasAdd()

    def construct(self, x, weight, bias):
        if self.kernel is not None:
            bias = cast(bias, ms.float32) if self.has_bias else self.zero_bias
            geometry = self.geometry if self.training else self.inference_geometry  # Winograd's memory bound
            y = self.kernel(cast(x, ms.float32), cast(weight, ms.float32), geometry, bias)
            return cast(y, x.dtype)
        y = self.conv(x, weight.astype(x.dtype))
        if self.has_bias:
            y = self.bias_add(y, bias.astype(x.dtype))
        return y


class Conv2d(nn.Cell):
    """2D convolution over (N, C, H, W) with zero padding (one int, or (top, bottom, left, right)); weight is
    (out, in // groups, kh, kw)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int, int, int] = 0,
        bias: bool = True,
        groups: int = 1,
    ):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = Parameter(
            initializer(HeUniform(math.sqrt(5)), (out_channels, in_channels // groups, kh, kw), ms.float32),
            name="weight",
        )
        self.has_bias = bias
        if bias:
            fan_in = in_channels // groups * kh * kw
            self.bias = Parameter(initializer(_fan_in_uniform(fan_in), (out_channels,), ms.float32), name="bias")
        self.conv = _Conv(out_channels, (kh, kw), stride, padding, groups, bias)

    def construct(self, x):
        return self.conv(x, self.weight, self.bias if self.has_bias else None)


class TemporalConv(nn.Cell):
    """A 3D convolution over (B, C, T, H, W) whose kernel is (kt, 1, 1), with 'same' padding along time.

    The weight keeps the PyTorch Conv3d shape (out, in, kt, 1, 1) so checkpoints load as they are; the computation is
    a 2D convolution over (B, C, T, H*W), which gives the same result and is much faster than Conv3d on CPU.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int], bias: bool = True):
        super().__init__()
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size, 1, 1)
        kt, kh, kw = (int(k) for k in kernel_size)
        if (kh, kw) != (1, 1):
            raise ValueError(f"TemporalConv supports kernels of shape (kt, 1, 1), got {kernel_size}")
        self.kt = kt
        self.out_channels = out_channels
        self.weight = Parameter(
            initializer(HeUniform(math.sqrt(5)), (out_channels, in_channels, kt, 1, 1), ms.float32), name="weight"
        )
        self.has_bias = bias
        if bias:
            self.bias = Parameter(
                initializer(_fan_in_uniform(in_channels * kt), (out_channels,), ms.float32), name="bias"
            )
        self.conv = _Conv(out_channels, (kt, 1), 1, (kt // 2, kt // 2, 0, 0), 1, bias)

    def construct(self, x):
        if self.conv.kernel is not None:  # takes both as they are (a reshape in a graph would be a copy)
            return self.conv(x, self.weight, self.bias if self.has_bias else None)
        b, c, t, h, w = x.shape
        weight = self.weight.reshape(self.out_channels, c, self.kt, 1)
        y = self.conv(x.reshape(b, c, t, h * w), weight, self.bias if self.has_bias else None)
        return y.reshape(b, self.out_channels, t, h, w)


class _Transpose(nn.Cell):
    """`x.transpose(perm)`: MindSpore's Transpose (a view in PyNative, a copy in a graph)."""

    def __init__(self, perm: tuple[int, ...]):
        super().__init__()
        self.perm = perm

    def construct(self, x):
        return x.transpose(self.perm)


class _PermuteKernel(nn.Cell):
    """`x.transpose(perm)` as a new contiguous tensor from the compiled kernel (see `permuter`)."""

    def __init__(self, perm: tuple[int, ...]):
        super().__init__()
        self.op, self.axes = kernels.permute_op(tuple(perm))

    def construct(self, x):
        return self.op(x, self.axes)


def permuter(perm: tuple[int, ...]) -> nn.Cell:
    """A cell that permutes its input's axes by `perm`, through the compiled kernel where it builds, else through
    MindSpore's Transpose. In PyNative MindSpore's transpose is a view whose copy into a contiguous tensor is 15-25x
    slower than the kernel; in a graph the kernel is as fast as its Transpose and the SVD UNet's graph peaks 2.2 GB
    lower with it."""
    return _PermuteKernel(perm) if kernels.permute_enabled() else _Transpose(perm)


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, permute: nn.Cell, softmax=None) -> Tensor:
    """Multi-head softmax attention. q: (B, Lq, H*D), k and v: (B, Lk, H*D) -> (B, Lq, H*D); `permute` is the
    caller's `permuter((0, 2, 1, 3))` cell, which moves the heads in front of the sequence and back, and `softmax`
    the caller's `kernels.softmax_op()` (None: MindSpore's softmax).

    Scores and softmax are computed in float32.
    """
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    dtype = q.dtype
    q = permute(q.reshape(b, lq, heads, d)) * (d**-0.5)
    k = permute(k.reshape(b, lk, heads, d))
    v = permute(v.reshape(b, lk, heads, d))
    scores = ops.BatchMatMul(transpose_b=True)(q, k).astype(ms.float32)
    probs = (ops.softmax(scores, axis=-1) if softmax is None else softmax(scores)).astype(dtype)
    out = ops.BatchMatMul()(probs, v)
    return permute(out).reshape(b, lq, inner)


class Attention(nn.Cell):
    """Multi-head softmax attention as a cell: q (B, Lq, H*D), k and v (B, Lk, H*D) -> (B, Lq, H*D), or with
    `channels_first` (single-head only without the kernel) every tensor (B, C, L). On the CPU one compiled kernel
    (`kernels.attention_op`, float32) where it builds, else `attention` with a permutation cell and the softmax
    kernel, or channels first two BatchMatMuls that read the transposes."""

    def __init__(self, heads: int, channels_first: bool = False):
        super().__init__()
        self.heads = heads
        self.channels_first = channels_first
        self.fused = kernels.attention_op(heads, channels_first)
        if self.fused is not None:
            self.options = kernels.attention_options(heads, channels_first)
        elif channels_first:
            if heads != 1:
                raise ValueError("channels-first attention has one head without the attention kernel")
            self.scores_mm = ops.BatchMatMul(transpose_a=True)
            self.out_mm = ops.BatchMatMul(transpose_b=True)
        else:
            self.permute = permuter((0, 2, 1, 3))
            self.softmax = kernels.softmax_op()

    def construct(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.fused is not None:
            f32 = ms.float32
            return cast(self.fused(cast(q, f32), cast(k, f32), cast(v, f32), self.options), q.dtype)
        if self.channels_first:  # b c l: scores = q^T k and out = v p^T need no transposes
            scores = self.scores_mm(q * (q.shape[1] ** -0.5), k)
            probs = ops.softmax(scores.astype(ms.float32), axis=-1).astype(q.dtype)
            return self.out_mm(v, probs)
        return attention(q, k, v, self.heads, self.permute, self.softmax)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (N,) scalars to (N, dim): [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / (dim/2)).

    Cosine first, as in the original (sgm) and in diffusers with flip_sin_to_cos=True; zero-padded if dim is odd.
    """
    half = dim // 2
    # frequencies rounded once from float64: MindSpore's float32 exp on CPU is a few ulp off, which the large
    # arguments (motion_bucket_id up to 255) amplify
    freqs = Tensor(np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half).astype(np.float32))
    args = t.astype(ms.float32).reshape(-1, 1) * freqs.reshape(1, -1)
    emb = ops.cat([ops.cos(args), ops.sin(args)], axis=-1)
    if dim % 2:
        emb = ops.cat([emb, ops.zeros((emb.shape[0], 1), ms.float32)], axis=-1)
    return emb


def zero_module(cell: nn.Cell) -> nn.Cell:
    """Set every parameter of a cell to zero (output layers of residual branches start as the identity)."""
    for p in cell.get_parameters():
        p.set_data(initializer("zeros", p.shape, p.dtype))
    return cell


def upsample_nearest2x(x: Tensor, kernel=None) -> Tensor:
    """Nearest-neighbour 2x upsampling of (N, C, H, W); by `kernel`, the caller's `kernels.upsample_op()`, where it is
    not None."""
    if kernel is not None:
        return kernel(x)
    n, c, h, w = x.shape
    # tile, not broadcast_to: in PyNative a broadcast view goes through a slow strided copy when materialised
    x = ops.tile(x.reshape(n, c, h, 1, w, 1), (1, 1, 1, 2, 1, 2))
    return x.reshape(n, c, h * 2, w * 2)
