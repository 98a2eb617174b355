"""What a model trained on the toy world should do, measured on generated videos:

- the first frame keeps the conditioning image (PSNR in dB);
- the shapes move rather than dissolve: in every frame the bright shape pixels form as many blobs as in the
  conditioning image, of about the same total area;
- motion grows with motion_bucket_id: the mean Farneback optical-flow magnitude between consecutive frames, and how
  far the shape's centre moved from the first frame to the last (`shape_shift`, which the background's flicker does
  not enter).

    python svd_tools/toy_eval.py --checkpoint assets/toy/svd_toy.ckpt --images output/toy/data/heldout

A toy shape's brightest channel is at least 210 and every background channel stays below 100
(svd_tools/toy_world.py), so a threshold on the brightest channel separates them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

SHAPE_THRESHOLD = 140  # halfway between a shape's brightest channel (210 or more) and any background one (70 or less)
MIN_BLOB = 6  # pixels; smaller specks do not count as blobs


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB of two images whose values span `peak` (255 for uint8, 2 for [-1, 1])."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(peak**2 / max(mse, 1e-12 * peak**2)))


def shape_mask(frame: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of an (H, W, 3) uint8 frame bright enough to belong to a shape."""
    return frame.max(axis=2) > SHAPE_THRESHOLD


def blobs(frame: np.ndarray) -> tuple[int, int]:
    """(number of shape blobs of at least MIN_BLOB pixels, their total area) of an (H, W, 3) uint8 frame."""
    import cv2

    mask = shape_mask(frame).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    big = areas[areas >= MIN_BLOB]
    return int(len(big)), int(big.sum())


def mean_flow(video: np.ndarray) -> float:
    """Mean Farneback flow magnitude (pixels per frame) over the consecutive frame pairs of (T, H, W, 3) uint8."""
    import cv2

    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in video]
    mags = []
    for a, b in zip(gray[:-1], gray[1:]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 2, 9, 3, 5, 1.1, 0)
        mags.append(np.linalg.norm(flow, axis=2).mean())
    return float(np.mean(mags))


def shape_shift(video: np.ndarray) -> tuple[float, float]:
    """(dy, dx) in pixels: how far the centre of the bright shape pixels moved from the first frame to the last."""
    centres = []
    for f in (video[0], video[-1]):
        ys, xs = np.nonzero(shape_mask(f))
        centres.append((ys.mean(), xs.mean()) if len(ys) else (np.nan, np.nan))
    return float(centres[1][0] - centres[0][0]), float(centres[1][1] - centres[0][1])


def video_metrics(video: np.ndarray, image: np.ndarray) -> dict:
    """The metrics of one generated video (T, H, W, 3) against its conditioning image (H, W, 3)."""
    n0, area0 = blobs(image)
    per_frame = [blobs(f) for f in video]
    ratios = [a / area0 if area0 else float("nan") for _, a in per_frame]
    return {
        "first_frame_psnr": psnr(video[0], image),
        "blobs_expected": n0,
        "blobs_per_frame": [n for n, _ in per_frame],
        "area_ratio_min": float(np.min(ratios)),
        "area_ratio_max": float(np.max(ratios)),
        "flow": mean_flow(video),
        "shift": shape_shift(video),
    }


def evaluate(pipe, images: list[np.ndarray], buckets: list[int], seeds: list[int], **call) -> dict:
    """Generate one video per (image, bucket, seed) and summarise: the worst PSNR and area ratios, whether every
    frame kept its blobs, and the mean flow per bucket."""
    rows = []
    for i, image in enumerate(images):
        for bucket in buckets:
            for seed in seeds:
                video = pipe(image, motion_bucket_id=bucket, seed=seed, **call).frames[0]
                rows.append({"image": i, "bucket": bucket, "seed": seed, **video_metrics(video, image)})
    flow = {b: float(np.mean([r["flow"] for r in rows if r["bucket"] == b])) for b in buckets}
    shift = {b: float(np.mean([np.hypot(*r["shift"]) for r in rows if r["bucket"] == b])) for b in buckets}
    return {
        "videos": rows,
        "min_first_frame_psnr": min(r["first_frame_psnr"] for r in rows),
        "blobs_kept": all(all(n == r["blobs_expected"] for n in r["blobs_per_frame"]) for r in rows),
        "area_ratio_range": [min(r["area_ratio_min"] for r in rows), max(r["area_ratio_max"] for r in rows)],
        "flow_by_bucket": flow,
        "shape_shift_by_bucket": shift,
        "flow_increases": all(flow[a] < flow[b] for a, b in zip(buckets[:-1], buckets[1:])),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/toy/svd_toy.yaml")
    p.add_argument("--checkpoint", default="assets/toy/svd_toy.ckpt")
    p.add_argument("--images", required=True, help="a folder of conditioning images (held out from training)")
    p.add_argument("--buckets", type=int, nargs="+", default=[10, 120, 230])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--fps", type=int, default=8, help="the frame rate the model was trained on (the toy clips': 8)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the config's)")
    p.add_argument("--min_guidance_scale", type=float, default=None, help="default: the config's")
    p.add_argument("--max_guidance_scale", type=float, default=None, help="default: the config's")
    p.add_argument("--noise_aug_strength", type=float, default=None, help="default: the pipeline's")
    p.add_argument("--mode", type=int, default=1)
    p.add_argument("--out", help="write the full report as JSON here")
    args = p.parse_args(argv)

    from data.image_io import load_image
    from modules.env import init_env
    from modules.pipeline import SVDPipeline

    init_env(mode=args.mode, seed=0)
    pipe = SVDPipeline.from_config(args.config, args.checkpoint, verbose=False)
    names = sorted(n for n in os.listdir(args.images) if n.lower().endswith(".png"))
    images = [np.asarray(load_image(os.path.join(args.images, n))) for n in names]
    given = dict(
        num_inference_steps=args.steps,
        min_guidance_scale=args.min_guidance_scale,
        max_guidance_scale=args.max_guidance_scale,
        noise_aug_strength=args.noise_aug_strength,
    )
    sampling = {k: v for k, v in given.items() if v is not None}  # the rest keep the pipeline's defaults
    report = evaluate(pipe, images, args.buckets, args.seeds, fps=args.fps, **sampling)
    summary = {k: v for k, v in report.items() if k != "videos"}
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
