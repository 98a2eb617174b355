"""The temporal VAE decoder of the SVD first stage (sgm `VideoDecoder`).

It is the 2D `Decoder` with two changes ("conv-only" time mode):
- every ResnetBlock becomes a `VideoResBlock`: the spatial block, then a 3-D residual block over time (`time_stack`),
  blended as `alpha * temporal + (1 - alpha) * spatial` with alpha = sigmoid(mix_factor). Note that alpha weights the
  TEMPORAL branch here, the opposite of the UNet's AlphaBlender.
- `conv_out` becomes `AE3DConv`: the 2D 3x3 conv followed by a (3, 1, 1) conv over time (`time_mix_conv`).
Inputs are (b t) c h w; the temporal layers view them as b c t h w with t = `timesteps`.
"""

from __future__ import annotations

from typing import Any, Sequence

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Constant, initializer

from modules import kernels
from modules.autoencoder import Decoder, ResnetBlock
from modules.layers import Conv2d, TemporalConv, permuter
from modules.unet import ResBlock

__all__ = ["VideoResBlock", "AE3DConv", "VideoDecoder"]


def _temporal_kernel(video_kernel_size: int | Sequence[int]) -> tuple[int, int, int]:
    """Normalise sgm's `video_kernel_size` (an int means a cubic kernel) and check it is (kt, 1, 1)."""
    if isinstance(video_kernel_size, int):
        kernel = (video_kernel_size,) * 3
    else:
        kernel = tuple(int(k) for k in video_kernel_size)
    if len(kernel) != 3 or kernel[1:] != (1, 1) or kernel[0] % 2 == 0:
        raise NotImplementedError(
            f"video_kernel_size {video_kernel_size} is not supported: only (kt, 1, 1) with odd kt (SVD uses [3, 1, 1])"
        )
    return kernel


def _mix_factor(alpha: float, merge_strategy: str) -> Parameter | Tensor:
    if merge_strategy == "learned":
        return Parameter(initializer(Constant(alpha), (1,), ms.float32), name="mix_factor")
    if merge_strategy == "fixed":
        return Tensor([alpha], ms.float32)
    raise ValueError(f"unknown merge strategy {merge_strategy!r} (use 'fixed' or 'learned')")


class VideoResBlock(ResnetBlock):
    """Spatial ResnetBlock on (b t) c h w, then `time_stack` over b c t h w, blended by `mix_factor`."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        video_kernel_size: int | Sequence[int] = (3, 1, 1),
        alpha: float = 0.0,
        merge_strategy: str = "learned",
    ):
        super().__init__(in_channels=in_channels, out_channels=out_channels, dropout=dropout)
        # the UNet's residual block over time, without a timestep embedding
        self.time_stack = ResBlock(
            self.out_channels,
            emb_channels=0,
            dropout=dropout,
            dims=3,
            kernel_size=_temporal_kernel(video_kernel_size),
            skip_t_emb=True,
        )
        self.learned_alpha = merge_strategy == "learned"
        self.mix_factor = _mix_factor(alpha, merge_strategy)
        self.swap_frames = permuter((0, 2, 1, 3, 4))
        self.blend = kernels.blend_op()

    def construct(self, x: Tensor, temb: Tensor | None = None, timesteps: int | None = None) -> Tensor:
        x = super().construct(x, temb)
        bt, c, h, w = x.shape
        t = bt if timesteps is None else timesteps
        x_t = self.time_stack(self.swap_frames(x.reshape(bt // t, t, c, h, w)), None)
        x_t = self.swap_frames(x_t).reshape(bt, c, h, w)
        alpha = ops.sigmoid(self.mix_factor) if self.learned_alpha else self.mix_factor
        if self.blend is not None and x.dtype == ms.float32:
            return self.blend(x_t, x, alpha)
        alpha = alpha.astype(x.dtype)
        return alpha * x_t + (1.0 - alpha) * x


class AE3DConv(Conv2d):
    """A 2D conv on (b t) c h w followed by `time_mix_conv`, a (kt,1,1) conv over b c t h w."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        video_kernel_size: int | Sequence[int] = (3, 1, 1),
        kernel_size: int = 3,
        padding: int = 1,
    ):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding)
        self.time_mix_conv = TemporalConv(out_channels, out_channels, _temporal_kernel(video_kernel_size))
        self.swap_frames = permuter((0, 2, 1, 3, 4))

    def construct(self, x: Tensor, timesteps: int | None = None) -> Tensor:
        x = super().construct(x)
        bt, c, h, w = x.shape
        t = bt if timesteps is None else timesteps
        x = self.time_mix_conv(self.swap_frames(x.reshape(bt // t, t, c, h, w)))
        return self.swap_frames(x).reshape(bt, c, h, w)


class VideoDecoder(Decoder):
    """sgm VideoDecoder: the Decoder with VideoResBlocks and an AE3DConv output layer.

    Args (besides the Decoder's ddconfig keywords):
        video_kernel_size: kernel of the temporal convs; (kt, 1, 1) only ([3, 1, 1] in SVD).
        alpha: initial mix factor (0.0, i.e. a 0.5 blend after the sigmoid).
        merge_strategy: "learned" (sigmoid of a parameter) or "fixed" (the constant alpha).
        time_mode: "conv-only" (SVD; attention stays the 2D AttnBlock). "all" and "attn-only" (temporal attention
            blocks) are not implemented.
    construct(z, timesteps): z is (b t) c h w; `timesteps` = t frames per clip (None: the whole batch is one clip).
    """

    temporal_conv_out = True

    def __init__(
        self,
        *args: Any,
        video_kernel_size: int | Sequence[int] = 3,
        alpha: float = 0.0,
        merge_strategy: str = "learned",
        time_mode: str = "conv-only",
        **kwargs: Any,
    ):
        if time_mode in ("all", "attn-only"):
            raise NotImplementedError(
                f"VideoDecoder time_mode {time_mode!r} (temporal attention blocks) is not implemented; "
                "SVD uses 'conv-only'"
            )
        if time_mode != "conv-only":
            raise ValueError(f"unknown time_mode {time_mode!r}; expected 'conv-only', 'all' or 'attn-only'")
        if merge_strategy not in ("fixed", "learned"):
            raise ValueError(f"unknown merge strategy {merge_strategy!r} (use 'fixed' or 'learned')")
        # Read by the block factories, which run inside Decoder.__init__.
        self.video_kernel_size = _temporal_kernel(video_kernel_size)
        self.alpha = float(alpha)
        self.merge_strategy = merge_strategy
        self.time_mode = time_mode
        super().__init__(*args, **kwargs)

    def _make_resblock(self, in_channels: int, out_channels: int, dropout: float) -> nn.Cell:
        return VideoResBlock(
            in_channels=in_channels,
            out_channels=out_channels,
            dropout=dropout,
            video_kernel_size=self.video_kernel_size,
            alpha=self.alpha,
            merge_strategy=self.merge_strategy,
        )

    def _make_conv_out(self, in_channels: int, out_channels: int) -> nn.Cell:
        return AE3DConv(in_channels, out_channels, self.video_kernel_size)
