"""Generate videos from images with Stable Video Diffusion.

    python image_to_video.py --SVD.config=configs/svd_xt.yaml --SVD.checkpoint=svd_xt.safetensors --image=rocket.png

`--image` takes a file, a folder of images, or a list (`--image=[a.png,b.png]`). Each video is written as
`<output_dir>/<image>_<seed>.mp4` (or .gif, or a folder of PNG frames) with a JSON sidecar that records every
setting, the seed and the checkpoint; `--reproduce=<sidecar>.json` makes the same video again.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Literal, Optional, Union

import mindspore as ms  # before anything that may import decord
from jsonargparse import ActionConfigFile, ArgumentParser

from data.image_io import ImageError, fit_to_multiple, list_images, load_image, resize_center_crop
from data.video_io import write_video
from modules.convert.sources import CheckpointError
from modules.env import init_env

logger = logging.getLogger("image_to_video")


@dataclass
class SVD:
    """Model, sampling and memory settings."""

    config: str
    """Model config, e.g. configs/svd.yaml (14 frames) or configs/svd_xt.yaml (25 frames)."""
    checkpoint: Optional[str] = None
    """Weights: a MindSpore .ckpt, the official .safetensors (converted on the fly) or a diffusers folder.
    Without one the model has random weights and makes noise."""
    num_frames: Optional[int] = None
    """Frames per video; default from the config (14 for SVD, 25 for SVD-XT)."""
    fps: int = 7
    """Frames per second of the video; the model is conditioned on fps - 1, as in the original."""
    motion_bucket_id: int = 127
    """Amount of motion (0-255 in training); higher moves more."""
    noise_aug_strength: float = 0.02
    """Noise added to the conditioning image; more noise, less resemblance and more motion."""
    decode_chunk_size: Optional[int] = None
    """Frames decoded per VAE call, 1..num_frames (default: all). Lower uses less memory; 1 may flicker."""
    sampling_steps: Optional[int] = None
    """Euler steps; default from the config (25)."""
    min_guidance_scale: Optional[float] = None
    """Guidance at the first frame; default from the config (1.0 SVD, 1.5 SVD-XT)."""
    max_guidance_scale: Optional[float] = None
    """Guidance at the last frame; default from the config (2.5 SVD, 3.0 SVD-XT)."""
    amp_level: Literal["O0", "O2"] = "O0"
    """O0: float32 everywhere. O2: the UNet in half precision, normalisations, softmax, VAE and CLIP in float32."""
    amp_dtype: Literal["fp16", "bf16"] = "fp16"
    """Half-precision type for O2 (bf16 needs a GPU or Ascend)."""
    forward_chunk_size: Optional[int] = None
    """Run the UNet's feed-forward layers in chunks of this many rows (less memory, same result)."""
    model_offload: bool = False
    """Hold only the running part's weights (conditioner, UNet, VAE), the others in temporary files: a peak of
    about the UNet's weights instead of all of them. PyNative mode (--mode=1) only."""
    num_videos: int = 1
    """Videos per image; video k uses seed + k."""
    width: Optional[int] = None
    """With height: resize to cover and centre-crop to width x height (multiples of 64, e.g. 1024x576)."""
    height: Optional[int] = None
    """With width: see width. Without either, each side is resized down to a multiple of 64."""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], env_prefix="SVD", default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML or JSON file holding any of these flags")
    parser.add_argument("--reproduce", type=Optional[str], default=None, help="a video's sidecar: make it again")
    parser.add_argument("--mode", type=int, default=1, help="0: graph mode (compiles first), 1: PyNative")
    parser.add_argument("--device_target", type=Optional[str], default=None, help="CPU, GPU or Ascend; auto if unset")
    parser.add_argument("--seed", type=int, default=42, help="random seed")
    parser.add_argument("--image", type=Union[str, List[str]], required=True, help="an image, a folder or a list")
    parser.add_argument("--output_dir", type=str, default="output", help="where videos and sidecars go")
    parser.add_argument(
        "--output_format", type=Literal["mp4", "gif", "frames"], default="mp4", help="H.264 mp4, gif or PNG frames"
    )
    parser.add_class_arguments(SVD, "SVD")
    return parser


def check_settings(svd: SVD, num_frames: int, size_multiple: int) -> None:
    """Errors for impossible settings, warnings for unusual ones."""
    if num_frames < 1:
        raise ValueError(f"--SVD.num_frames must be at least 1, got {num_frames}")
    if svd.decode_chunk_size is not None and not 1 <= svd.decode_chunk_size <= num_frames:
        raise ValueError(
            f"--SVD.decode_chunk_size must be between 1 and num_frames ({num_frames}), got {svd.decode_chunk_size}"
        )
    if svd.sampling_steps is not None and svd.sampling_steps < 1:
        raise ValueError(f"--SVD.sampling_steps must be at least 1, got {svd.sampling_steps}")
    if svd.num_videos < 1:
        raise ValueError(f"--SVD.num_videos must be at least 1, got {svd.num_videos}")
    if (svd.width is None) != (svd.height is None):
        raise ValueError("--SVD.width and --SVD.height go together")
    if svd.width is not None and (svd.width % size_multiple or svd.height % size_multiple or svd.width < 1):
        raise ValueError(f"--SVD.width and --SVD.height must be positive multiples of {size_multiple}")
    if not 5 <= svd.fps <= 30:
        logger.warning("fps %d is outside 5-30, the range the model was trained on", svd.fps)
    if svd.motion_bucket_id > 255 or svd.motion_bucket_id < 0:
        logger.warning("motion_bucket_id %d is outside 0-255, the range the model was trained on", svd.motion_bucket_id)


def prepare(path: str, svd: SVD, multiple: int):
    image = load_image(path)
    if svd.width is not None:
        return resize_center_crop(image, svd.width, svd.height)
    image, resized = fit_to_multiple(image, multiple, min_size=multiple)
    if resized:
        logger.warning("%s resized to %dx%d (sides must be multiples of %d)", path, *image.size, multiple)
    return image


def output_path(output_dir: str, image_path: str, seed: int, fmt: str) -> str:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    base = os.path.join(output_dir, f"{stem}_{seed}")
    path, k = base, 1
    while os.path.exists(path + ("" if fmt == "frames" else f".{fmt}")):  # never overwrite an earlier video
        path, k = f"{base}-{k}", k + 1
    return path + ("" if fmt == "frames" else f".{fmt}")


def reproduce_argv(argv: list[str]) -> list[str]:
    """`--reproduce=SIDECAR.json [more flags]` -> the recorded settings as a config string, then the other flags."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--reproduce" or a.startswith("--reproduce="):
            path = a.split("=", 1)[1] if "=" in a else argv[i + 1]
            i += 1 if "=" in a else 2
            try:
                with open(path) as f:
                    out = ["--config", json.dumps(json.load(f)["args"])] + out
            except (OSError, KeyError, json.JSONDecodeError) as e:
                raise SystemExit(f"error: {path} is not a sidecar of this script ({e})") from e
        else:
            out.append(a)
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(reproduce_argv(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    svd: SVD = args.SVD if isinstance(args.SVD, SVD) else SVD(**vars(args.SVD))
    try:
        images = list_images([args.image] if isinstance(args.image, str) else list(args.image))
        for p in images:  # fail before the (slow) model build
            load_image(p)
        if svd.model_offload and args.mode != 1:
            raise ValueError("--SVD.model_offload needs PyNative mode (--mode=1): a compiled graph keeps its weights")
        init_env(mode=args.mode, device_target=args.device_target, seed=args.seed)
        from modules.build import build_engine  # heavy imports after the argument checks
        from modules.config import load_config
        from modules.pipeline import SVDPipeline

        cfg = load_config(svd.config)
        engine = build_engine(cfg, svd.checkpoint)
        if svd.checkpoint is None:
            logger.warning("no --SVD.checkpoint: random weights, the video will be noise")
        num_frames = svd.num_frames if svd.num_frames is not None else engine.num_frames
        multiple = engine.size_multiple if svd.width is not None else max(64, engine.size_multiple)
        check_settings(svd, num_frames, engine.size_multiple)
        prepared = [(p, prepare(p, svd, multiple)) for p in images]
        pipe = SVDPipeline(engine, num_frames, amp_level=svd.amp_level, amp_dtype=svd.amp_dtype)
        if svd.forward_chunk_size:
            pipe.enable_forward_chunking(svd.forward_chunk_size)
        if svd.model_offload:
            pipe.enable_model_offload()
    except (ImageError, CheckpointError, ValueError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    os.makedirs(args.output_dir, exist_ok=True)
    for path, image in prepared:
        for k in range(svd.num_videos):
            seed = args.seed + k
            start = time.perf_counter()
            out = pipe(
                image,
                num_frames=num_frames,
                num_inference_steps=svd.sampling_steps,
                min_guidance_scale=svd.min_guidance_scale,
                max_guidance_scale=svd.max_guidance_scale,
                fps=svd.fps,
                motion_bucket_id=svd.motion_bucket_id,
                noise_aug_strength=svd.noise_aug_strength,
                decode_chunk_size=svd.decode_chunk_size,
                seed=seed,
            )
            target = output_path(args.output_dir, path, seed, args.output_format)
            write_video(out.frames[0], target, svd.fps, args.output_format)
            # the exact arguments of this one video (--reproduce reads them back)
            one = {**json.loads(parser.dump(args, format="json")), "seed": seed, "image": path}
            one["SVD"] = {**asdict(svd), "num_videos": 1}
            for key in ("config", "reproduce"):
                one.pop(key, None)
            sidecar = {
                "video": target,
                "image": os.path.abspath(path),
                "seed": seed,
                "checkpoint": os.path.abspath(svd.checkpoint) if svd.checkpoint else None,
                "num_frames": num_frames,
                "size": list(image.size),
                "args": one,
                "timings_s": {k: round(v, 3) for k, v in out.timings.items()},
                "peak_memory_mb": round(out.peak_memory_mb, 1),
                "mindspore": ms.__version__,
                "device": ms.get_context("device_target"),
            }
            side = (target if args.output_format == "frames" else os.path.splitext(target)[0]) + ".json"
            with open(side + ".partial", "w") as f:
                json.dump(sidecar, f, indent=2)
            os.replace(side + ".partial", side)
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in out.timings.items())
            print(
                f"{target}: {num_frames} frames {image.size[0]}x{image.size[1]} | {stages} | "
                f"total {time.perf_counter() - start:.1f} s | peak memory {out.peak_memory_mb:.0f} MiB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
