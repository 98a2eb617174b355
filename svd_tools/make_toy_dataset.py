"""Write the toy world as a video dataset: short clips of moving shapes (svd_tools/toy_world.py) as H.264 files,
their training CSV from svd_tools/prepare_dataset.py (so motion buckets come from measured optical flow, not from
the generator), and a few held-out first frames to test generation on.

    python svd_tools/make_toy_dataset.py --out DIR [--videos 600] [--frames 16] [--size 64] [--fps 8]

DIR/videos/*.mp4, DIR/videos.csv, DIR/heldout/<seed>.png (first frames of seeds never used for training).
"""

from __future__ import annotations

import argparse
import os
import sys

from PIL import Image

from data.video_io import write_mp4
from svd_tools import prepare_dataset
from svd_tools.toy_world import CLIP_FRAMES, render_clip

HELDOUT_SEED = 1_000_000  # training clips use seeds 0..videos-1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--videos", type=int, default=600)
    p.add_argument("--frames", type=int, default=CLIP_FRAMES, help=f"at most {CLIP_FRAMES}")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--heldout", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="for the motion measurement (0: in this process)")
    args = p.parse_args(argv)
    if not 2 <= args.frames <= CLIP_FRAMES:
        p.error(f"--frames must be in 2..{CLIP_FRAMES} (shapes are placed to stay inside for {CLIP_FRAMES} frames)")

    video_dir = os.path.join(args.out, "videos")
    os.makedirs(video_dir, exist_ok=True)
    for seed in range(args.videos):
        path = os.path.join(video_dir, f"{seed:05d}.mp4")
        if not os.path.exists(path):
            frames, _ = render_clip(seed, args.frames, args.size)
            write_mp4(frames, path, args.fps)
    held = os.path.join(args.out, "heldout")
    os.makedirs(held, exist_ok=True)
    for k in range(args.heldout):
        frames, speed = render_clip(HELDOUT_SEED + k, 1, args.size, speed=1.5)
        Image.fromarray(frames[0]).save(os.path.join(held, f"{HELDOUT_SEED + k}.png"))
    csv = os.path.join(args.out, "videos.csv")
    return prepare_dataset.main(
        ["--videos", video_dir, "--out", csv, "--fit", "power", "--workers", str(args.workers), "--no_progress"]
    )


if __name__ == "__main__":
    sys.exit(main())
