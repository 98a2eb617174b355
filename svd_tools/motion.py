"""Motion score of a video and its mapping to SVD's `motion_bucket_id` (0..255).

Motion score (after the SVD paper, Appendix C: dense optical flow at 2 fps, mean flow magnitude):

1. Sample frames at `sample_fps` (2): timestamps 0, 1/2 s, 1 s, ... while inside the video, each taken as the frame
   nearest to it (`round(t * fps)`). A video whose fps is below `sample_fps` uses every frame; a video shorter than one
   sampling step uses its first and last frames.
2. Resize every sampled frame so that its shorter side is `flow_size` pixels (128 by default; aspect kept; area
   interpolation when shrinking, bilinear when enlarging) and convert it to grey.
3. OpenCV Farneback dense flow between consecutive samples (pyr_scale 0.5, levels 3, winsize 15, iterations 3,
   poly_n 5, poly_sigma 1.2).
4. Per pair: the mean over pixels of the flow *magnitude* |(dx, dy)| (not of the signed vectors, which cancel out).
5. Unit: the magnitude is divided by the shorter side (`flow_size`) and by the time between the two frames, so the
   score is the mean displacement of the picture in **percent of the frame's shorter side per second**. Neither the
   video's resolution nor its frame rate changes the score (up to how well the flow follows the motion).
6. The clip's score is the mean over pairs.

A still picture scores about 0; a camera pan that crosses the shorter side in 10 s scores 10.

Bucket mapping: the paper does not say how a score becomes a bucket. Two monotonic (non-decreasing) maps are offered:

* `PowerMap(score_max, gamma)`: `bucket = clip(round(255 * (score / score_max) ** gamma), bucket_min, bucket_max)`.
  The defaults (score_max 40, gamma 0.5: 10 %/s -> bucket 128) are a guess, not a calibration against the released
  weights (none is published).
* `QuantileMap`: piecewise-linear through the score quantiles of a dataset, so that the buckets of that dataset are
  spread evenly over [bucket_min, bucket_max] (`fit_quantiles`). `fit_power` instead fits `PowerMap` so that the
  median score lands on a chosen bucket (127 by default) and the 99th percentile on 255.

Both serialise to a small dict (`to_dict` / `map_from_dict`) so a mapping fitted on one dataset can be reused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence, Union

import numpy as np

from data.video_io import VideoReader, VideoReadError

FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
SCORE_UNIT = "percent of the frame's shorter side per second"
READ_CHUNK = 8  # sampled frames decoded per call, to bound memory on long high-resolution videos


@dataclass(frozen=True)
class ScoreSettings:
    """How a score was measured; scores measured with different settings are not comparable."""

    sample_fps: float = 2.0
    flow_size: int = 128

    def validate(self) -> ScoreSettings:
        if not self.sample_fps > 0:
            raise ValueError(f"sample_fps must be > 0, got {self.sample_fps}")
        if self.flow_size < 16:
            raise ValueError(f"flow_size must be at least 16 pixels, got {self.flow_size}")
        return self

    def to_dict(self) -> dict:
        return {**asdict(self), "unit": SCORE_UNIT}


@dataclass
class VideoMotion:
    length: int  # frames, as the reader counts them
    fps: float
    motion_score: float


def sample_indices(num_frames: int, fps: float, sample_fps: float = 2.0) -> list[int]:
    """Frame indices nearest to the timestamps 0, 1/sample_fps, 2/sample_fps, ... inside the video.

    At least two indices for videos of at least two frames (the first and last when the video is shorter than one
    sampling step); every frame when the video's fps is not above `sample_fps`.
    """
    if num_frames < 2:
        return list(range(num_frames))
    if not fps > 0 or fps <= sample_fps:
        return list(range(num_frames))
    step = fps / sample_fps  # frames per sampling interval
    count = int(math.floor((num_frames - 1) / step + 1e-9)) + 1
    indices = sorted({min(round(k * step), num_frames - 1) for k in range(count)})
    if len(indices) < 2:
        indices = [0, num_frames - 1]
    return indices


def _small_grey(frame: np.ndarray, flow_size: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> grey uint8 with the shorter side resized to `flow_size`."""
    import cv2

    h, w = frame.shape[:2]
    scale = flow_size / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2 takes (width, height)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(frame, size, interpolation=interp) if scale != 1 else frame
    return cv2.cvtColor(np.ascontiguousarray(small), cv2.COLOR_RGB2GRAY)


def pair_magnitude(prev: np.ndarray, cur: np.ndarray) -> float:
    """Mean Farneback flow magnitude in pixels between two grey frames of the same size."""
    import cv2

    flow = cv2.calcOpticalFlowFarneback(prev, cur, None, **FARNEBACK)
    magnitude, _ = cv2.cartToPolar(flow[..., 0], flow[..., 1])
    return float(magnitude.mean())


def score_frames(frames: Iterable[np.ndarray], times: Sequence[float], flow_size: int = 128) -> float:
    """Motion score (see the module docstring) of frames (each (H, W, 3) uint8 RGB) taken at `times` seconds."""
    scores, prev, prev_t = [], None, None
    for frame, t in zip(frames, times):
        grey = _small_grey(frame, flow_size)
        if prev is not None:
            dt = t - prev_t
            if dt <= 0:
                raise ValueError("frame times must increase")
            scores.append(pair_magnitude(prev, grey) / flow_size * 100.0 / dt)
        prev, prev_t = grey, t
    if not scores:
        raise ValueError("a motion score needs at least two frames")
    return float(np.mean(scores))


def measure_video(path: str, settings: ScoreSettings = ScoreSettings()) -> VideoMotion:
    """Open a video once: its frame count, fps and motion score. Raises VideoReadError for unusable videos.

    The last frame is decoded too (not scored), so a video whose frame count overstates what can be decoded (a
    truncated file) is refused here rather than failing later in training.
    """
    reader = VideoReader(path)
    n, fps = len(reader), reader.fps
    if n < 2:
        raise VideoReadError(f"{path}: {n} frame, a motion score needs at least 2")
    if not (fps > 0 and math.isfinite(fps)):
        raise VideoReadError(f"{path}: no usable frame rate ({fps})")
    indices = sample_indices(n, fps, settings.sample_fps)

    def frames() -> Iterable[np.ndarray]:
        for start in range(0, len(indices), READ_CHUNK):
            chunk = indices[start : start + READ_CHUNK]
            last = start + READ_CHUNK >= len(indices)
            wanted = chunk + [n - 1] if last and chunk[-1] != n - 1 else chunk
            got = reader.get(wanted)
            if len(got) != len(wanted) or got.ndim != 4 or got.shape[-1] != 3:
                raise VideoReadError(f"{path}: frames {wanted} decode to shape {got.shape}")
            yield from got[: len(chunk)]

    try:
        score = score_frames(frames(), [i / fps for i in indices], settings.flow_size)
    except VideoReadError:
        raise
    except Exception as e:  # decoders and OpenCV raise many types; all mean "unusable video" here
        raise VideoReadError(f"{path}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from e
    return VideoMotion(length=n, fps=fps, motion_score=score)


def measure_or_reason(path: str, settings: ScoreSettings) -> tuple[VideoMotion | None, str | None]:
    """`measure_video` for worker processes: (result, None) or (None, the reason it failed); never raises."""
    try:
        return measure_video(path, settings), None
    except Exception as e:  # noqa: BLE001 -- any failure is a rejection, never a crash
        reason = str(e) or type(e).__name__
        if reason.startswith(path + ": "):
            reason = reason[len(path) + 2 :]
        return None, " ".join(reason.split())


# -- score -> bucket ---------------------------------------------------------------------------------------------


@dataclass
class PowerMap:
    """`bucket = clip(round(255 * (score / score_max) ** gamma), bucket_min, bucket_max)`."""

    score_max: float = 40.0
    gamma: float = 0.5
    bucket_min: int = 0
    bucket_max: int = 255

    def __post_init__(self):
        if not (self.score_max > 0 and math.isfinite(self.score_max)):
            raise ValueError(f"score_max must be a positive number, got {self.score_max}")
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ValueError(f"gamma must be a positive number, got {self.gamma}")
        _check_range(self.bucket_min, self.bucket_max)

    def __call__(self, scores: Sequence[float]) -> np.ndarray:
        s = np.clip(np.asarray(scores, np.float64), 0.0, None)
        b = np.round(255.0 * (s / self.score_max) ** self.gamma)
        return np.clip(b, self.bucket_min, self.bucket_max).astype(np.int64)

    def to_dict(self) -> dict:
        return {"kind": "power", **asdict(self)}

    def describe(self) -> str:
        return (
            f"power: bucket = clip(round(255 * (score / {self.score_max:.6g}) ** {self.gamma:.6g}), "
            f"{self.bucket_min}, {self.bucket_max})"
        )


@dataclass
class QuantileMap:
    """Piecewise-linear from score knots (increasing) to bucket knots (non-decreasing), clamped at both ends."""

    scores: list[float]
    buckets: list[float]

    def __post_init__(self):
        s, b = np.asarray(self.scores, np.float64), np.asarray(self.buckets, np.float64)
        if len(s) < 2 or len(s) != len(b):
            raise ValueError("a quantile map needs at least two (score, bucket) knots of equal count")
        if np.any(np.diff(s) <= 0) or np.any(np.diff(b) < 0):
            raise ValueError("quantile map knots must increase")
        _check_range(round(b[0]), round(b[-1]))

    def __call__(self, scores: Sequence[float]) -> np.ndarray:
        return np.round(np.interp(np.asarray(scores, np.float64), self.scores, self.buckets)).astype(np.int64)

    def to_dict(self) -> dict:
        return {"kind": "quantiles", "scores": list(map(float, self.scores)), "buckets": list(map(float, self.buckets))}

    def describe(self) -> str:
        return (
            f"quantiles: piecewise-linear through {len(self.scores)} knots, scores {self.scores[0]:.4g}.."
            f"{self.scores[-1]:.4g} -> buckets {self.buckets[0]:.0f}..{self.buckets[-1]:.0f}"
        )


BucketMap = Union[PowerMap, QuantileMap]


def _check_range(lo: int, hi: int) -> None:
    if not 0 <= lo < hi <= 255:
        raise ValueError(f"bucket range must satisfy 0 <= bucket_min < bucket_max <= 255, got {lo}..{hi}")


def map_from_dict(d: dict) -> BucketMap:
    kind = d.get("kind")
    fields = {k: v for k, v in d.items() if k != "kind"}
    if kind == "power":
        return PowerMap(**fields)
    if kind == "quantiles":
        return QuantileMap(**fields)
    raise ValueError(f"unknown mapping kind {kind!r} (power or quantiles)")


def fit_quantiles(scores: Sequence[float], bucket_min: int = 0, bucket_max: int = 255, knots: int = 65) -> QuantileMap:
    """Map the dataset's scores evenly onto [bucket_min, bucket_max]: knots at `knots` evenly spaced quantiles.

    Tied quantiles (for example many still clips at 0) are merged, keeping the knot in the middle of the tied bucket
    range, so equal scores get equal buckets and the map stays monotonic.
    """
    _check_range(bucket_min, bucket_max)
    s = np.sort(np.asarray(scores, np.float64))
    if len(s) < 2 or s[0] == s[-1]:
        raise ValueError("fitting needs at least two videos with different scores")
    q = np.linspace(0.0, 1.0, min(knots, len(s)))
    xs = np.quantile(s, q)
    ys = bucket_min + q * (bucket_max - bucket_min)
    ux, first = np.unique(xs, return_index=True)
    last = np.r_[first[1:] - 1, len(xs) - 1]
    uy = (ys[first] + ys[last]) / 2
    # keep the full bucket range at the ends
    uy[0], uy[-1] = bucket_min, bucket_max
    return QuantileMap(scores=ux.tolist(), buckets=uy.tolist())


def fit_power(
    scores: Sequence[float], median_bucket: float = 127.0, bucket_min: int = 0, bucket_max: int = 255
) -> PowerMap:
    """PowerMap with the median score at `median_bucket` and the 99th percentile score at 255."""
    s = np.asarray(scores, np.float64)
    s = s[s > 0]
    if len(s) < 2:
        raise ValueError("fitting needs at least two videos with a score above 0")
    if not 0 < median_bucket < 255:
        raise ValueError(f"median bucket must be in (0, 255), got {median_bucket}")
    med, high = np.quantile(s, [0.5, 0.99])
    if not high > med:
        raise ValueError("fitting needs scores that spread: the median equals the 99th percentile")
    gamma = math.log(255.0 / median_bucket) / math.log(high / med)
    return PowerMap(score_max=float(high), gamma=float(gamma), bucket_min=bucket_min, bucket_max=bucket_max)


def histogram(buckets: Sequence[int], bins: int = 16, width: int = 40) -> str:
    """A text histogram of buckets over 0..255 in `bins` equal ranges."""
    b = np.asarray(buckets, np.int64)
    counts = np.bincount(np.clip(b, 0, 255) * bins // 256, minlength=bins)
    top = max(int(counts.max()), 1) if len(b) else 1
    size = 256 // bins
    lines = [f"motion_bucket_id histogram ({len(b)} videos)"]
    for i, c in enumerate(counts):
        bar = "#" * math.ceil(width * c / top) if c else ""
        lines.append(f"  {i * size:3d}-{(i + 1) * size - 1:3d} | {bar:<{width}} {c}")
    return "\n".join(lines)
