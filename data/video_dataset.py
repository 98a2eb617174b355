"""The fine-tuning data: clips of videos listed in a CSV, and a sharded, resumable batch loader.

CSV (`metadata`): a header with at least `path,length,motion_bucket_id`; `path` is relative to `data_dir` (absolute
paths work too), `length` is the frame count and `motion_bucket_id` the amount of motion (0-255 in the SVD paper).
Optional columns: `fps` (the video's frame rate; read from the file when absent) and anything else (e.g. `caption`).

A sample is `frames` frames taken every `step` frames from a random start, resized to cover (height, width) and
centre-cropped, in [-1, 1]. Its first frame is the conditioning image; the conditioning copy fed to the VAE gets the
noise augmentation of the original recipe (cond_aug ~ lognormal(-3.0, 0.5) per clip). All randomness of a sample
comes from the generator it is given, which the loader derives from (seed, epoch, row): a resumed run sees the same
clips, crops and noise.
"""

from __future__ import annotations

import concurrent.futures
import csv
import logging
import math
import os
import threading
from typing import Iterator

import numpy as np

from data.video_io import VideoReader, VideoReadError

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "length", "motion_bucket_id")
# keys of a sample and of a batch; scalars are per clip
SAMPLE_KEYS = ("frames", "cond_frames_without_noise", "cond_frames", "fps_id", "motion_bucket_id", "cond_aug")


def resize_center_crop_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, height, width, 3): scale to cover keeping the aspect ratio, then crop the centre."""
    import cv2

    t, h, w, _ = frames.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        frames = np.stack([cv2.resize(f, (nw, nh), interpolation=interp) for f in frames])
    top, left = (nh - height) // 2, (nw - width) // 2
    return frames[:, top : top + height, left : left + width]


class VideoDataset:
    """Clips of the videos listed in `metadata` (see the module docstring).

    Args:
        data_dir: folder the CSV paths are relative to.
        metadata: the CSV file.
        frames: frames per clip.
        step: take every `step`-th frame; the model is told fps_id = video_fps / step - 1.
        height, width: clip size after resize and centre crop (576 x 1024 for SVD).
        cond_aug_mean, cond_aug_std: log-normal parameters of the conditioning-frame noise level.
    """

    def __init__(
        self,
        data_dir: str,
        metadata: str,
        frames: int = 14,
        step: int = 1,
        height: int = 576,
        width: int = 1024,
        cond_aug_mean: float = -3.0,
        cond_aug_std: float = 0.5,
    ):
        if frames < 1 or step < 1:
            raise ValueError(f"frames and step must be at least 1, got frames={frames}, step={step}")
        if height < 1 or width < 1:
            raise ValueError(f"height and width must be positive, got {height}x{width}")
        if not os.path.isdir(data_dir):
            raise ValueError(f"data_dir not found: {data_dir}")
        self.data_dir = data_dir
        self.metadata = metadata
        self.frames = frames
        self.step = step
        self.height = height
        self.width = width
        self.cond_aug_mean = cond_aug_mean
        self.cond_aug_std = cond_aug_std
        self._lock = threading.Lock()
        self.skipped: dict[int, str] = {}  # CSV data row (1 = first after the header) -> reason
        self.rows = self._read_metadata(metadata)
        if not self.rows:
            raise ValueError(f"{metadata}: no usable rows ({len(self.skipped)} skipped)")

    @property
    def span(self) -> int:
        """Frames of the video a clip covers."""
        return (self.frames - 1) * self.step + 1

    def _read_metadata(self, path: str) -> list[dict]:
        if not os.path.isfile(path):
            raise ValueError(f"metadata file not found: {path}")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise ValueError(
                    f"{path}: missing required column(s) {', '.join(missing)} "
                    f"(needs {', '.join(REQUIRED_COLUMNS)}; found {', '.join(columns) or 'no header'})"
                )
            reader.fieldnames = columns
            rows = []
            for number, raw in enumerate(reader, start=1):
                row = self._parse_row(number, raw)
                if row is not None:
                    rows.append(row)
        return rows

    def _parse_row(self, number: int, raw: dict) -> dict | None:
        name = (raw.get("path") or "").strip()
        try:
            length = int(float(raw["length"]))
            motion = float(raw["motion_bucket_id"])
        except (TypeError, ValueError):
            self.skip(number, name, f"length {raw.get('length')!r} or motion_bucket_id "
                      f"{raw.get('motion_bucket_id')!r} is not a number")  # fmt: skip
            return None
        if not name:
            self.skip(number, name, "empty path")
            return None
        if length < self.span:
            self.skip(number, name, f"too short: {length} frames, a clip of {self.frames} every {self.step} needs "
                      f"{self.span}")  # fmt: skip
            return None
        fps = None
        try:
            fps = float(raw["fps"]) if raw.get("fps") not in (None, "") else None
        except ValueError:
            pass
        if fps is not None and not (math.isfinite(fps) and fps > 0):
            fps = None
        return {"number": number, "path": os.path.join(self.data_dir, name), "motion_bucket_id": motion, "fps": fps}

    def skip(self, number: int, name: str, reason: str) -> None:
        """Record a skipped row and warn, once per row."""
        with self._lock:
            if number in self.skipped:
                return
            self.skipped[number] = reason
        logger.warning("%s row %d (%s) skipped: %s", os.path.basename(self.metadata), number, name, reason)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.get(index, np.random.default_rng(index))

    def get(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One clip of row `index`; raises VideoReadError if the video is missing, unreadable or too short.

        frames (T, 3, H, W) and cond_frames_without_noise / cond_frames (3, H, W) float32 in [-1, 1] (cond_frames
        noised); fps_id, motion_bucket_id, cond_aug float32 scalars.
        """
        row = self.rows[index]
        reader = VideoReader(row["path"])
        n = len(reader)
        if n < self.span:
            raise VideoReadError(f"{row['path']}: {n} frames, a clip of {self.frames} every {self.step} needs "
                                 f"{self.span}")  # fmt: skip
        start = int(rng.integers(0, n - self.span + 1))
        clip = reader.get(range(start, start + self.span, self.step))
        fps = row["fps"] or reader.fps
        clip = resize_center_crop_frames(clip, self.height, self.width)
        x = clip.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0  # t h w c -> t c h w
        cond_aug = np.float32(rng.lognormal(self.cond_aug_mean, self.cond_aug_std))
        first = x[0]
        noised = first + cond_aug * rng.standard_normal(first.shape, dtype=np.float32)
        return {
            "frames": x,
            "cond_frames_without_noise": first.copy(),
            "cond_frames": noised.astype(np.float32),
            "fps_id": np.float32(fps / self.step - 1.0),
            "motion_bucket_id": np.float32(row["motion_bucket_id"]),
            "cond_aug": cond_aug,
        }


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack samples: frames (B, T, 3, H, W), conditioning images (B, 3, H, W), scalars (B,)."""
    return {k: np.stack([s[k] for s in samples]) for k in SAMPLE_KEYS}


class ClipLoader:
    """Batches of one rank's shard, in an order fixed by (seed, epoch), with every sample's randomness fixed by
    (seed, epoch, row).

    Each epoch permutes all rows with the same generator on every rank; rank r takes every `world`-th row from r,
    cut to the same count on every rank, so all ranks run the same number of steps. Batch k of an epoch depends only
    on (seed, epoch, k): `epoch(e, start=k)` resumes mid-epoch exactly. A row that fails to load is skipped (one
    warning, counted by the dataset) and the next row of the shard takes its place. Samples are loaded ahead by
    `num_workers` threads.
    """

    def __init__(
        self,
        dataset: VideoDataset,
        batch_size: int = 1,
        shuffle: bool = True,
        drop_remainder: bool = True,
        num_workers: int = 2,
        seed: int = 42,
        rank: int = 0,
        world: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        per_rank = len(dataset) // world
        if per_rank < 1 or (drop_remainder and per_rank < batch_size):
            raise ValueError(
                f"{len(dataset)} usable videos cannot fill a batch of {batch_size} on each of {world} rank(s)"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self.num_workers = max(0, num_workers)
        self.seed = seed
        self.rank = rank
        self.world = world
        self.per_rank = per_rank

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_remainder:
            return self.per_rank // self.batch_size
        return -(-self.per_rank // self.batch_size)

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's rows for `epoch`."""
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, 0, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return order[self.rank : self.per_rank * self.world : self.world]

    def _load(self, shard: np.ndarray, epoch: int, pos: int) -> dict[str, np.ndarray]:
        """The sample at shard position `pos`, or the first loadable one after it (wrapping around)."""
        for k in range(len(shard)):
            index = int(shard[(pos + k) % len(shard)])
            row = self.dataset.rows[index]
            if row["number"] in self.dataset.skipped:
                continue
            try:
                return self.dataset.get(index, np.random.default_rng([self.seed, 1, epoch, index]))
            except (VideoReadError, OSError, ValueError) as e:
                reason = str(e).split(": ", 1)[-1] if str(e).startswith(row["path"]) else str(e)
                self.dataset.skip(row["number"], os.path.relpath(row["path"], self.dataset.data_dir), reason)
        raise RuntimeError(f"rank {self.rank}: none of the {len(shard)} videos of this shard can be read")

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The batches of `epoch` from batch `start` on."""
        shard = self.shard(epoch)
        b = self.batch_size
        batches = [[(i * b + j) % len(shard) for j in range(b)] for i in range(start, len(self))]
        if self.num_workers == 0:
            for positions in batches:
                yield collate([self._load(shard, epoch, p) for p in positions])
            return
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            ahead = max(2, self.num_workers)
            pending = []
            for positions in batches:
                pending.append([pool.submit(self._load, shard, epoch, p) for p in positions])
                if len(pending) > ahead:
                    yield collate([f.result() for f in pending.pop(0)])
            for futures in pending:
                yield collate([f.result() for f in futures])
