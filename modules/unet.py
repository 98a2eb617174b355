"""The SVD video UNet (sgm `VideoUNet`), with the parameter names of the sgm checkpoint (`model.diffusion_model.*`).

Frames of all clips are stacked on the batch axis, `(b t) c h w`; the temporal layers regroup them by clip using
`num_frames`, a plain Python int (a compile-time constant in graph mode).
"""

from __future__ import annotations

from typing import Sequence

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from modules import kernels
from modules.attention import ATTENTION_MODES, AlphaBlender, SpatialVideoTransformer
from modules.layers import (
    Conv2d,
    GroupNorm,
    Identity,
    Linear,
    SiLU,
    TemporalConv,
    cast,
    default_norm_groups,
    permuter,
    timestep_embedding,
    upsample_nearest2x,
    zero_module,
)

__all__ = [
    "AlphaBlender",
    "ResBlock",
    "VideoResBlock",
    "Downsample",
    "Upsample",
    "TimestepEmbedSequential",
    "VideoUNet",
    "TEMPORAL_KEYWORDS",
]

TEMPORAL_KEYWORDS = ("time_stack", "time_mixer", "time_pos_embed")


def _norm(channels: int, silu: bool = False) -> GroupNorm:
    """sgm's `normalization` (32 groups), with the SiLU that follows it fused in if `silu`."""
    return GroupNorm(default_norm_groups(), channels, eps=1e-5, silu=silu)


def _conv(dims: int, cin: int, cout: int, kernel: int | Sequence[int], stride: int = 1) -> nn.Cell:
    """A 'same'-padded convolution: 2D, or 3D with a (kt, 1, 1) kernel."""
    if dims == 2:
        if not isinstance(kernel, int):
            raise ValueError(f"2D convolutions take an int kernel, got {kernel}")
        return Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)
    if dims == 3 and stride == 1:
        kernel = (kernel, kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        return TemporalConv(cin, cout, kernel)  # raises unless the kernel is (kt, 1, 1)
    raise NotImplementedError(f"convolutions with dims={dims}, stride={stride} are not supported")


class Downsample(nn.Cell):
    """Halve H and W: stride-2 3x3 convolution `op`, or 2x2 average pooling."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1,
        third_down: bool = False,
    ):  # fmt: skip
        super().__init__()
        if dims != 2 or third_down:
            raise NotImplementedError("only 2D downsampling is supported")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.op = Conv2d(channels, self.out_channels, 3, stride=2, padding=padding)
        else:
            if self.out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def construct(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Cell):
    """Double H and W (nearest), then an optional 3x3 convolution `conv`."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1,
        third_up: bool = False, kernel_size: int = 3, scale_factor: int = 2,
    ):  # fmt: skip
        super().__init__()
        if dims != 2 or third_up or scale_factor != 2:
            raise NotImplementedError("only 2D nearest 2x upsampling is supported")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = Conv2d(channels, self.out_channels, kernel_size, padding=padding)
        self.upsample = kernels.upsample_op()

    def construct(self, x: Tensor) -> Tensor:
        x = upsample_nearest2x(x, self.upsample)
        if self.use_conv:
            x = self.conv(x)
        return x


class ResBlock(nn.Cell):
    """GroupNorm-SiLU-conv (`in_layers`), plus the projected embedding (`emb_layers`), then GroupNorm-SiLU-dropout-
    zero-initialised conv (`out_layers`), plus the input through `skip_connection`.

    dims=3 works on `b c t h w` with a (kt, 1, 1) kernel; its embedding is then (b, t, emb_channels) and, with
    `exchange_temb_dims`, is broadcast as `b c t 1 1`. `skip_t_emb` drops the embedding altogether.
    """

    def __init__(
        self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None, use_conv: bool = False,
        use_scale_shift_norm: bool = False, dims: int = 2, use_checkpoint: bool = False, up: bool = False,
        down: bool = False, kernel_size: int | Sequence[int] = 3, exchange_temb_dims: bool = False,
        skip_t_emb: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.skip_t_emb = skip_t_emb
        self.exchange_temb_dims = exchange_temb_dims and not skip_t_emb
        out_ch = self.out_channels
        # The SiLU after each GroupNorm runs inside it; an Identity keeps the SiLU's slot, so checkpoint names stay
        self.in_layers = nn.SequentialCell(
            [_norm(channels, silu=True), Identity(), _conv(dims, channels, out_ch, kernel_size)]
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        if skip_t_emb:
            if use_scale_shift_norm:
                raise ValueError("skip_t_emb cannot be combined with use_scale_shift_norm")
        else:
            emb_out = 2 * out_ch if use_scale_shift_norm else out_ch
            self.emb_layers = nn.SequentialCell([SiLU(), Linear(emb_channels, emb_out)])
            self.bias_add = ops.BiasAdd()
        self.out_layers = nn.SequentialCell(
            [
                # with scale and shift, the SiLU comes after them
                _norm(out_ch, silu=not use_scale_shift_norm),
                SiLU() if use_scale_shift_norm else Identity(),
                nn.Dropout(p=dropout) if dropout > 0 else Identity(),
                zero_module(_conv(dims, out_ch, out_ch, kernel_size)),
            ]
        )
        if out_ch == channels:
            self.skip_connection = Identity()
        elif use_conv:
            self.skip_connection = _conv(dims, channels, out_ch, kernel_size)
        else:
            self.skip_connection = _conv(dims, channels, out_ch, 1)
        if use_checkpoint:
            self.recompute()

    def construct(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        if self.skip_t_emb:
            return self.skip_connection(x) + self.out_layers(h)
        emb_out = cast(self.emb_layers(emb), h.dtype)
        if self.exchange_temb_dims:
            emb_out = emb_out.swapaxes(1, 2)  # b t c -> b c t
        emb_out = emb_out.reshape(emb_out.shape + (1,) * (h.ndim - emb_out.ndim))
        if self.use_scale_shift_norm:
            scale, shift = ops.chunk(emb_out, 2, axis=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for i in range(1, 4):
                h = self.out_layers[i](h)
        else:
            # One value per (sample, channel[, frame]): added as the bias of a single-sample view, neither a
            # BroadcastTo as large as h nor broadcasting arithmetic (see layers.GroupNorm on both).
            shape = h.shape
            h = self.bias_add(h.reshape(1, emb_out.size, -1), emb_out.reshape(-1)).reshape(shape)
            h = self.out_layers(h)
        return self.skip_connection(x) + h


class VideoResBlock(ResBlock):
    """A 2D ResBlock, then a temporal ResBlock (`time_stack`, kernel over frames) blended in by `time_mixer`.

    construct(x `(b t) c h w`, emb `(b t) d`, num_frames, image_only_indicator (b, t) or None).
    """

    def __init__(
        self, channels: int, emb_channels: int, dropout: float, video_kernel_size: int | Sequence[int] = 3,
        merge_strategy: str = "fixed", merge_factor: float = 0.5, out_channels: int | None = None,
        use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2, use_checkpoint: bool = False,
        up: bool = False, down: bool = False,
    ):  # fmt: skip
        # recompute is set at the end, once all sub-cells exist
        super().__init__(
            channels, emb_channels, dropout, out_channels=out_channels, use_conv=use_conv,
            use_scale_shift_norm=use_scale_shift_norm, dims=dims, use_checkpoint=False, up=up, down=down,
        )  # fmt: skip
        out_ch = out_channels or channels
        self.time_stack = ResBlock(
            out_ch, emb_channels, dropout, out_channels=out_ch, dims=3, kernel_size=video_kernel_size,
            exchange_temb_dims=True,
        )  # fmt: skip
        self.time_mixer = AlphaBlender(alpha=merge_factor, merge_strategy=merge_strategy)
        self.swap_frames = permuter((0, 2, 1, 3, 4))
        if use_checkpoint:
            self.recompute()

    def construct(
        self, x: Tensor, emb: Tensor, num_frames: int = 1, image_only_indicator: Tensor | None = None
    ) -> Tensor:
        x = super().construct(x, emb)
        bt, c, h, w = x.shape
        b = bt // num_frames
        x_t = self.swap_frames(x.reshape(b, num_frames, c, h, w))  # b c t h w
        x_t = self.time_stack(x_t, emb.reshape(b, num_frames, -1))
        x_t = self.swap_frames(x_t).reshape(bt, c, h, w)
        # Blending in the (b t) layout is the same as in sgm's b c t layout and saves a transpose.
        return self.time_mixer(x, x_t, image_only_indicator)


class TimestepEmbedSequential(nn.SequentialCell):
    """A list of layers called in order, each with the arguments its kind takes."""

    def construct(
        self, x: Tensor, emb: Tensor, context: Tensor | None = None, image_only_indicator: Tensor | None = None,
        time_context: Tensor | None = None, num_frames: int = 1,
    ) -> Tensor:  # fmt: skip
        for layer in self.cell_list:
            if isinstance(layer, VideoResBlock):
                x = layer(x, emb, num_frames, image_only_indicator)
            elif isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialVideoTransformer):
                x = layer(x, context, time_context, num_frames, image_only_indicator)
            else:
                x = layer(x)
        return x


class _Embedding(nn.Cell):
    """Class-label lookup table with a PyTorch-named `weight` (num_classes, dim)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.weight = Parameter(initializer(Normal(1.0), (num_classes, dim), ms.float32), name="weight")

    def construct(self, y: Tensor) -> Tensor:
        return ops.gather(self.weight, y.astype(ms.int32), 0)


class _Timestep(nn.Cell):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def construct(self, t: Tensor) -> Tensor:
        return timestep_embedding(t, self.dim)


def _mlp(cin: int, cout: int) -> nn.SequentialCell:
    return nn.SequentialCell([Linear(cin, cout), SiLU(), Linear(cout, cout)])


class VideoUNet(nn.Cell):
    """The sgm `VideoUNet`: a 2D UNet whose ResBlocks are `VideoResBlock`s and whose transformers are
    `SpatialVideoTransformer`s. Constructor arguments are those of sgm (the `network_config.params` of the SVD YAML).

    construct(x `(b t) c h w`, timesteps `(b t,)` (continuous, e.g. EDM c_noise), context `(b t) L context_dim`,
    y `(b t) adm_in_channels`, num_frames t (a Python int), image_only_indicator (b, t) or None = zeros,
    time_context (b, L, time_context_dim), only read without `use_spatial_context`) -> `(b t) out_channels h w`.
    """

    def __init__(
        self, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int,
        attention_resolutions: Sequence[int], dropout: float = 0.0, channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True, dims: int = 2, num_classes: int | str | None = None, use_checkpoint: bool = False,
        num_heads: int = -1, num_head_channels: int = -1, num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False, resblock_updown: bool = False, transformer_depth: int | Sequence[int] = 1,
        transformer_depth_middle: int | None = None, context_dim: int | None = None, time_downup: bool = False,
        time_context_dim: int | None = None, extra_ff_mix_layer: bool = False, use_spatial_context: bool = False,
        merge_strategy: str = "fixed", merge_factor: float = 0.5, spatial_transformer_attn_type: str = "softmax",
        video_kernel_size: int | Sequence[int] = 3, use_linear_in_transformer: bool = False,
        adm_in_channels: int | None = None, disable_temporal_crossattention: bool = False,
        max_ddpm_temb_period: int = 10000,
    ):  # fmt: skip
        super().__init__()
        if context_dim is None:
            raise ValueError("VideoUNet needs context_dim")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        if dims != 2 or time_downup:
            raise NotImplementedError("VideoUNet supports dims=2 without time_downup only")
        if spatial_transformer_attn_type not in ATTENTION_MODES:
            raise ValueError(f"unknown spatial_transformer_attn_type {spatial_transformer_attn_type!r}")
        if isinstance(transformer_depth, int):
            transformer_depth = [transformer_depth] * len(channel_mult)
        if transformer_depth_middle is None:
            transformer_depth_middle = transformer_depth[-1]
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        time_embed_dim = model_channels * 4
        self.time_embed = _mlp(model_channels, time_embed_dim)
        if num_classes is not None:
            if isinstance(num_classes, int):
                self.label_emb = _Embedding(num_classes, time_embed_dim)
            elif num_classes == "continuous":
                self.label_emb = Linear(1, time_embed_dim)
            elif num_classes == "timestep":
                self.label_emb = nn.SequentialCell([_Timestep(model_channels), _mlp(model_channels, time_embed_dim)])
            elif num_classes == "sequential":
                if adm_in_channels is None:
                    raise ValueError('num_classes="sequential" needs adm_in_channels')
                self.label_emb = nn.SequentialCell([_mlp(adm_in_channels, time_embed_dim)])
            else:
                raise ValueError(f"unknown num_classes {num_classes!r}")

        def resblock(ch: int, out_ch: int | None, up: bool = False, down: bool = False) -> VideoResBlock:
            return VideoResBlock(
                ch, time_embed_dim, dropout, video_kernel_size=video_kernel_size, merge_strategy=merge_strategy,
                merge_factor=merge_factor, out_channels=out_ch, use_scale_shift_norm=use_scale_shift_norm, dims=dims,
                use_checkpoint=use_checkpoint, up=up, down=down,
            )  # fmt: skip

        def transformer(ch: int, depth: int) -> SpatialVideoTransformer:
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            return SpatialVideoTransformer(
                ch, heads, dim_head, depth=depth, dropout=dropout, use_linear=use_linear_in_transformer,
                context_dim=context_dim, use_spatial_context=use_spatial_context, merge_strategy=merge_strategy,
                merge_factor=merge_factor, time_context_dim=time_context_dim, ff_in=extra_ff_mix_layer,
                checkpoint=use_checkpoint, attn_mode=spatial_transformer_attn_type,
                disable_temporal_crossattention=disable_temporal_crossattention,
                max_time_embed_period=max_ddpm_temb_period,
            )  # fmt: skip

        blocks = [TimestepEmbedSequential([Conv2d(in_channels, model_channels, 3, padding=1)])]
        skip_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch, transformer_depth[level]))
                blocks.append(TimestepEmbedSequential(layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                ds *= 2
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims, ch)
                blocks.append(TimestepEmbedSequential([down]))
                skip_chans.append(ch)
        self.input_blocks = nn.CellList(blocks)

        self.middle_block = TimestepEmbedSequential(
            [resblock(ch, None), transformer(ch, transformer_depth_middle), resblock(ch, None)]
        )

        blocks = []
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch, transformer_depth[level]))
                if level and i == num_res_blocks:
                    ds //= 2
                    up = resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims, ch)
                    layers.append(up)
                blocks.append(TimestepEmbedSequential(layers))
        self.output_blocks = nn.CellList(blocks)
        self.out = nn.SequentialCell(
            [_norm(ch, silu=True), Identity(), zero_module(Conv2d(model_channels, out_channels, 3, padding=1))]
        )

    def construct(
        self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, y: Tensor | None = None, num_frames: int = 1,
        image_only_indicator: Tensor | None = None, time_context: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass y exactly when the model has num_classes")
        t_emb = timestep_embedding(timesteps, self.model_channels).astype(x.dtype)
        emb = self.time_embed(t_emb)
        if self.num_classes is not None:
            emb = emb + self.label_emb(y).astype(emb.dtype)
        h = x
        skips = ()
        for block in self.input_blocks:
            h = block(h, emb, context, image_only_indicator, time_context, num_frames)
            skips = skips + (h,)
        h = self.middle_block(h, emb, context, image_only_indicator, time_context, num_frames)
        i = len(skips)
        for block in self.output_blocks:
            i = i - 1  # skips are consumed last-in first-out
            h = ops.cat((h, skips[i]), axis=1)
            h = block(h, emb, context, image_only_indicator, time_context, num_frames)
        return self.out(cast(h, x.dtype))

    def enable_forward_chunking(self, chunk_size: int | None = None, dim: int = 0) -> None:
        """Run every transformer feed-forward in chunks of `chunk_size` (default 1) along `dim` (0 batch, 1 tokens);
        the temporal blocks always chunk along frames, as in diffusers. Results are unchanged; peak memory drops.
        In graph mode, call this before the first (compiling) call.
        """
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 or 1, got {dim}")
        self._set_chunking(chunk_size or 1, dim)

    def disable_forward_chunking(self) -> None:
        self._set_chunking(None, 0)

    def _set_chunking(self, chunk_size: int | None, dim: int) -> None:
        for _, cell in self.cells_and_names():
            if hasattr(cell, "set_chunk_feed_forward"):
                cell.set_chunk_feed_forward(chunk_size, dim)

    def get_temporal_param_names(self, prefix: str = "") -> set[str]:
        """Names of the temporal-layer parameters (time_stack, time_mixer, time_pos_embed), with `prefix` prepended."""
        return {prefix + n for n, _ in self.parameters_and_names() if any(k in n for k in TEMPORAL_KEYWORDS)}
