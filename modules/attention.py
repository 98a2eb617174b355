"""Transformer blocks of the video UNet, with the parameter names of sgm (`modules/attention.py`,
`modules/video_attention.py`).

Spatial blocks attend over the pixels of each frame, `(b t) (h w) c`; temporal blocks attend over the frames of each
pixel, `(b h w) t c`. `AlphaBlender` (which mixes the two paths) lives here so that both this module and `unet.py` can
use it without a circular import; `modules.unet` re-exports it.
"""

from __future__ import annotations

from typing import Sequence

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from modules import kernels
from modules.layers import (
    GELU,
    Attention,
    Conv2d,
    GroupNorm,
    Identity,
    LayerNorm,
    Linear,
    SiLU,
    cast,
    default_norm_groups,
    permuter,
    timestep_embedding,
    zero_module,
)

__all__ = [
    "AlphaBlender",
    "CrossAttention",
    "GEGLU",
    "FeedForward",
    "BasicTransformerBlock",
    "SpatialTransformer",
    "VideoTransformerBlock",
    "SpatialVideoTransformer",
    "chunked_feed_forward",
]

# Accepted for config compatibility; every mode runs `layers.Attention`.
ATTENTION_MODES = ("softmax", "softmax-xformers", "vanilla", "vanilla-xformers", "flash-attention")


def _dropout(p: float) -> nn.Cell:
    return nn.Dropout(p=p) if p > 0 else Identity()


def chunked_feed_forward(ff: nn.Cell, x: Tensor, dim: int, chunk_size: int | None) -> Tensor:
    """Apply `ff` to slices of `chunk_size` along `dim` and concatenate (same result, smaller peak memory).

    The last slice may be shorter than `chunk_size`.
    """
    if chunk_size is None:
        return ff(x)
    outs = []
    for piece in ops.split(x, chunk_size, axis=dim):
        outs.append(ff(piece))
    return ops.cat(outs, axis=dim)


class AlphaBlender(nn.Cell):
    """`alpha * x_spatial + (1 - alpha) * x_temporal`.

    Strategies: `fixed` (alpha = merge factor), `learned` (alpha = sigmoid(mix_factor)) and `learned_with_images`
    (like `learned`, but alpha = 1, i.e. the pure spatial path, for frames flagged in `image_only_indicator`, a (b, t)
    tensor). A missing indicator counts as all zeros. alpha is shaped after the rank of the inputs:
    5-D `b c t h w`, 4-D `(b t) c h w` or 3-D `(b t) s c`. On float32 inputs the blend is one pass of the compiled
    kernel (`kernels.blend_op`) where it builds, except for a per-frame alpha on 5-D inputs.
    """

    strategies = ("learned", "fixed", "learned_with_images")

    def __init__(self, alpha: float, merge_strategy: str = "learned_with_images"):
        super().__init__()
        if merge_strategy not in self.strategies:
            raise ValueError(f"merge_strategy must be one of {self.strategies}, got {merge_strategy!r}")
        self.merge_strategy = merge_strategy
        # sgm keeps `fixed` as a (saved) buffer: a frozen parameter here, so checkpoint names still match.
        self.mix_factor = Parameter(
            initializer(float(alpha), (1,), ms.float32), name="mix_factor", requires_grad=merge_strategy != "fixed"
        )
        self.blend = kernels.blend_op()

    def get_alpha(self, image_only_indicator: Tensor | None, ndim: int) -> Tensor:
        if self.merge_strategy == "fixed":
            return self.mix_factor
        alpha = ops.sigmoid(self.mix_factor)
        if self.merge_strategy == "learned" or image_only_indicator is None:
            return alpha
        b, t = image_only_indicator.shape
        alpha = ops.where(image_only_indicator.astype(ms.bool_), ops.ones((b, t), ms.float32), alpha.reshape(1, 1))
        if ndim == 5:
            return alpha.reshape(b, 1, t, 1, 1)
        if ndim == 4:
            return alpha.reshape(b * t, 1, 1, 1)
        if ndim == 3:
            return alpha.reshape(b * t, 1, 1)
        raise ValueError(f"AlphaBlender: inputs of rank {ndim} are not supported")

    def construct(self, x_spatial: Tensor, x_temporal: Tensor, image_only_indicator: Tensor | None = None) -> Tensor:
        alpha = self.get_alpha(image_only_indicator, x_spatial.ndim)
        if self.blend is not None and x_spatial.dtype == ms.float32 and (alpha.size == 1 or x_spatial.ndim < 5):
            # one alpha, or one per leading (b t) index: equal consecutive slices for the compiled kernel
            return self.blend(x_spatial, x_temporal, alpha.reshape(-1))
        alpha = alpha.astype(x_spatial.dtype)
        if alpha.size > 1:
            # per-frame alpha: broadcast explicitly (see layers.GroupNorm on broadcasting arithmetic in graph mode)
            alpha = ops.broadcast_to(alpha, x_spatial.shape)
        return alpha * x_spatial + (1.0 - alpha) * x_temporal


class CrossAttention(nn.Cell):
    """Multi-head attention of `x` (B, Lq, query_dim) to `context` (B', Lk, context_dim); self-attention if None.

    `context` may have fewer rows than `x` when consecutive query rows share one context: with B = r * B', row i of
    `x` attends to row i // r of `context`. This is exact (each query attends independently) and avoids repeating the
    context r times, as sgm does for the temporal cross-attention. A single-token context skips q, k and the softmax
    (exact: the one attention weight is 1). With `residual` (shaped like the output) the result is output + residual;
    for a single-token context that is one row per context added to its rows (`kernels.add_rows_op`).
    """

    def __init__(
        self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim if context_dim is not None else query_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner_dim, bias=False)
        self.to_k = Linear(context_dim, inner_dim, bias=False)
        self.to_v = Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.SequentialCell([Linear(inner_dim, query_dim), _dropout(dropout)])
        self.out_dropout = dropout > 0
        self.attention = Attention(heads)
        self.add_rows = kernels.add_rows_op()

    def construct(self, x: Tensor, context: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
        if context is None:
            context = x
        b, lq, _ = x.shape
        bc = context.shape[0]
        if context.shape[1] == 1:
            # One key: its softmax weight is exactly 1, so every query gets v. SVD's image context is one token.
            out = self.to_out(self.to_v(context))  # bc 1 c
            if residual is not None:
                rows = cast(residual.reshape(bc, (b // bc) * lq, -1), ms.float32)
                return cast(self.add_rows(rows, cast(out, ms.float32)).reshape(b, lq, -1), residual.dtype)
            # tile, not broadcast_to: in PyNative a broadcast view goes through a slow strided copy when materialised
            return ops.tile(out, (1, (b // bc) * lq, 1)).reshape(b, lq, -1)
        q = self.to_q(x)
        k = self.to_k(context)
        v = self.to_v(context)
        inner = q.shape[-1]
        if bc != b:
            # (r b') lq inner -> b' (r lq) inner: the query rows that share a context become one longer sequence.
            out = self.attention(q.reshape(bc, (b // bc) * lq, inner), k, v).reshape(b, lq, inner)
        else:
            out = self.attention(q, k, v)
        if residual is None:
            return self.to_out(out)
        if self.out_dropout:
            return self.to_out(out) + residual
        return self.to_out[0].with_residual(out, residual)  # the addition in the projection's epilogue


class GEGLU(nn.Cell):
    """Linear to 2 * dim_out, then `h * gelu(gate)` (exact GELU). On the CPU the gating is one compiled kernel
    (`modules.kernels`, float32) where it builds; outside training (`set_train(False)`, MindSpore's default) the
    projection and gating are two oneDNN 3 matmuls with the GELU and the product in their epilogues
    (`kernels.geglu_linear_op`), which never write the 2 * dim_out projection."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)
        self.kernel = kernels.geglu_op()  # adds the projection's bias itself
        self.fused = kernels.geglu_linear_op()
        self.gelu = GELU() if self.kernel is None else None

    def construct(self, x: Tensor) -> Tensor:
        if self.fused is not None and not self.training:
            weight, bias = cast(self.proj.weight, ms.float32), cast(self.proj.bias, ms.float32)
            return cast(self.fused(cast(x, ms.float32), weight, bias), x.dtype)
        if self.kernel is None:
            h, gate = ops.chunk(self.proj(x), 2, axis=-1)
            return h * self.gelu(gate)
        p = self.proj.without_bias(x)
        return cast(self.kernel(cast(p, ms.float32), cast(self.proj.bias, ms.float32)), x.dtype)


class FeedForward(nn.Cell):
    """`net.0` (GEGLU, or Linear + GELU), `net.1` dropout, `net.2` Linear; inner width `dim * mult`."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim_out if dim_out is not None else dim
        project_in = GEGLU(dim, inner_dim) if glu else nn.SequentialCell([Linear(dim, inner_dim), GELU()])
        self.net = nn.SequentialCell([project_in, _dropout(dropout), Linear(inner_dim, dim_out)])

    def construct(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if residual is None:
            return self.net(x)
        return self.net[2].with_residual(self.net[1](self.net[0](x)), residual)


class BasicTransformerBlock(nn.Cell):
    """Pre-norm self-attention, cross-attention to `context`, and gated feed-forward, each with a residual.

    With `disable_self_attn`, `attn1` attends to `context` too. `checkpoint` turns on recompute for training.
    """

    def __init__(
        self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
        gated_ff: bool = True, checkpoint: bool = False, disable_self_attn: bool = False, attn_mode: str = "softmax",
    ):  # fmt: skip
        super().__init__()
        if attn_mode not in ATTENTION_MODES:
            raise ValueError(f"unknown attention mode {attn_mode!r}")
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)
        self._chunk_size = None
        self._chunk_dim = 0
        if checkpoint:
            self.recompute()

    def set_chunk_feed_forward(self, chunk_size: int | None, dim: int = 0) -> None:
        """Run the feed-forward in slices of `chunk_size` along `dim` of (B, L, C); None turns chunking off."""
        self._chunk_size = chunk_size
        self._chunk_dim = dim

    def construct(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None, x)
        x = self.attn2(self.norm2(x), context, x)
        if self._chunk_size is None:
            return self.ff(self.norm3(x), x)
        return chunked_feed_forward(self.ff, self.norm3(x), self._chunk_dim, self._chunk_size) + x


class SpatialTransformer(nn.Cell):
    """GroupNorm, `proj_in`, transformer blocks over the h*w tokens of each image, zero-initialised `proj_out`, plus
    the input as residual. `proj_in`/`proj_out` are Linear layers with `use_linear`, else 1x1 convolutions.
    """

    def __init__(
        self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
        context_dim: int | Sequence[int] | None = None, disable_self_attn: bool = False, use_linear: bool = False,
        attn_type: str = "softmax", use_checkpoint: bool = False,
    ):  # fmt: skip
        super().__init__()
        if context_dim is None or isinstance(context_dim, int):
            context_dim = [context_dim] * depth
        elif len(context_dim) != depth:
            if len(set(context_dim)) != 1:
                raise ValueError(f"context dims {list(context_dim)} do not match depth {depth}")
            context_dim = [context_dim[0]] * depth
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = GroupNorm(default_norm_groups(), in_channels, eps=1e-6)
        self.proj_in = Linear(in_channels, inner_dim) if use_linear else Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.CellList([
            BasicTransformerBlock(
                inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim[d],
                disable_self_attn=disable_self_attn, attn_mode=attn_type,
            )
            for d in range(depth)
        ])  # fmt: skip
        self.proj_out = zero_module(Linear(inner_dim, in_channels) if use_linear else Conv2d(inner_dim, in_channels, 1))
        self.to_channels_last = permuter((0, 2, 3, 1))
        self.to_channels_first = permuter((0, 3, 1, 2))
        if use_checkpoint:
            self.recompute()

    def _to_tokens(self, x: Tensor) -> Tensor:
        """b c h w -> b (h w) c', normalised and projected in."""
        b, _, h, w = x.shape
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = self.to_channels_last(x).reshape(b, h * w, -1)
        if self.use_linear:
            x = self.proj_in(x)
        return x

    def _to_image(self, x: Tensor, h: int, w: int) -> Tensor:
        """b (h w) c' -> b c h w, projected out."""
        if self.use_linear:
            x = self.proj_out(x)
        x = self.to_channels_first(x.reshape(x.shape[0], h, w, -1))
        if not self.use_linear:
            x = self.proj_out(x)
        return x

    def construct(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        _, _, h, w = x.shape
        x_in = x
        x = self._to_tokens(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        return self._to_image(x, h, w) + x_in


class VideoTransformerBlock(nn.Cell):
    """Transformer block whose attention runs along time: `(b t) s c -> (b s) t c`, and back at the end.

    Optional `ff_in` (with `norm_in`) first; `attn1` self-attention over frames; `attn2` cross-attention to `context`
    (rows per clip, or per clip and token); gated feed-forward. Residuals only where widths match (`dim == inner_dim`).
    As in sgm, giving `inner_dim` turns `ff_in` on.
    """

    def __init__(
        self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
        gated_ff: bool = True, checkpoint: bool = False, timesteps: int | None = None, ff_in: bool = False,
        inner_dim: int | None = None, attn_mode: str = "softmax", disable_self_attn: bool = False,
        disable_temporal_crossattention: bool = False, switch_temporal_ca_to_sa: bool = False,
    ):  # fmt: skip
        super().__init__()
        if attn_mode not in ATTENTION_MODES:
            raise ValueError(f"unknown attention mode {attn_mode!r}")
        self.use_ff_in = ff_in or inner_dim is not None
        inner_dim = inner_dim if inner_dim is not None else dim
        if n_heads * d_head != inner_dim:
            raise ValueError(f"{n_heads} heads x {d_head} != inner dim {inner_dim}")
        self.is_res = inner_dim == dim
        if self.use_ff_in:
            self.norm_in = LayerNorm(dim)
            self.ff_in = FeedForward(dim, dim_out=inner_dim, dropout=dropout, glu=gated_ff)
        self.timesteps = timesteps
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(inner_dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout)
        self.ff = FeedForward(inner_dim, dim_out=dim, dropout=dropout, glu=gated_ff)
        if disable_temporal_crossattention and switch_temporal_ca_to_sa:
            raise ValueError("switch_temporal_ca_to_sa needs the temporal cross-attention")
        self.has_attn2 = not disable_temporal_crossattention
        self.switch_temporal_ca_to_sa = switch_temporal_ca_to_sa
        if self.has_attn2:
            self.norm2 = LayerNorm(inner_dim)
            attn2_context = None if switch_temporal_ca_to_sa else context_dim
            self.attn2 = CrossAttention(inner_dim, attn2_context, n_heads, d_head, dropout)
        self.norm1 = LayerNorm(inner_dim)
        self.norm3 = LayerNorm(inner_dim)
        self._chunk_size = None
        self.swap_frames = permuter((0, 2, 1, 3))
        if checkpoint:
            self.recompute()

    def set_chunk_feed_forward(self, chunk_size: int | None, dim: int = 1) -> None:
        """Chunk `ff_in` and `ff`. As in diffusers, always along the frame axis of `(b s) t c`, whatever `dim`."""
        self._chunk_size = chunk_size

    def _feed_forward(self, ff: nn.Cell, h: Tensor, x: Tensor) -> Tensor:
        """ff(h), plus x where the widths match (the residual in ff's last projection unless chunked)."""
        if not self.is_res:
            return chunked_feed_forward(ff, h, 1, self._chunk_size)
        if self._chunk_size is None:
            return ff(h, x)
        return chunked_feed_forward(ff, h, 1, self._chunk_size) + x

    def construct(self, x: Tensor, context: Tensor | None = None, num_frames: int | None = None) -> Tensor:
        t = self.timesteps if self.timesteps is not None else num_frames
        bt, s, c = x.shape
        b = bt // t
        x = self.swap_frames(x.reshape(b, t, s, c)).reshape(b * s, t, c)
        if self.use_ff_in:
            x = self._feed_forward(self.ff_in, self.norm_in(x), x)
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None, x)
        if self.has_attn2:
            x = self.attn2(self.norm2(x), None if self.switch_temporal_ca_to_sa else context, x)
        x = self._feed_forward(self.ff, self.norm3(x), x)
        c_out = x.shape[-1]
        return self.swap_frames(x.reshape(b, s, t, c_out)).reshape(bt, s, c_out)


class SpatialVideoTransformer(SpatialTransformer):
    """SpatialTransformer whose every block is followed by a temporal block (`time_stack`), blended by `time_mixer`.

    The temporal path gets a learned frame-index embedding (`time_pos_embed`). With `use_spatial_context`, the
    temporal cross-attention context is the spatial context of the first frame of each clip, shared by all h*w tokens.
    Input `(b t) c h w`; `context` `(b t) L context_dim`; `time_context` (b, L, time_context_dim) or
    (b, time_context_dim).
    """

    def __init__(
        self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
        use_linear: bool = False, context_dim: int | None = None, use_spatial_context: bool = False,
        timesteps: int | None = None, merge_strategy: str = "fixed", merge_factor: float = 0.5,
        time_context_dim: int | None = None, ff_in: bool = False, checkpoint: bool = False, time_depth: int = 1,
        attn_mode: str = "softmax", disable_self_attn: bool = False, disable_temporal_crossattention: bool = False,
        max_time_embed_period: int = 10000,
    ):  # fmt: skip
        # recompute is set at the end, once all sub-cells exist
        super().__init__(
            in_channels, n_heads, d_head, depth=depth, dropout=dropout, context_dim=context_dim,
            disable_self_attn=disable_self_attn, use_linear=use_linear, attn_type=attn_mode, use_checkpoint=False,
        )  # fmt: skip
        self.depth = depth  # sgm builds `depth` temporal blocks; its `time_depth` is unused
        self.max_time_embed_period = max_time_embed_period
        inner_dim = n_heads * d_head
        if use_spatial_context:
            time_context_dim = context_dim
        self.time_stack = nn.CellList([
            VideoTransformerBlock(
                inner_dim, n_heads, d_head, dropout=dropout, context_dim=time_context_dim, timesteps=timesteps,
                ff_in=ff_in, inner_dim=inner_dim, attn_mode=attn_mode, disable_self_attn=disable_self_attn,
                disable_temporal_crossattention=disable_temporal_crossattention,
            )
            for _ in range(depth)
        ])  # fmt: skip
        self.use_spatial_context = use_spatial_context
        self.time_pos_embed = nn.SequentialCell(
            [Linear(in_channels, in_channels * 4), SiLU(), Linear(in_channels * 4, in_channels)]
        )
        self.time_mixer = AlphaBlender(alpha=merge_factor, merge_strategy=merge_strategy)
        self.add_rows = kernels.add_rows_op()
        if checkpoint:
            # Only now: recompute() captures the parameters that exist when it is called.
            self.recompute()

    def construct(
        self, x: Tensor, context: Tensor | None = None, time_context: Tensor | None = None, num_frames: int = 1,
        image_only_indicator: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        bt, _, h, w = x.shape
        b = bt // num_frames
        x_in = x
        if self.use_spatial_context:
            # context of frame 0 of each clip: (b t) L C -> b L C (CrossAttention shares it over the h*w tokens)
            time_context = context.reshape((b, num_frames) + context.shape[1:])[:, 0]
        elif time_context is not None and time_context.ndim == 2:
            time_context = time_context.expand_dims(1)
        x = self._to_tokens(x)

        # Frame-index embedding, (b t) 1 C: the same for every clip; added to each frame's h*w tokens by add_rows
        # (not by broadcasting arithmetic: see layers.GroupNorm)
        frames = ops.arange(0, num_frames, dtype=ms.float32)
        t_emb = timestep_embedding(frames, self.in_channels, max_period=self.max_time_embed_period)
        emb = self.time_pos_embed(t_emb.astype(x.dtype)).astype(ms.float32)
        emb = ops.tile(emb.reshape(1, num_frames, -1), (b, 1, 1)).reshape(bt, 1, -1)

        for i in range(self.depth):
            x = self.transformer_blocks[i](x, context)
            x_mix = self.time_stack[i](cast(self.add_rows(cast(x, ms.float32), emb), x.dtype), time_context, num_frames)
            x = self.time_mixer(x, x_mix, image_only_indicator)
        return self._to_image(x, h, w) + x_in
