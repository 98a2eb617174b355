"""The toy world's clips and the dataset written from them."""

import numpy as np
import pandas as pd
import pytest

from svd_tools.make_toy_dataset import main as make_toy_dataset
from svd_tools.toy_eval import shape_mask, shape_shift
from svd_tools.toy_world import CLIP_FRAMES, RADIUS, SPEEDS, render_clip, scene


def test_clips_are_seeded_and_move_at_their_speed():
    a, speed = render_clip(3, num_frames=6, size=64, speed=2.0)
    b, _ = render_clip(3, num_frames=6, size=64, speed=2.0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (6, 64, 64, 3) and a.dtype == np.uint8 and speed == 2.0
    still, _ = render_clip(3, num_frames=6, size=64, speed=0.0)
    assert np.all(still == still[0])
    assert np.abs(a[-1].astype(int) - a[0]).max() > 50  # the shapes moved


def test_discs_move_right_and_squares_move_down():
    """The world's rule, read from the pixels: over 3 frames at 1 px/frame the one shape's centre moves 3 px right
    (a disc) or down (a square)."""
    seen = set()
    for seed in range(40):
        _, shapes = scene(seed, 64, speed=1.0)
        frames, _ = render_clip(seed, num_frames=4, size=64, speed=1.0)
        assert len(shapes) == 1 and shapes[0].radius == RADIUS * 64
        dy, dx = shape_shift(frames)
        along, across = (dx, dy) if shapes[0].kind == "disc" else (dy, dx)
        assert 2.5 < along < 3.5 and abs(across) < 0.3, (seed, shapes[0].kind, dy, dx)
        seen.add(shapes[0].kind)
    assert seen == {"disc", "square"}


def test_the_kind_shows_in_the_colour_and_shapes_stand_out():
    """Discs are warm (red above blue), squares cool (blue above red), a shape's brightest channel is above every
    background channel, so that shape_mask finds the shape and nothing else, and its grey level (what the motion
    buckets are measured on) is well above every background pixel's."""
    grey = np.array([0.299, 0.587, 0.114])  # OpenCV's RGB2GRAY weights
    for seed in range(40):
        background, shapes = scene(seed, 64)
        red, _, blue = shapes[0].color.astype(int)
        warm = red - blue >= 150
        cool = blue - red >= 150
        assert (warm, cool) == ((True, False) if shapes[0].kind == "disc" else (False, True)), (seed, shapes[0])
        assert not shape_mask(np.clip(background + 0.5, 0, 255).astype(np.uint8)).any()
        assert shapes[0].color @ grey - (background @ grey).max() >= 40, (seed, shapes[0].color)
        frame = render_clip(seed, 1, 64)[0][0]
        assert shape_mask(frame).sum() >= 0.9 * np.pi * (RADIUS * 64) ** 2  # the disc's area; a square's is larger


def test_shape_shift_reads_the_shapes_displacement():
    for seed in range(6):
        kind = scene(seed, 64, speed=2.0)[1][0].kind
        frames, _ = render_clip(seed, num_frames=8, size=64, speed=2.0)
        dy, dx = shape_shift(frames)
        along, across = (dx, dy) if kind == "disc" else (dy, dx)
        assert abs(along - 14.0) < 0.5 and abs(across) < 0.3, (seed, kind, dy, dx)
    still, _ = render_clip(0, num_frames=8, size=64, speed=0.0)
    assert shape_shift(still) == (0.0, 0.0)


def test_shapes_stay_whole_and_inside_for_a_whole_clip_at_the_top_speed():
    for seed in range(30):
        _, shapes = scene(seed, 64, speed=max(SPEEDS))
        for s in shapes:
            for pos in (s.pos, s.pos + s.vel * (CLIP_FRAMES - 1)):
                assert np.all(pos - s.radius >= 0) and np.all(pos + s.radius <= 64), (seed, s)
        frames, _ = render_clip(seed, size=64, speed=max(SPEEDS))
        edges = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
        assert not shape_mask(edges).any()  # no shape pixel on the border in any frame


def test_longer_clips_than_the_world_places_shapes_for_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        make_toy_dataset(["--out", str(tmp_path), "--frames", str(CLIP_FRAMES + 1)])
    assert e.value.code == 2 and "--frames must be in" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_dataset_buckets_follow_the_true_speed(tmp_path):
    assert make_toy_dataset(["--out", str(tmp_path), "--videos", "14", "--frames", "16", "--heldout", "2"]) == 0
    rows = pd.read_csv(tmp_path / "videos.csv")
    assert list(rows.columns) == ["path", "length", "fps", "motion_score", "motion_bucket_id"]
    assert len(rows) == 14 and (rows["length"] == 16).all()
    speed = np.array([render_clip(int(p.split(".")[0]), 1)[1] for p in rows["path"]])
    buckets = rows["motion_bucket_id"].to_numpy()
    assert (speed == 0).any() and (speed >= 1.5).any()
    assert buckets[speed == 0].max() < buckets[speed >= 1.5].min()
    faster = speed[:, None] >= speed[None, :] + 1.0  # pairs a whole pixel a frame apart
    assert (buckets[:, None] > buckets[None, :])[faster].all(), sorted(zip(speed, buckets))
    assert len(list((tmp_path / "heldout").glob("*.png"))) == 2
