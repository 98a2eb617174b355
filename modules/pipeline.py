"""Image-to-video generation: the Python API behind image_to_video.py.

```
from modules.pipeline import SVDPipeline, export_to_video, load_image, resize_center_crop

pipe = SVDPipeline.from_config("configs/svd_xt.yaml", "svd_xt.safetensors")
image = resize_center_crop(load_image("rocket.png"), 1024, 576)
video = pipe(image, seed=42, decode_chunk_size=8).frames[0]  # (T, H, W, 3) uint8
export_to_video(video, "rocket.mp4", fps=7)
```
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from mindspore import Tensor, ops
from tqdm.auto import tqdm

from data.image_io import fit_to_multiple, load_image, resize_center_crop  # noqa: F401  (part of the API)
from data.video_io import write_gif as export_to_gif  # noqa: F401
from data.video_io import write_mp4 as export_to_video  # noqa: F401
from modules import kernels
from modules.amp import apply_amp
from modules.build import build_engine
from modules.conditioner import scalar_batch
from modules.diffusion.guiders import LinearPredictionGuider
from modules.memory import peak_memory_mb
from modules.offload import ModelOffload

# callback(step, num_steps, sigma, latents (b t) 4 h w)
StepCallback = Callable[[int, int, float, np.ndarray], None]


@dataclass
class SVDOutput:
    """frames: (videos, T, H, W, 3) uint8, (videos, T, H, W, 3) float in [0, 1], or latents (videos, T, 4, h, w).

    timings: seconds per stage (conditioning, sampling, decoding); stage_peak_mb: the process's peak memory at the
    end of each stage (a running maximum, so the first stage whose value jumps is the one that set the peak)."""

    frames: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float = 0.0
    stage_peak_mb: dict[str, float] = field(default_factory=dict)


def image_to_tensor(image) -> np.ndarray:
    """A PIL image, an (H, W, 3) uint8 array or a (1|-, 3, H, W) float array in [-1, 1] -> (1, 3, H, W) float32."""
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"a uint8 image must be (H, W, 3), got {arr.shape}")
        return (arr.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]
    arr = arr.astype(np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[:2] != (1, 3):
        raise ValueError(f"a float image must be (3, H, W) or (1, 3, H, W) in [-1, 1], got {arr.shape}")
    return arr


class SVDPipeline:
    """Stable Video Diffusion image-to-video sampling over a built engine.

    Build once (`from_config`), then call with an image. Randomness comes from one numpy Generator: the
    conditioning-frame noise is drawn first, then the initial latents, so a seed reproduces a video exactly.
    """

    def __init__(
        self,
        engine,
        num_frames: int | None = None,
        amp_level: str = "O0",
        amp_dtype: str = "fp16",
        verbose: bool = True,
    ):
        if engine.sampler is None:
            raise ValueError("the model config has no sampler_config")
        apply_amp(engine, amp_level, amp_dtype)
        self.engine = engine
        self.num_frames = num_frames or getattr(engine, "num_frames", 14)
        self.verbose = verbose
        self.denoise = engine.denoise_cell()
        self.denoise.set_train(False)
        self.engine.set_train(False)
        self.offload: ModelOffload | None = None

    @classmethod
    def from_config(cls, config: str, checkpoint: str | None = None, strict: bool = True, **kwargs) -> SVDPipeline:
        """Build from a model YAML and a checkpoint: MindSpore .ckpt, official .safetensors, or a diffusers folder."""
        return cls(build_engine(config, checkpoint, strict=strict), **kwargs)

    def enable_forward_chunking(self, chunk_size: int | None = None, dim: int = 0) -> None:
        """Run the UNet's feed-forward layers in chunks (less peak memory, same result)."""
        self.engine.unet.enable_forward_chunking(chunk_size, dim)

    def disable_forward_chunking(self) -> None:
        self.engine.unet.disable_forward_chunking()

    def enable_model_offload(self, folder: str | None = None) -> None:
        """Hold only the running part's weights: the conditioner, then the UNet, then the VAE (PyNative mode).

        The others wait in .npy files in `folder` (default: a temporary folder, removed with the pipeline). The
        peak memory of a generation falls from all the weights together to about the UNet's plus its activations;
        each generation reads the parts back from the files. See modules.offload.
        """
        if self.offload is None:
            engine = self.engine
            parts = {"conditioner": engine.conditioner, "unet": engine.model, "vae": engine.first_stage_model}
            self.offload = ModelOffload(parts, folder)

    def disable_model_offload(self) -> None:
        """Every part back in memory."""
        if self.offload is not None:
            self.offload.restore()
            self.offload = None

    def _use(self, part: str) -> None:
        if self.offload is not None:
            self.offload.use(part)

    def _denoise_fn(self, num_frames: int):
        def fn(x: Tensor, sigma: Tensor, cond: dict) -> Tensor:
            return self.denoise(x, sigma, cond["concat"], cond["crossattn"], cond["vector"], num_frames)

        return fn

    def __call__(
        self,
        image,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        min_guidance_scale: float | None = None,
        max_guidance_scale: float | None = None,
        fps: int = 7,
        motion_bucket_id: int = 127,
        noise_aug_strength: float = 0.02,
        decode_chunk_size: int | None = None,
        num_videos_per_prompt: int = 1,
        seed: int | None = None,
        generator: np.random.Generator | None = None,
        latents: np.ndarray | None = None,
        image_noise: np.ndarray | None = None,
        output_type: str = "uint8",
        callback: StepCallback | None = None,
    ) -> SVDOutput:
        """Generate `num_videos_per_prompt` videos from one image.

        Args:
            image: PIL image, (H, W, 3) uint8 array, or (1, 3, H, W) float array in [-1, 1]; H and W multiples of
                `engine.size_multiple` (64 for SVD; data.image_io resizes to fit).
            num_frames: frames per video (default: the config's, 14 for SVD and 25 for SVD-XT).
            num_inference_steps: Euler steps (default: the config's sampler, 25).
            min_guidance_scale, max_guidance_scale: the per-frame guidance ramp, first to last frame (default: config).
            fps: frames per second of the result; the model is conditioned on fps - 1, as in the original.
            motion_bucket_id: amount of motion, 0-255 in training (127 default).
            noise_aug_strength: std of the noise added to the conditioning frame; also fed to the model (cond_aug).
            decode_chunk_size: frames decoded per VAE call, 1..num_frames (default all); smaller uses less memory.
            seed / generator: randomness; `generator` (numpy) wins over `seed`.
            latents: optional initial noise, (videos * T, 4, H/8, W/8), standard normal (the sampler scales it).
            image_noise: optional standard-normal noise for the conditioning-frame augmentation, (1, 3, H, W).
            output_type: "uint8", "np" (float32 in [0, 1]) or "latent".
            callback: called after every step with (step, num_steps, sigma, latents).
        """
        engine = self.engine
        t = num_frames or self.num_frames
        if t < 1:
            raise ValueError(f"num_frames must be at least 1, got {t}")
        if decode_chunk_size is not None and not 1 <= decode_chunk_size <= t:
            raise ValueError(f"decode_chunk_size must be between 1 and num_frames ({t}), got {decode_chunk_size}")
        if output_type not in ("uint8", "np", "latent"):
            raise ValueError(f"output_type must be 'uint8', 'np' or 'latent', got {output_type!r}")
        rng = generator or np.random.default_rng(seed)
        img = image_to_tensor(image)
        _, _, h, w = img.shape
        unit = engine.size_multiple
        if h % unit or w % unit:
            raise ValueError(f"image height and width must be multiples of {unit} for this model, got {h}x{w}")
        b = num_videos_per_prompt
        timings, peaks = {}, {}

        start = time.perf_counter()
        self._use("conditioner")
        if image_noise is None:
            image_noise = rng.standard_normal(img.shape).astype(np.float32)
        batch = {
            "cond_frames_without_noise": Tensor(img),
            "cond_frames": Tensor(img + noise_aug_strength * image_noise),
            **scalar_batch(
                {"fps_id": fps - 1, "motion_bucket_id": motion_bucket_id, "cond_aug": noise_aug_strength}, t
            ),
        }
        c, uc = engine.conditioner.get_unconditional_conditioning(
            batch, force_uc_zero_embeddings=["cond_frames", "cond_frames_without_noise"]
        )
        cond, ucond = {}, {}
        for src, dst in ((c, cond), (uc, ucond)):
            for k in ("crossattn", "concat"):
                dst[k] = ops.tile(ops.repeat_interleave(src[k], t, 0), (b,) + (1,) * (src[k].ndim - 1))
            dst["vector"] = ops.tile(src["vector"], (b, 1))
        timings["conditioning"] = time.perf_counter() - start
        peaks["conditioning"] = peak_memory_mb()

        start = time.perf_counter()
        self._use("unet")
        channels = engine.unet.out_channels
        f = engine.latent_factor
        shape = (b * t, channels, h // f, w // f)
        if latents is None:
            latents = rng.standard_normal(shape).astype(np.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        sampler = engine.sampler
        guider = sampler.guider
        if min_guidance_scale is not None or max_guidance_scale is not None:
            sampler.guider = LinearPredictionGuider(
                max_scale=max_guidance_scale if max_guidance_scale is not None else guider.max_scale,
                min_scale=min_guidance_scale if min_guidance_scale is not None else guider.min_scale,
            )
        steps = num_inference_steps or sampler.num_steps
        bar = tqdm(total=steps, desc="sampling", disable=not self.verbose)

        def on_step(i, n, sigma, x, denoised):
            bar.update(1)
            if callback is not None:
                callback(i, n, sigma, x.asnumpy())

        try:
            z = sampler(
                self._denoise_fn(t), Tensor(latents), cond, ucond, t, num_steps=steps, callback=on_step, rng=rng
            )
        finally:
            sampler.guider = guider
            bar.close()
            kernels.release_conv_memory()  # the decoder's convolutions are of other sizes
        timings["sampling"] = time.perf_counter() - start
        peaks["sampling"] = peak_memory_mb()

        if output_type == "latent":
            return SVDOutput(z.asnumpy().reshape((b, t) + shape[1:]), timings, peaks["sampling"], peaks)
        start = time.perf_counter()
        self._use("vae")
        try:
            frames = self.decode(z, t, decode_chunk_size)
        finally:
            kernels.release_conv_memory()
        timings["decoding"] = time.perf_counter() - start
        peaks["decoding"] = peak_memory_mb()
        frames = frames.reshape((b, t) + frames.shape[1:]).transpose(0, 1, 3, 4, 2)
        frames = np.clip((frames + 1.0) / 2.0, 0.0, 1.0)
        if output_type == "uint8":
            frames = np.round(frames * 255.0).astype(np.uint8)
        return SVDOutput(frames, timings, peak_memory_mb(), peaks)

    def decode(self, z: Tensor, num_frames: int, chunk_size: int | None = None) -> np.ndarray:
        """Latents (b t) 4 h w -> frames (b t) 3 H W in about [-1, 1], with a progress bar over chunks."""
        chunk = min(chunk_size or num_frames, num_frames)
        n_chunks = (z.shape[0] // num_frames) * -(-num_frames // chunk)
        with tqdm(total=n_chunks, desc="decoding", disable=not self.verbose) as bar:
            frames = self.engine.decode_first_stage(z, num_frames, chunk, on_chunk=bar.update)
        return frames.asnumpy().astype(np.float32)
