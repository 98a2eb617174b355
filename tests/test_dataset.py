"""The CSV video dataset and its sharded, resumable loader, on tiny synthetic videos."""

import logging
import os

import mindspore  # noqa: F401  (before decord)
import numpy as np
import pytest

from data.video_dataset import ClipLoader, VideoDataset, resize_center_crop_frames
from data.video_io import write_video

HEADER = "path,length,motion_bucket_id"


def make_video(path, num_frames=12, height=48, width=64, fps=8, seed=0) -> str:
    """Frame t is a flat grey of level 20 t (so the frame index can be read back) with a small coloured square."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frames[t] = 20 * t
        y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
        frames[t, y : y + 8, x : x + 8] = (255, 64, 0)
    return write_video(frames, str(path), fps)


def make_dataset_dir(root, n=4, num_frames=12, height=48, width=64, fps=8, extra="", extra_rows=()):
    """`n` videos v0..v{n-1}.mp4 and videos.csv (path,length,motion_bucket_id[,extra columns])."""
    os.makedirs(root, exist_ok=True)
    lines = [HEADER + extra]
    for i in range(n):
        make_video(os.path.join(root, f"v{i}.mp4"), num_frames, height, width, fps, seed=i)
        lines.append(f"v{i}.mp4,{num_frames},{100 + i}" + (f",{24}" if "fps" in extra else ""))
    lines.extend(extra_rows)
    csv = os.path.join(root, "videos.csv")
    with open(csv, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(root), csv


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return make_dataset_dir(tmp_path_factory.mktemp("videos"))


def frame_levels(x: np.ndarray) -> np.ndarray:
    """The grey level of each frame of a (T, 3, H, W) clip in [-1, 1] (the median ignores the square)."""
    return np.round((np.median(x.reshape(x.shape[0], -1), axis=1) + 1.0) * 127.5)


def test_clip_layout_range_and_conditioning(videos):
    data_dir, csv = videos
    ds = VideoDataset(data_dir, csv, frames=4, step=2, height=32, width=32)
    s = ds.get(1, np.random.default_rng(0))
    assert s["frames"].shape == (4, 3, 32, 32) and s["frames"].dtype == np.float32
    assert s["cond_frames"].shape == s["cond_frames_without_noise"].shape == (3, 32, 32)
    assert -1.0 <= s["frames"].min() and s["frames"].max() <= 1.0
    np.testing.assert_array_equal(s["cond_frames_without_noise"], s["frames"][0])
    noise = (s["cond_frames"] - s["frames"][0]) / s["cond_aug"]
    assert abs(noise.std() - 1.0) < 0.1 and abs(noise.mean()) < 0.1
    assert s["motion_bucket_id"] == 101
    assert s["fps_id"] == pytest.approx(8 / 2 - 1, abs=1e-3)  # the video's own 8 fps, every 2nd frame
    levels = frame_levels(s["frames"])
    np.testing.assert_allclose(np.diff(levels), 40, atol=4)  # frames 20 t apart, every 2nd frame


def test_fps_column_wins_and_extra_columns_are_allowed(tmp_path):
    data_dir, csv = make_dataset_dir(tmp_path, n=1, extra=",fps,caption")
    with open(csv) as f:
        lines = f.read().splitlines()
    with open(csv, "w") as f:
        f.write("\n".join([lines[0], lines[1] + ',"a caption, with a comma"']) + "\n")
    ds = VideoDataset(data_dir, csv, frames=3, step=3, height=32, width=32)
    assert ds.get(0, np.random.default_rng(0))["fps_id"] == pytest.approx(24 / 3 - 1)


def test_same_generator_same_clip(videos):
    data_dir, csv = videos
    ds = VideoDataset(data_dir, csv, frames=3, step=1, height=32, width=32)
    a, b = ds.get(0, np.random.default_rng(5)), ds.get(0, np.random.default_rng(5))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    starts = {frame_levels(ds.get(0, np.random.default_rng(s))["frames"])[0] for s in range(12)}
    assert len(starts) > 2  # the start is random


def test_cond_aug_is_lognormal_minus3_half(videos):
    data_dir, csv = videos
    ds = VideoDataset(data_dir, csv, frames=1, step=1, height=16, width=16)
    logs = np.log([ds.get(0, np.random.default_rng(s))["cond_aug"] for s in range(300)])
    assert abs(logs.mean() + 3.0) < 0.1 and abs(logs.std() - 0.5) < 0.06


def test_resize_covers_then_crops_the_centre():
    frames = np.zeros((2, 40, 80, 3), np.uint8)
    frames[:, :, 20:60] = 200  # the central half of the width
    out = resize_center_crop_frames(frames, 20, 20)  # scale 0.5 -> 20x40, crop columns 10..30
    assert out.shape == (2, 20, 20, 3)
    assert out[:, :, 2:18].min() > 150
    up = resize_center_crop_frames(frames[:, :, :40], 60, 30)  # 40x40 -> 60x60, crop to 60x30
    assert up.shape == (2, 60, 30, 3)


def test_missing_columns_fail_at_start_naming_them(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("path,length\nv0.mp4,12\n")
    with pytest.raises(ValueError, match="missing required column.*motion_bucket_id"):
        VideoDataset(str(tmp_path), str(csv), frames=2)
    csv.write_text("")
    with pytest.raises(ValueError, match="path, length, motion_bucket_id"):
        VideoDataset(str(tmp_path), str(csv), frames=2)
    with pytest.raises(ValueError, match="metadata file not found"):
        VideoDataset(str(tmp_path), str(tmp_path / "none.csv"), frames=2)


def test_bad_rows_are_skipped_once_and_counted(tmp_path, caplog):
    bad = [
        "missing.mp4,12,3",  # no such file
        "garbage.mp4,12,3",  # not a video
        "v0.mp4,2,3",  # too short by the CSV
        "short.mp4,12,3",  # too short in fact (the CSV is wrong)
        "v1.mp4,twelve,3",  # not a number
    ]
    data_dir, csv = make_dataset_dir(tmp_path, n=2, extra_rows=bad)
    (tmp_path / "garbage.mp4").write_bytes(b"\x00not a video" * 50)
    make_video(tmp_path / "short.mp4", num_frames=2)
    with caplog.at_level(logging.WARNING, logger="data.video_dataset"):
        ds = VideoDataset(data_dir, csv, frames=4, step=1, height=16, width=16)
        assert len(ds) == 5 and ds.num_skipped == 2  # two rows are rejected by the CSV alone
        loader = ClipLoader(ds, batch_size=1, shuffle=True, num_workers=2, seed=0)
        for epoch in range(3):  # every epoch has all its batches: bad rows are replaced, never end it
            batches = list(loader.epoch(epoch))
            assert len(batches) == 5
            assert {int(b["motion_bucket_id"][0]) for b in batches} <= {100, 101}
    assert ds.num_skipped == 5
    assert sorted(ds.skipped) == [3, 4, 5, 6, 7]
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 5  # one each, over three epochs
    assert any("file not found" in w for w in warnings) and any("too short" in w for w in warnings)


def test_no_usable_row_is_an_error(tmp_path):
    csv = tmp_path / "v.csv"
    csv.write_text(HEADER + "\nv0.mp4,1,3\n")
    with pytest.raises(ValueError, match="no usable rows"):
        VideoDataset(str(tmp_path), str(csv), frames=4)


def test_shards_are_disjoint_equal_and_resumable(videos, tmp_path):
    data_dir, csv = make_dataset_dir(tmp_path, n=5, num_frames=4, height=16, width=16)
    ds = VideoDataset(data_dir, csv, frames=2, step=1, height=16, width=16)
    loaders = [ClipLoader(ds, batch_size=1, seed=3, rank=r, world=2, num_workers=0) for r in range(2)]
    shards = [set(ld.shard(0).tolist()) for ld in loaders]
    assert len(shards[0]) == len(shards[1]) == 2 and not shards[0] & shards[1]
    assert [len(ld) for ld in loaders] == [2, 2]
    assert not np.array_equal(loaders[0].shard(0), loaders[0].shard(1))  # a new order every epoch
    full = list(loaders[0].epoch(1))
    tail = list(loaders[0].epoch(1, start=1))
    assert len(tail) == 1
    for k in full[1]:
        np.testing.assert_array_equal(full[1][k], tail[0][k])
    threaded = list(ClipLoader(ds, batch_size=1, seed=3, rank=0, world=2, num_workers=2).epoch(1))
    np.testing.assert_array_equal(threaded[0]["frames"], full[0]["frames"])
    ordered = ClipLoader(ds, batch_size=2, shuffle=False, drop_remainder=False, num_workers=0)
    assert ordered.shard(0).tolist() == [0, 1, 2, 3, 4] and len(ordered) == 3
    batches = list(ordered.epoch(0))
    assert batches[2]["motion_bucket_id"].tolist() == [104, 100]  # the last batch is filled from the start
    with pytest.raises(ValueError, match="cannot fill a batch"):
        ClipLoader(ds, batch_size=3, world=2)
