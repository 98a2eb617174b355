"""Reading and writing videos: the one place that does either.

Reading uses decord (imported lazily: importing decord before mindspore aborts the process). Writing uses PyAV for
browser-playable H.264 (yuv420p) and Pillow for GIF and PNG frames. Every writer goes through a temporary name and
renames when complete, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Sequence

import numpy as np

# GIF is not listed: decord cannot open it
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")


class VideoReadError(RuntimeError):
    """A video that is missing, unreadable or too short; the message names the file and the reason."""


@dataclass
class VideoInfo:
    path: str
    num_frames: int
    fps: float
    height: int
    width: int


class VideoReader:
    """Random access to the frames of one video: `len(r)`, `r.fps`, `r.get(indices) -> (N, H, W, 3) uint8 RGB`."""

    def __init__(self, path: str, width: int = -1, height: int = -1):
        if not os.path.isfile(path):
            raise VideoReadError(f"{path}: file not found")
        import decord  # after mindspore; see the module docstring

        try:
            self._vr = decord.VideoReader(path, ctx=decord.cpu(0), width=width, height=height, num_threads=1)
        except Exception as e:  # decord raises its own DECORDError and RuntimeError types
            raise VideoReadError(f"{path}: cannot be decoded ({str(e).splitlines()[0][:200]})") from e
        self.path = path
        if len(self._vr) == 0:
            raise VideoReadError(f"{path}: no frames")

    def __len__(self) -> int:
        return len(self._vr)

    @property
    def fps(self) -> float:
        return float(self._vr.get_avg_fps())

    def info(self) -> VideoInfo:
        h, w = self._vr[0].shape[:2]
        return VideoInfo(self.path, len(self), self.fps, h, w)

    def get(self, indices: Sequence[int]) -> np.ndarray:
        indices = list(indices)
        try:
            frames = self._vr.get_batch(indices).asnumpy()
            if frames.shape[-1] == 3:
                return frames
        except Exception:
            pass
        # decord 0.6 mis-sizes the frames of some portrait videos (for example 72 or 48 pixels wide); OpenCV
        # decodes those correctly
        return self._get_opencv(indices)

    def _get_opencv(self, indices: list[int]) -> np.ndarray:
        import cv2

        cap = cv2.VideoCapture(self.path)
        try:
            wanted, found = set(indices), {}
            pos = min(indices)
            cap.set(cv2.CAP_PROP_POS_FRAMES, pos)
            while pos <= max(indices):
                ok, frame = cap.read()
                if not ok:
                    raise VideoReadError(f"{self.path}: frame {pos} cannot be decoded")
                if pos in wanted:
                    found[pos] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                pos += 1
        finally:
            cap.release()
        return np.stack([found[i] for i in indices])


def read_clip(path: str, num_frames: int, step: int = 1, start: int = 0) -> tuple[np.ndarray, float]:
    """`num_frames` frames taken every `step` frames from `start`: ((T, H, W, 3) uint8, the video's fps)."""
    reader = VideoReader(path)
    last = start + (num_frames - 1) * step
    if last >= len(reader):
        raise VideoReadError(f"{path}: {len(reader)} frames, a clip of {num_frames} every {step} needs {last + 1}")
    return reader.get(range(start, last + 1, step)), reader.fps


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside `path`; it becomes `path` only if the block completes."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".partial{ext}", dir=directory)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: repeat the last row/column when a side is odd."""
    h, w = frames.shape[1:3]
    if h % 2:
        frames = np.concatenate([frames, frames[:, -1:]], axis=1)
    if w % 2:
        frames = np.concatenate([frames, frames[:, :, -1:]], axis=2)
    return frames


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty (T, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}")
    return frames


def write_mp4(frames: np.ndarray, path: str, fps: float, crf: int = 18) -> str:
    """H.264 in MP4, yuv420p, playable in browsers."""
    import av

    frames = _even(_check_frames(frames))
    with atomic_path(path) as tmp:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def write_gif(frames: np.ndarray, path: str, fps: float) -> str:
    from PIL import Image

    frames = _check_frames(frames)
    images = [Image.fromarray(f) for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def write_frames(frames: np.ndarray, directory: str) -> str:
    """One PNG per frame (`000000.png`, ...) in a new folder, which appears only when complete."""
    from PIL import Image

    frames = _check_frames(frames)
    if os.path.exists(directory):
        raise FileExistsError(f"{directory} already exists")
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".frames.", dir=parent)
    try:
        for i, f in enumerate(frames):
            Image.fromarray(f).save(os.path.join(tmp, f"{i:06d}.png"))
        os.replace(tmp, directory)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return directory


def write_video(frames: np.ndarray, path: str, fps: float, output_format: str = "mp4") -> str:
    """Write (T, H, W, 3) uint8 frames as "mp4", "gif" or "frames" (a folder of PNGs at `path`)."""
    writers = {"mp4": write_mp4, "gif": write_gif}
    if output_format == "frames":
        return write_frames(frames, path)
    if output_format not in writers:
        raise ValueError(f"output format must be mp4, gif or frames, got {output_format!r}")
    return writers[output_format](frames, path, fps)
