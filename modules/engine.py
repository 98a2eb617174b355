"""The video latent diffusion engine: UNet, denoiser, conditioner and first stage built from one config node.

Parameter names follow the official single-file checkpoint: `model.diffusion_model.*` (the UNet),
`conditioner.embedders.N.*` and `first_stage_model.*`.
"""

from __future__ import annotations

from typing import Callable

import mindspore as ms
from mindspore import Tensor, nn, ops

from modules.config import instantiate


class DiffusionWrapper(nn.Cell):
    """Appends the `concat` conditioning to the noisy latent's channels and calls the UNet."""

    def __init__(self, diffusion_model: nn.Cell):
        super().__init__()
        self.diffusion_model = diffusion_model

    def construct(self, x, t, concat, context, y, num_frames: int = 1):
        return self.diffusion_model(ops.cat([x, concat], axis=1), t, context=context, y=y, num_frames=num_frames)


class DenoiseCell(nn.Cell):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, cond): one network evaluation, compiled whole in graph mode.

    x: (N, C, h, w) noisy latents, sigma: (N,), concat/context/y: the conditioning routed by the conditioner.
    """

    def __init__(self, wrapper: DiffusionWrapper, scaling, compute_dtype=ms.float32):
        super().__init__()
        self.model = wrapper
        self.scaling = scaling
        self.compute_dtype = compute_dtype

    def construct(self, x, sigma, concat, context, y, num_frames: int = 1):
        s = sigma.astype(ms.float32).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.scaling(s)
        dt = self.compute_dtype
        out = self.model(
            (x * c_in).astype(dt), c_noise.reshape(-1), concat.astype(dt), context.astype(dt), y.astype(dt), num_frames
        )
        return out.astype(ms.float32) * c_out + x.astype(ms.float32) * c_skip


class VideoDiffusionEngine(nn.Cell):
    """Holds the networks of SVD and the recipe pieces the config picks (denoiser, sampler, loss, sigma sampler)."""

    def __init__(
        self,
        network_config: dict,
        denoiser_config: dict,
        first_stage_config: dict,
        conditioner_config: dict | None = None,
        sampler_config: dict | None = None,
        loss_fn_config: dict | None = None,
        sigma_sampler_config: dict | None = None,
        scale_factor: float = 1.0,
        disable_first_stage_autocast: bool = False,
        disable_first_stage_amp: bool | dict = False,
        en_and_decode_n_samples_a_time: int | None = None,
        num_frames: int = 14,
        input_key: str = "frames",
        ckpt_path: str | None = None,
        **ignored,
    ):
        super().__init__()
        self.model = DiffusionWrapper(instantiate(network_config))
        self.denoiser = instantiate(denoiser_config)
        self.conditioner = instantiate(
            conditioner_config or {"target": "modules.conditioner.GeneralConditioner", "params": {"emb_models": []}}
        )
        self.first_stage_model = instantiate(first_stage_config)
        self.first_stage_model.set_train(False)
        for p in self.first_stage_model.get_parameters():
            p.requires_grad = False
        self.sampler = instantiate(sampler_config) if sampler_config else None
        self.loss_fn = instantiate(loss_fn_config) if loss_fn_config else None
        self.sigma_sampler = instantiate(sigma_sampler_config) if sigma_sampler_config else None
        self.scale_factor = scale_factor
        # the first stage stays in float32 under mixed precision (read by modules.amp)
        self.disable_first_stage_amp = bool(disable_first_stage_autocast or disable_first_stage_amp)
        self.en_and_decode_n_samples_a_time = en_and_decode_n_samples_a_time
        self.input_key = input_key
        self.num_frames = num_frames  # the frame count the model was trained for (14 SVD, 25 SVD-XT)
        self.compute_dtype = ms.float32  # the UNet's; set by modules.amp.apply_amp

    @property
    def unet(self) -> nn.Cell:
        return self.model.diffusion_model

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel along each side (8 for SVD)."""
        return 2 ** (self.first_stage_model.encoder.num_resolutions - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's downsampling (64 for SVD)."""
        return self.latent_factor * 2 ** (len(self.unet.channel_mult) - 1)

    def denoise_cell(self) -> DenoiseCell:
        """A cell computing D(x; sigma); build it once and reuse it so graph mode compiles once."""
        return DenoiseCell(self.model, self.denoiser.scaling, self.compute_dtype)

    def image_encoder_copies(self) -> dict[str, nn.Cell]:
        """The conditioning-frame embedders' own VAE encoders, by parameter-name prefix, that are not (yet) the first
        stage's. The official single-file checkpoints store the encoder twice, in the first stage and in this
        embedder; diffusers keeps one for both roles."""
        from modules.autoencoder import Encoder

        ours = getattr(self.first_stage_model, "encoder", None)
        copies = {}
        if not isinstance(ours, Encoder):
            return copies
        for i, embedder in enumerate(getattr(self.conditioner, "embedders", [])):
            theirs = getattr(getattr(embedder, "encoder", None), "encoder", None)
            if isinstance(theirs, Encoder) and theirs is not ours:
                copies[f"conditioner.embedders.{i}.encoder.encoder."] = embedder.encoder
        return copies

    def share_image_encoder(self, prefix: str) -> int:
        """Make the embedder's encoder under `prefix` (a key of `image_encoder_copies`) the first stage's: one set of
        weights for both (34 M parameters, 130 MB in float32, fewer for SVD); the embedder's `quant_conv` stays its
        own. For weights that are equal, which `modules.build.build_engine` checks in the checkpoint before loading.
        Returns the number of parameters the copy had."""
        holder = self.image_encoder_copies()[prefix]
        freed = count_params(holder.encoder)
        ours = self.first_stage_model.encoder
        names = [(p, p.name) for p in ours.get_parameters()]
        holder.encoder = ours
        for p, name in names:  # a cell set as an attribute has its parameters renamed; they keep the first stage's
            p.name = name
        return freed

    def decode_first_stage(
        self, z: Tensor, num_frames: int, chunk_size: int | None = None, on_chunk: Callable[[], object] | None = None
    ) -> Tensor:
        """Latents (b t) c h w -> frames (b t) 3 H W in [-1, 1], decoding at most `chunk_size` frames of a clip at once.

        The temporal decoder mixes the frames of one call, so the chunk is also its temporal window. A last chunk
        shorter than the others is fine.
        """
        n = z.shape[0]
        if n % num_frames:
            raise ValueError(f"{n} latents do not split into clips of {num_frames} frames")
        chunk = min(chunk_size or self.en_and_decode_n_samples_a_time or num_frames, num_frames)
        if chunk < 1:
            raise ValueError(f"decode chunk size must be at least 1, got {chunk}")
        z = z / self.scale_factor
        out = []
        for start in range(0, n, num_frames):
            for i in range(start, start + num_frames, chunk):
                j = min(i + chunk, start + num_frames)
                out.append(self.first_stage_model.decode(z[i:j], timesteps=j - i))
                if on_chunk is not None:
                    on_chunk()
        return ops.cat(out, axis=0) if len(out) > 1 else out[0]

    def encode_first_stage(self, x: Tensor, chunk_size: int | None = None, noise: Tensor | None = None) -> Tensor:
        """Frames (N, 3, H, W) in [-1, 1] -> scaled latents: the posterior sample for a given `noise`, else its mode."""
        n = x.shape[0]
        chunk = chunk_size or self.en_and_decode_n_samples_a_time or n
        out = []
        for i in range(0, n, chunk):
            eps = None if noise is None else noise[i : i + chunk]
            out.append(self.first_stage_model.encode(x[i : i + chunk], noise=eps))
        z = ops.cat(out, axis=0) if len(out) > 1 else out[0]
        return z * self.scale_factor


def count_params(cell: nn.Cell) -> int:
    """Number of scalar parameters of a cell (works on lazily built cells)."""
    total = 0
    for p in cell.get_parameters():
        n = 1
        for d in p.shape:
            n *= d
        total += n
    return total
