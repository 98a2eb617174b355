"""The SVD autoencoders: the 2D VAE encoder/decoder and the engines that wrap them.

Parameter names follow the sgm checkpoints (`encoder.down.1.block.0.nin_shortcut.weight`, `decoder.mid.attn_1.q.bias`,
...), so the official single-file weights load by identity. The temporal decoder of the SVD first stage lives in
`modules/temporal_ae.py`; it reuses the blocks defined here.

Three engines are provided:
- `AutoencodingEngine`: encoder + regularizer + decoder, no quant convs (the SVD first stage, with a `VideoDecoder`).
- `AutoencoderKL`: the legacy layout with `quant_conv` / `post_quant_conv` (first stage of the image-decoder variant).
- `AutoencoderKLModeOnly`: the encoder half of `AutoencoderKL`, returning the posterior mode (the conditioning-frame
  encoder). The decoder half of that checkpoint is never run, so it is not built.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

from mindspore import Tensor, nn, ops

from modules import kernels
from modules.config import instantiate
from modules.layers import (
    Attention,
    Conv2d,
    GroupNorm,
    Identity,
    Linear,
    SiLU,
    default_norm_groups,
    upsample_nearest2x,
)

__all__ = [
    "Normalize",
    "ResnetBlock",
    "AttnBlock",
    "Downsample",
    "Upsample",
    "Encoder",
    "Decoder",
    "DiagonalGaussianRegularizer",
    "AutoencodingEngine",
    "AutoencoderKL",
    "AutoencoderKLModeOnly",
]

# Constructor keys of the sgm engines that only matter for training the autoencoder itself; accepted and ignored.
_TRAINING_ONLY_KWARGS = frozenset(
    {"loss_config", "lossconfig", "monitor", "ckpt_path", "ckpt_engine", "ignore_keys", "ema_decay", "input_key",
     "optimizer_config", "lr_g_factor", "trainable_ae_params", "ae_optimizer_args", "trainable_disc_params",
     "disc_optimizer_args", "disc_start_iter", "diff_boost_factor", "additional_decode_keys", "max_batch_size"}
)  # fmt: skip


def _check_training_only(owner: str, kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - _TRAINING_ONLY_KWARGS)
    if unknown:
        raise TypeError(f"{owner} got unexpected arguments {unknown}")


_NORM_ENABLED = [True]


@contextlib.contextmanager
def _normalization(enabled: bool):
    """Build the blocks inside with (True) or without (False) their GroupNorms; see `Encoder`'s `norm`."""
    _NORM_ENABLED.append(bool(enabled))
    try:
        yield
    finally:
        _NORM_ENABLED.pop()


def Normalize(channels: int, num_groups: int | None = None, silu: bool = False) -> nn.Cell:  # noqa: N802 (sgm's name)
    """The VAE normalisation: GroupNorm(32) with eps 1e-6 (see layers.norm_groups for narrow models), or an
    identity inside a first stage built with `norm=False`; followed by SiLU (swish) if `silu`, fused into the
    GroupNorm."""
    if not _NORM_ENABLED[-1]:
        return SiLU() if silu else Identity()
    return GroupNorm(num_groups or default_norm_groups(), channels, eps=1e-6, silu=silu)


class ResnetBlock(nn.Cell):
    """norm1-swish-conv1 (+ temb) -norm2-swish-dropout-conv2, plus a shortcut when the channel count changes.

    `timesteps` is accepted and ignored so that 2D and video blocks share one call signature in the decoder.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        temb_channels: int = 0,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels, silu=True)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.has_temb = temb_channels > 0
        if self.has_temb:
            self.temb_proj = Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels, silu=True)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else Identity()
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = SiLU()  # of the time embedding; the norms' own SiLU is fused into them
        self.has_shortcut = in_channels != out_channels
        self.use_conv_shortcut = conv_shortcut
        if self.has_shortcut:
            if conv_shortcut:
                self.conv_shortcut = Conv2d(in_channels, out_channels, 3, padding=1)
            else:
                self.nin_shortcut = Conv2d(in_channels, out_channels, 1)

    def construct(self, x: Tensor, temb: Tensor | None = None, timesteps: int | None = None) -> Tensor:
        h = self.conv1(self.norm1(x))
        if self.has_temb and temb is not None:
            h = h + self.temb_proj(self.act(temb)).reshape(temb.shape[0], -1, 1, 1)
        h = self.conv2(self.dropout(self.norm2(h)))
        if self.has_shortcut:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over the h*w positions, with 1x1 conv projections and a residual."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = Conv2d(in_channels, in_channels, 1)
        self.k = Conv2d(in_channels, in_channels, 1)
        self.v = Conv2d(in_channels, in_channels, 1)
        self.proj_out = Conv2d(in_channels, in_channels, 1)
        self.attention = Attention(1, channels_first=True)  # on b c (h w) as the projections give it

    def construct(self, x: Tensor, timesteps: int | None = None) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q = self.q(hn).reshape(b, c, h * w)
        k = self.k(hn).reshape(b, c, h * w)
        v = self.v(hn).reshape(b, c, h * w)
        out = self.attention(q, k, v).reshape(b, c, h, w)
        return x + self.proj_out(out)


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Cell:
    """sgm's attention factory; every exact softmax variant is the same computation here."""
    if attn_type in ("vanilla", "vanilla-xformers"):
        return AttnBlock(in_channels)
    if attn_type == "none":
        return Identity()
    raise NotImplementedError(f"attn_type {attn_type!r} is not supported (use 'vanilla' or 'vanilla-xformers')")


class Downsample(nn.Cell):
    """Halve h and w: zero-pad one row at the bottom and one column at the right, then a stride-2 3x3 conv."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            # ops.Conv2D padding order is (top, bottom, left, right): the asymmetric pad is folded into the conv.
            self.conv = Conv2d(in_channels, in_channels, 3, stride=2, padding=(0, 1, 0, 1))
        else:
            self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def construct(self, x: Tensor) -> Tensor:
        if self.with_conv:
            return self.conv(x)
        return self.pool(x)


class Upsample(nn.Cell):
    """Nearest-neighbour 2x, then an optional 3x3 conv."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = Conv2d(in_channels, in_channels, 3, padding=1)
        self.upsample = kernels.upsample_op()

    def construct(self, x: Tensor) -> Tensor:
        x = upsample_nearest2x(x, self.upsample)
        if self.with_conv:
            x = self.conv(x)
        return x


class _Level(nn.Cell):
    """One resolution level: `block` (resnets), `attn` (possibly empty) and an optional `downsample`/`upsample`."""

    def __init__(self, blocks: list, attns: list, resample: nn.Cell | None, resample_name: str):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.attn = nn.CellList(attns)
        self.has_attn = len(attns) > 0
        self.has_resample = resample is not None
        if resample is not None:
            setattr(self, resample_name, resample)


class _Mid(nn.Cell):
    def __init__(self, block_1: nn.Cell, attn_1: nn.Cell, block_2: nn.Cell):
        super().__init__()
        self.block_1 = block_1
        self.attn_1 = attn_1
        self.block_2 = block_2


class Encoder(nn.Cell):
    """sgm VAE encoder: (N, in_channels, H, W) -> (N, 2*z_channels or z_channels, H/2^(L-1), W/2^(L-1)).

    `norm=False` (also taken by `Decoder`) builds it without the GroupNorms of its spatial blocks (the video decoder's
    temporal blocks keep theirs), for small first stages trained from scratch on flat-coloured images: each of those
    GroupNorms removes a mean and a scale per image, and with them the absolute colour of large flat areas, which
    short trainings then fail to recover (configs/toy/svd_toy.yaml says what was measured). The official SVD weights
    use the default.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int | None = None,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        norm: bool = True,
        **ignore_kwargs: Any,
    ):
        super().__init__()
        with _normalization(norm):
            if use_linear_attn:
                raise NotImplementedError("linear attention is not supported in the VAE")
            self.num_resolutions = len(ch_mult)
            self.conv_in = Conv2d(in_channels, ch, 3, padding=1)
            in_ch_mult = (1,) + tuple(ch_mult)
            curr_res = resolution
            levels = []
            block_in = ch
            for i_level in range(self.num_resolutions):
                blocks, attns = [], []
                block_in = ch * in_ch_mult[i_level]
                block_out = ch * ch_mult[i_level]
                for _ in range(num_res_blocks):
                    blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                    block_in = block_out
                    if curr_res in attn_resolutions:
                        attns.append(make_attn(block_in, attn_type))
                down = None
                if i_level != self.num_resolutions - 1:
                    down = Downsample(block_in, resamp_with_conv)
                    curr_res //= 2
                levels.append(_Level(blocks, attns, down, "downsample"))
            self.down = nn.CellList(levels)
            self.mid = _Mid(
                ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout),
                make_attn(block_in, attn_type),
                ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout),
            )
            self.norm_out = Normalize(block_in, silu=True)
            self.conv_out = Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def construct(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if level.has_attn:
                    h = level.attn[i](h)
            if level.has_resample:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(self.norm_out(h))


class Decoder(nn.Cell):
    """sgm VAE decoder: (N, z_channels, h, w) -> (N, out_ch, h*2^(L-1), w*2^(L-1)), frame by frame.

    Subclasses swap the building blocks through `_make_resblock`, `_make_attn` and `_make_conv_out`; every block is
    called with `timesteps`, which the 2D blocks ignore.
    """

    # Whether conv_out takes the frame count (the video decoder's AE3DConv does).
    temporal_conv_out = False

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int | None = None,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        norm: bool = True,
        **ignore_kwargs: Any,
    ):
        super().__init__()
        with _normalization(norm):
            if use_linear_attn:
                raise NotImplementedError("linear attention is not supported in the VAE")
            self.num_resolutions = len(ch_mult)
            self.give_pre_end = give_pre_end
            self.tanh_out = tanh_out
            block_in = ch * ch_mult[-1]
            curr_res = resolution // 2 ** (self.num_resolutions - 1)
            self.conv_in = Conv2d(z_channels, block_in, 3, padding=1)
            self.mid = _Mid(
                self._make_resblock(block_in, block_in, dropout),
                self._make_attn(block_in, attn_type),
                self._make_resblock(block_in, block_in, dropout),
            )
            # Built from the lowest resolution up, stored by level index like sgm (up.0 is the full-resolution level).
            levels = [None] * self.num_resolutions
            for i_level in range(self.num_resolutions - 1, -1, -1):
                blocks, attns = [], []
                block_out = ch * ch_mult[i_level]
                for _ in range(num_res_blocks + 1):
                    blocks.append(self._make_resblock(block_in, block_out, dropout))
                    block_in = block_out
                    if curr_res in attn_resolutions:
                        attns.append(self._make_attn(block_in, attn_type))
                up = None
                if i_level != 0:
                    up = Upsample(block_in, resamp_with_conv)
                    curr_res *= 2
                levels[i_level] = _Level(blocks, attns, up, "upsample")
            self.up = nn.CellList(levels)
            self.norm_out = Normalize(block_in, silu=True)
            self.conv_out = self._make_conv_out(block_in, out_ch)

    def _make_resblock(self, in_channels: int, out_channels: int, dropout: float) -> nn.Cell:
        return ResnetBlock(in_channels=in_channels, out_channels=out_channels, dropout=dropout)

    def _make_attn(self, channels: int, attn_type: str) -> nn.Cell:
        return make_attn(channels, attn_type)

    def _make_conv_out(self, in_channels: int, out_channels: int) -> nn.Cell:
        return Conv2d(in_channels, out_channels, 3, padding=1)

    def construct(self, z: Tensor, timesteps: int | None = None) -> Tensor:
        """z: (b t) c h w. `timesteps` (frames per clip) matters only to the temporal layers of subclasses."""
        h = self.conv_in(z)
        h = self.mid.block_1(h, None, timesteps)
        h = self.mid.attn_1(h, timesteps)
        h = self.mid.block_2(h, None, timesteps)
        for i_level in range(self.num_resolutions - 1, -1, -1):
            level = self.up[i_level]
            for i, block in enumerate(level.block):
                h = block(h, None, timesteps)
                if level.has_attn:
                    h = level.attn[i](h, timesteps)
            if level.has_resample:
                h = level.upsample(h)
        if self.give_pre_end:
            return h
        h = self.norm_out(h)
        h = self.conv_out(h, timesteps) if self.temporal_conv_out else self.conv_out(h)
        if self.tanh_out:
            h = ops.tanh(h)
        return h


class DiagonalGaussianRegularizer(nn.Cell):
    """Split moments (N, 2C, h, w) into mean and log-variance; return mean + std * eps (sample) or the mean (mode).

    The log-variance is clamped to [-30, 20] as in sgm. `noise` (N, C, h, w) may be given for reproducibility;
    otherwise standard normal noise is drawn. `sample=None` uses the constructor's choice.
    """

    def __init__(self, sample: bool = True):
        super().__init__()
        self.sample = sample

    def construct(self, moments: Tensor, sample: bool | None = None, noise: Tensor | None = None) -> Tensor:
        mean, logvar = ops.split(moments, moments.shape[1] // 2, axis=1)
        if sample is None:
            sample = self.sample
        if not sample:
            return mean
        std = ops.exp(0.5 * ops.clamp(logvar, -30.0, 20.0))
        if noise is None:
            noise = ops.randn_like(mean)
        return mean + std * noise.astype(mean.dtype)


def _built(owner: str, cell: nn.Cell | None, config: dict | None, what: str) -> nn.Cell | None:
    """A sub-cell given either built or as an sgm {target, params} config."""
    if cell is not None and config is not None:
        raise ValueError(f"{owner}: give either {what} or {what}_config, not both")
    return cell if config is None else instantiate(config)


class AutoencodingEngine(nn.Cell):
    """Encoder -> posterior -> latent; latent -> decoder. No quant convs (the SVD first stage).

    Args:
        encoder / encoder_config: an `Encoder` (double_z, so it returns moments), built or as a {target, params} dict.
        decoder / decoder_config: a `Decoder` or `VideoDecoder`, built or as a config.
        regularization / regularizer_config: the posterior head; default `DiagonalGaussianRegularizer()`.
        **kwargs: sgm training-only options (loss_config, ...), accepted and ignored.

    Unlike sgm, whose regularizer always samples, `encode` returns the posterior mode unless asked to sample
    (`sample=True` or a `noise` tensor): training passes its noise explicitly, inference gets a deterministic latent.
    """

    def __init__(
        self,
        encoder: nn.Cell | None = None,
        decoder: nn.Cell | None = None,
        regularization: nn.Cell | None = None,
        *,
        encoder_config: dict | None = None,
        decoder_config: dict | None = None,
        regularizer_config: dict | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        owner = type(self).__name__
        _check_training_only(owner, kwargs)
        self.encoder = _built(owner, encoder, encoder_config, "encoder")
        self.decoder = _built(owner, decoder, decoder_config, "decoder")
        if self.encoder is None or self.decoder is None:
            raise ValueError(f"{owner} needs an encoder and a decoder")
        regularization = _built(owner, regularization, regularizer_config, "regularizer")
        self.regularization = regularization if regularization is not None else DiagonalGaussianRegularizer()

    def encode(self, x: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        """x: (N, 3, H, W) in [-1, 1] -> latent (N, z, H/8, W/8): the mode, or mean + std * noise when sampling."""
        return self.regularization(self.encoder(x), sample or noise is not None, noise)

    def decode(self, z: Tensor, timesteps: int | None = None) -> Tensor:
        """z: (b t) c h w -> (b t) 3 H W; `timesteps` is the clip length seen by the temporal layers."""
        return self.decoder(z, timesteps)

    def construct(self, x: Tensor, timesteps: int | None = None) -> Tensor:
        return self.decode(self.encode(x), timesteps)


class AutoencoderKL(nn.Cell):
    """The legacy sgm KL autoencoder: Encoder -> quant_conv -> posterior; post_quant_conv -> Decoder.

    The first stage of the image-decoder SVD variant. `encode` follows `AutoencodingEngine.encode`.

    Args:
        embed_dim: latent channels.
        ddconfig: the sgm Encoder/Decoder keyword arguments (ch, ch_mult, z_channels, double_z, ...).
        **kwargs: sgm training-only options (lossconfig, monitor, ...), accepted and ignored.
    """

    def __init__(self, embed_dim: int, ddconfig: dict, **kwargs: Any):
        super().__init__()
        _check_training_only(type(self).__name__, kwargs)
        ddconfig = dict(ddconfig)
        z_channels = ddconfig["z_channels"]
        mult = 2 if ddconfig.get("double_z", True) else 1
        self.embed_dim = embed_dim
        self.encoder = Encoder(**ddconfig)
        self.quant_conv = Conv2d(mult * z_channels, mult * embed_dim, 1)
        self._build_decoder(embed_dim, ddconfig)
        self.regularization = DiagonalGaussianRegularizer()

    def _build_decoder(self, embed_dim: int, ddconfig: dict) -> None:
        self.post_quant_conv = Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.decoder = Decoder(**ddconfig)

    def encode(self, x: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        return self.regularization(self.quant_conv(self.encoder(x)), sample or noise is not None, noise)

    def decode(self, z: Tensor, timesteps: int | None = None) -> Tensor:
        return self.decoder(self.post_quant_conv(z), timesteps)

    def construct(self, x: Tensor, timesteps: int | None = None) -> Tensor:
        return self.decode(self.encode(x), timesteps)


class AutoencoderKLModeOnly(AutoencoderKL):
    """Encoder + quant_conv returning the posterior mode: the conditioning-frame encoder of SVD.

    The official checkpoint also stores this autoencoder's `decoder.*` and `post_quant_conv.*`; they are never used
    for conditioning, so they are not built (the converter drops them).
    """

    def _build_decoder(self, embed_dim: int, ddconfig: dict) -> None:
        pass

    def encode(self, x: Tensor) -> Tensor:
        """x: (N, 3, H, W) in [-1, 1] -> the posterior mean (N, embed_dim, H/8, W/8)."""
        return self.regularization(self.quant_conv(self.encoder(x)), False)

    def decode(self, z: Tensor, timesteps: int | None = None) -> Tensor:
        raise NotImplementedError("AutoencoderKLModeOnly has no decoder (the conditioning encoder never decodes)")

    def construct(self, x: Tensor) -> Tensor:
        return self.encode(x)


_TEMPORAL_NAMES = ("VideoDecoder", "VideoResBlock", "AE3DConv")


def __getattr__(name: str) -> Any:
    """`modules.autoencoder.VideoDecoder` (the name configs use) resolves to `modules.temporal_ae.VideoDecoder`.

    A lazy lookup, because temporal_ae itself imports this module.
    """
    if name in _TEMPORAL_NAMES:
        from modules import temporal_ae

        return getattr(temporal_ae, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
