"""OpenCLIP ViT image tower and the two sgm image embedders that SVD conditions on.

Parameter names follow the OpenCLIP model inside the official sgm checkpoint (`conditioner.embedders.0.open_clip.
model.visual.*`), so that file maps by identity. The preprocessing (antialiased bicubic resize to 224x224, [-1, 1] to
[0, 1], CLIP normalisation) is what sgm and diffusers apply before the tower. The resize is linear and separable, so it
is done as two small precomputed matrices: out = A_h @ x @ A_w^T.
"""

from __future__ import annotations

import functools
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, XavierUniform, initializer

from modules.layers import GELU, Attention, LayerNorm, Linear

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "VISION_ARCHS",
    "VisionTransformer",
    "FrozenOpenCLIPImageEmbedder",
    "FrozenOpenCLIPImagePredictionEmbedder",
    "resize_matrix",
    "resize_antialiased",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Vision tower sizes of the OpenCLIP architectures we know (only ViT-H/14 is used by SVD).
VISION_ARCHS: dict[str, dict[str, Any]] = {
    "ViT-H-14": dict(image_size=224, patch_size=14, width=1280, layers=32, heads=16, mlp_ratio=4.0, output_dim=1024),
}


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing: Gaussian antialiasing blur + bicubic (align_corners=True) resize as one matrix per axis.
# ----------------------------------------------------------------------------------------------------------------------


def _reflect_index(i: np.ndarray, n: int) -> np.ndarray:
    """Mirror indices into [0, n) without repeating the edge sample (PyTorch 'reflect' padding)."""
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i < n, i, period - i)


def _blur_matrix(n: int, factor: float) -> np.ndarray:
    """(n, n) matrix of the 1D Gaussian blur that precedes a downscale by `factor`.

    Sigma and kernel size follow diffusers' `_resize_with_antialiasing` (itself from kornia): sigma = max((f - 1) / 2,
    0.001), size = int(max(4 sigma, 3)) made odd, reflect padding. When upsampling, sigma is 0.001 and the 3-tap kernel
    is numerically [0, 1, 0], an identity.
    """
    sigma = max((factor - 1.0) / 2.0, 0.001)
    size = int(max(2.0 * 2 * sigma, 3))
    if size % 2 == 0:
        size += 1
    x = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    g /= g.sum()
    pad = (size - 1) // 2
    # out[j] = sum_m g[m] * x[reflect(j + m - pad)]
    rows = np.repeat(np.arange(n), size)
    cols = _reflect_index(np.arange(n)[:, None] + np.arange(size)[None, :] - pad, n).reshape(-1)
    mat = np.zeros((n, n), dtype=np.float64)
    np.add.at(mat, (rows, cols), np.tile(g, n))
    return mat


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of PyTorch's bicubic interpolation with align_corners=True (A = -0.75, clamped borders).

    Source positions and weights are computed in float32 like PyTorch's CPU kernel does for float32 images.
    """
    f32 = np.float32
    a = f32(-0.75)
    scale = f32(n_in - 1) / f32(n_out - 1) if n_out > 1 else f32(0.0)
    src = scale * np.arange(n_out, dtype=f32)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    t = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0))

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1).astype(np.float64)
    cols = np.clip(i0[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
    mat = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(mat, (np.repeat(np.arange(n_out), 4), cols.reshape(-1)), weights.reshape(-1))
    return mat


@functools.lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int, antialias: bool = True) -> np.ndarray:
    """(n_out, n_in) float64 matrix of the 1D resize along one axis: bicubic(blur(x)), or bicubic(x) without antialias.

    The result is cached and must not be modified.
    """
    mat = _bicubic_matrix(n_in, n_out)
    if antialias:
        mat = mat @ _blur_matrix(n_in, n_in / n_out)
    mat.setflags(write=False)
    return mat


@functools.lru_cache(maxsize=64)
def _resize_tensors(h: int, w: int, out_h: int, out_w: int, antialias: bool) -> tuple[Tensor, Tensor]:
    """A_h (out_h, h) and A_w^T (w, out_w) as float32 tensors.

    Called from `construct` with static shapes: being a cached non-graph function, graph mode evaluates it once at
    compile time and embeds the results as constants.
    """
    a_h = resize_matrix(h, out_h, antialias).astype(np.float32)
    a_w_t = np.ascontiguousarray(resize_matrix(w, out_w, antialias).T.astype(np.float32))
    return Tensor(a_h), Tensor(a_w_t)


def resize_antialiased(x: Tensor, size: tuple[int, int], antialias: bool = True) -> Tensor:
    """Resize (N, C, H, W) to (N, C, *size) like diffusers' `_resize_with_antialiasing` (bicubic, align_corners)."""
    n, c, h, w = x.shape
    out_h, out_w = size
    a_h, a_w_t = _resize_tensors(h, w, out_h, out_w, antialias)
    a_h = a_h.astype(x.dtype)
    a_w_t = a_w_t.astype(x.dtype)
    # Contract the larger axis first: it leaves the smaller intermediate.
    if w >= h:
        y = ops.matmul(x.reshape(n * c * h, w), a_w_t).reshape(n, c, h, out_w)
        return ops.matmul(a_h, y)
    y = ops.matmul(a_h, x)  # (n, c, out_h, w)
    return ops.matmul(y.reshape(n * c * out_h, w), a_w_t).reshape(n, c, out_h, out_w)


# ----------------------------------------------------------------------------------------------------------------------
# Vision transformer (OpenCLIP layout).
# ----------------------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Cell):
    """The stride-p, bias-free patch convolution, computed as reshape + one matmul.

    `weight` keeps the Conv2d shape (width, 3, p, p). Output is (N, gh*gw, width) in row-major patch order, the
    token layout the transformer wants, so no conv-output transpose is needed.
    """

    def __init__(self, in_channels: int, width: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.width = width
        fan_in = in_channels * patch_size * patch_size
        self.weight = Parameter(
            initializer(Normal(fan_in**-0.5), (width, in_channels, patch_size, patch_size), ms.float32), name="weight"
        )
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        n, c, h, w = x.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        if gh * p != h or gw * p != w:  # a strided conv ignores the remainder
            x = x[:, :, : gh * p, : gw * p]
        # n c (gh p) (gw p) -> (n gh gw) (c p p)
        x = x.reshape(n, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5).reshape(n * gh * gw, c * p * p)
        y = self.matmul(x, self.weight.astype(x.dtype).reshape(self.width, c * p * p))
        return y.reshape(n, gh * gw, self.width)


class MultiheadSelfAttention(nn.Cell):
    """torch.nn.MultiheadAttention (batch-first, self-attention only) with its packed q/k/v `in_proj_*` names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.width = width
        self.heads = heads
        self.in_proj_weight = Parameter(
            initializer(XavierUniform(), (3 * width, width), ms.float32), name="in_proj_weight"
        )
        self.in_proj_bias = Parameter(initializer("zeros", (3 * width,), ms.float32), name="in_proj_bias")
        self.out_proj = Linear(width, width)
        self.matmul = ops.MatMul(transpose_b=True)
        self.attention = Attention(heads)

    def construct(self, x):
        b, l, d = x.shape
        # rows of in_proj_weight are [q; k; v]
        qkv = self.matmul(x.reshape(b * l, d), self.in_proj_weight.astype(x.dtype)) + self.in_proj_bias.astype(x.dtype)
        qkv = qkv.reshape(b, l, 3 * d)
        q, k, v = qkv[:, :, :d], qkv[:, :, d : 2 * d], qkv[:, :, 2 * d :]
        return self.out_proj(self.attention(q, k, v))


class MLP(nn.Cell):
    """c_fc -> exact GELU -> c_proj."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = Linear(width, hidden)
        self.gelu = GELU()
        self.c_proj = Linear(hidden, width)

    def construct(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Cell):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=1e-5)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = LayerNorm(width, eps=1e-5)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def construct(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Cell):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.resblocks = nn.CellList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def construct(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Cell):
    """OpenCLIP ViT image tower. (N, 3, S, S) normalised pixels -> (N, output_dim) pooled embedding.

    pooled = ln_post(class token of the last layer) @ proj. Defaults are ViT-H/14 (632,076,800 parameters).
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 14,
        width: int = 1280,
        layers: int = 32,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        output_dim: int = 1024,
    ):
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.output_dim = output_dim
        grid = image_size // patch_size
        scale = width**-0.5
        self.conv1 = PatchEmbed(3, width, patch_size)
        self.class_embedding = Parameter(initializer(Normal(scale), (width,), ms.float32), name="class_embedding")
        self.positional_embedding = Parameter(
            initializer(Normal(scale), (grid * grid + 1, width), ms.float32), name="positional_embedding"
        )
        self.ln_pre = LayerNorm(width, eps=1e-5)
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        self.ln_post = LayerNorm(width, eps=1e-5)
        self.proj = Parameter(initializer(Normal(scale), (width, output_dim), ms.float32), name="proj")

    def construct(self, x):
        dtype = x.dtype
        tokens = self.conv1(x)  # (n, gh*gw, width)
        n = tokens.shape[0]
        cls = ops.broadcast_to(self.class_embedding.astype(dtype).reshape(1, 1, self.width), (n, 1, self.width))
        h = ops.cat([cls, tokens], axis=1) + self.positional_embedding.astype(dtype)
        h = self.transformer(self.ln_pre(h))
        pooled = self.ln_post(h[:, 0])  # (n, width); LayerNorm is per token, so pooling first is the same
        return ops.matmul(pooled, self.proj.astype(dtype))


# ----------------------------------------------------------------------------------------------------------------------
# sgm embedders.
# ----------------------------------------------------------------------------------------------------------------------


class OpenCLIPVisionModel(nn.Cell):
    """The part of an OpenCLIP model the image embedder keeps, so parameter names read `model.visual.*`."""

    def __init__(self, **vision_kwargs):
        super().__init__()
        self.visual = VisionTransformer(**vision_kwargs)

    def construct(self, x):
        return self.visual(x)


class FrozenOpenCLIPImageEmbedder(nn.Cell):
    """sgm's OpenCLIP image embedder: [-1, 1] images (N, 3, H, W) -> (N, output_dim) pooled CLIP image embeddings.

    `arch` picks the tower sizes from `VISION_ARCHS`; explicit `image_size`, `patch_size`, `width`, `layers`, `heads`,
    `mlp_ratio`, `output_dim` override them (tiny test towers). `version`, `device` and `init_device` are accepted for
    config compatibility and ignored: weights come from a checkpoint, never a download. Images are resized to
    (image_size, image_size) (224 for ViT-H, as sgm hard-codes).
    """

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str | None = None,
        device: str | None = None,
        max_length: int = 77,
        freeze: bool = True,
        antialias: bool = True,
        ucg_rate: float = 0.0,
        unsqueeze_dim: bool = False,
        repeat_to_max_len: bool = False,
        num_image_crops: int = 0,
        output_tokens: bool = False,
        init_device: str | None = None,
        image_size: int | None = None,
        patch_size: int | None = None,
        width: int | None = None,
        layers: int | None = None,
        heads: int | None = None,
        mlp_ratio: float | None = None,
        output_dim: int | None = None,
    ):
        super().__init__()
        if num_image_crops > 0:
            raise NotImplementedError("FrozenOpenCLIPImageEmbedder: num_image_crops > 0 (multi-crop) is not supported")
        if output_tokens:
            raise NotImplementedError("FrozenOpenCLIPImageEmbedder: output_tokens=True is not supported")
        explicit = dict(
            image_size=image_size,
            patch_size=patch_size,
            width=width,
            layers=layers,
            heads=heads,
            mlp_ratio=mlp_ratio,
            output_dim=output_dim,
        )
        vision = dict(VISION_ARCHS.get(arch, {}))
        vision.update({k: v for k, v in explicit.items() if v is not None})
        missing = [k for k in explicit if k not in vision]
        if missing:
            raise ValueError(
                f"unknown OpenCLIP arch {arch!r}: pass {missing} explicitly or use one of {list(VISION_ARCHS)}"
            )
        self.model = OpenCLIPVisionModel(**vision)
        self.image_size = int(vision["image_size"])
        self.max_length = max_length
        self.antialias = antialias
        self.ucg_rate = float(ucg_rate)
        self.unsqueeze_dim = unsqueeze_dim
        self.repeat_to_max_len = repeat_to_max_len
        # ((x + 1) / 2 - mean) / std folded into one scale and shift per channel.
        std = np.asarray(CLIP_STD, dtype=np.float64)
        mean = np.asarray(CLIP_MEAN, dtype=np.float64)
        self.norm_scale = Tensor((0.5 / std).reshape(1, 3, 1, 1).astype(np.float32))
        self.norm_shift = Tensor(((0.5 - mean) / std).reshape(1, 3, 1, 1).astype(np.float32))
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        self.set_train(False)
        for param in self.get_parameters():
            param.requires_grad = False

    def preprocess(self, x: Tensor) -> Tensor:
        """[-1, 1] (N, 3, H, W) -> CLIP-normalised (N, 3, S, S)."""
        x = resize_antialiased(x, (self.image_size, self.image_size), self.antialias)
        return x * self.norm_scale.astype(x.dtype) + self.norm_shift.astype(x.dtype)

    def construct(self, image):
        z = self.model(self.preprocess(image)).astype(image.dtype)
        if self.ucg_rate > 0.0:
            # conditioning dropout: zero whole rows with probability ucg_rate
            keep = (ops.rand((z.shape[0], 1)) >= self.ucg_rate).astype(z.dtype)
            z = z * keep
        if self.unsqueeze_dim:
            z = z[:, None, :]
        if self.repeat_to_max_len:
            z3 = z if z.ndim == 3 else z[:, None, :]
            return ops.broadcast_to(z3, (z3.shape[0], self.max_length, z3.shape[2])), z
        return z


class FrozenOpenCLIPImagePredictionEmbedder(nn.Cell):
    """Embeds the conditioning frames with an OpenCLIP image embedder: (b*n_cond, 3, H, W) -> (b*n_copies, n_cond, d).

    `open_clip_embedding_config` is either a built `FrozenOpenCLIPImageEmbedder` or an sgm-style config dict
    `{"target": ...FrozenOpenCLIPImageEmbedder, "params": {...}}`; `open_clip` (a built cell) may be passed instead.
    Each batch item is repeated `n_copies` times consecutively, as einops `b t d -> (b s) t d`.
    """

    def __init__(
        self,
        open_clip_embedding_config: dict | nn.Cell | None = None,
        n_cond_frames: int = 1,
        n_copies: int = 1,
        open_clip: nn.Cell | None = None,
    ):
        super().__init__()
        if open_clip is None:
            open_clip = open_clip_embedding_config
        if isinstance(open_clip, dict):
            target = str(open_clip.get("target", "FrozenOpenCLIPImageEmbedder"))
            if target.rsplit(".", 1)[-1] != "FrozenOpenCLIPImageEmbedder":
                raise ValueError(f"FrozenOpenCLIPImagePredictionEmbedder: unsupported embedder target {target!r}")
            open_clip = FrozenOpenCLIPImageEmbedder(**dict(open_clip.get("params") or {}))
        if not isinstance(open_clip, nn.Cell):
            raise TypeError("FrozenOpenCLIPImagePredictionEmbedder needs an embedder cell or its config dict")
        self.open_clip = open_clip
        self.n_cond_frames = n_cond_frames
        self.n_copies = n_copies

    def construct(self, vid):
        z = self.open_clip(vid)  # ((b t), d)
        d = z.shape[-1]
        b = z.shape[0] // self.n_cond_frames
        z = z.reshape(b, 1, self.n_cond_frames, d)
        z = ops.broadcast_to(z, (b, self.n_copies, self.n_cond_frames, d))
        return z.reshape(b * self.n_copies, self.n_cond_frames, d)
