"""svd_tools.prepare_dataset / motion / convert_webvid on small synthetic videos (64x64, 3 s at 8 fps)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from svd_tools import convert_webvid, prepare_dataset
from svd_tools.motion import (
    PowerMap,
    QuantileMap,
    ScoreSettings,
    fit_power,
    fit_quantiles,
    histogram,
    map_from_dict,
    measure_or_reason,
    measure_video,
    sample_indices,
)
from svd_tools.prepare_dataset import COLUMNS, CRASHED, Item, MappingSpec, UsageError, run, scan_videos
from tests.video_fixtures import write_corrupt, write_synthetic

# true motion order: still < slow shape < fast shape < camera pan
MOTIONS = {
    "still.mp4": dict(kind="still"),
    "clips/slow_shape.mp4": dict(kind="shape", speed=0.5, seed=1),
    "clips/fast_shape.mp4": dict(kind="shape", speed=1.5, seed=2),
    "clips/deep/pan.mp4": dict(kind="pan", speed=1.0, seed=3),
}
ORDER = list(MOTIONS)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A folder with the four synthetic videos, a garbage .mp4, an empty .avi and a non-video file."""
    root = tmp_path_factory.mktemp("videos")
    truth = {name: write_synthetic(str(root / name), **kw) for name, kw in MOTIONS.items()}
    write_corrupt(str(root / "clips" / "broken.mp4"), "garbage")
    write_corrupt(str(root / "empty.avi"), "empty")
    (root / "notes.txt").write_text("not a video")
    return root, truth


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def items_of(root):
    return [it for it in scan_videos(str(root)) if it.path in MOTIONS]


# -- motion score ---------------------------------------------------------------------------------------------------


def test_sample_indices():
    assert sample_indices(24, 8.0) == [0, 4, 8, 12, 16, 20]
    assert sample_indices(100, 30.0) == [0, 15, 30, 45, 60, 75, 90]
    assert sample_indices(61, 29.97) == [0, 15, 30, 45, 60]  # nearest frames to 0, 0.5, 1, 1.5, 2 s
    assert sample_indices(5, 1.0) == [0, 1, 2, 3, 4]  # below 2 fps: every frame
    assert sample_indices(3, 30.0) == [0, 2]  # shorter than one step: first and last
    assert sample_indices(1, 30.0) == [0]


def test_scores_and_buckets_follow_true_motion(videos):
    root, truth = videos
    scores = [measure_video(str(root / name)).motion_score for name in ORDER]
    assert [truth[n] for n in ORDER] == sorted(truth[n] for n in ORDER)
    assert scores[0] < 0.05, scores  # a still picture has (almost) no flow
    assert all(a < b for a, b in zip(scores, scores[1:])), scores
    # well separated, not ordered by noise
    assert all(b > 1.5 * a for a, b in zip(scores[1:], scores[2:])), scores
    buckets = PowerMap()(scores)
    assert all(a < b for a, b in zip(buckets, buckets[1:])), buckets


def test_score_unit_resolution_and_fps(tmp_path):
    """A pan moving 12.5 % of the frame per second scores ~12.5 at 64 or 128 pixels and at 8 or 16 fps."""
    cases = {
        "64px_8fps.mp4": dict(kind="pan", size=64, speed=1.0, fps=8.0),
        "128px_8fps.mp4": dict(kind="pan", size=128, speed=2.0, fps=8.0),
        "64px_16fps.mp4": dict(kind="pan", size=64, speed=0.5, fps=16.0),
    }
    scores = {}
    for name, kw in cases.items():
        true = write_synthetic(str(tmp_path / name), **kw) * 100  # fraction -> percent
        assert true == pytest.approx(12.5)
        m = measure_video(str(tmp_path / name))
        assert m.fps == pytest.approx(kw["fps"]) and m.length == round(3 * kw["fps"])
        scores[name] = m.motion_score
    assert all(abs(s - 12.5) < 0.15 * 12.5 for s in scores.values()), scores
    assert max(scores.values()) < 1.1 * min(scores.values()), scores


def test_unreadable_videos_give_reasons(videos):
    root, _ = videos
    settings = ScoreSettings()
    for name, words in [("clips/broken.mp4", "cannot be decoded"), ("empty.avi", "cannot be decoded")]:
        result, reason = measure_or_reason(str(root / name), settings)
        assert result is None and words in reason, reason
    assert measure_or_reason(str(root / "absent.mp4"), settings) == (None, "file not found")


# -- score -> bucket ----------------------------------------------------------------------------------------------


def test_mappings_are_monotonic_and_fit(rng):
    scores = np.concatenate([np.zeros(50), rng.lognormal(1.0, 1.0, 950)])  # many still clips tie at 0
    grid = np.linspace(0, scores.max() * 1.5, 2001)
    maps = [PowerMap(), PowerMap(10.0, 2.0, 1, 250), fit_quantiles(scores), fit_power(scores, 100)]
    for m in maps:
        b = m(grid)
        assert np.all(np.diff(b) >= 0), m.describe()
        assert b.min() >= 0 and b.max() <= 255
        assert np.array_equal(map_from_dict(json.loads(json.dumps(m.to_dict())))(grid), b)
    # quantile fit: the dataset's buckets spread evenly over 0..255, the ties share one bucket
    b = fit_quantiles(scores)(scores)
    assert b.min() == 0 and b.max() == 255 and len(set(b[:50])) == 1
    quarters = np.bincount(b // 64, minlength=4) / len(b)
    assert np.all(np.abs(quarters - 0.25) < 0.04), quarters
    # power fit: median at the chosen bucket, 99th percentile at 255
    fitted = fit_power(scores, median_bucket=100)
    positive = scores[scores > 0]
    assert abs(int(fitted([np.median(positive)])[0]) - 100) <= 1
    assert fitted([np.quantile(positive, 0.99)])[0] == 255
    assert PowerMap(40.0, 0.5)([0.0, 10.0, 40.0, 1e6]).tolist() == [0, 128, 255, 255]
    with pytest.raises(ValueError):
        QuantileMap([0.0, 2.0, 1.0], [0.0, 100.0, 200.0])
    with pytest.raises(ValueError):
        fit_quantiles([3.0, 3.0, 3.0])
    with pytest.raises(ValueError):
        PowerMap(gamma=0.0)


def test_histogram_text():
    text = histogram([0, 3, 15, 16, 255, 255, 255])
    lines = text.splitlines()
    assert lines[0] == "motion_bucket_id histogram (7 videos)"
    assert len(lines) == 17
    assert lines[1].startswith("    0- 15 |") and lines[1].endswith(" 3")
    assert lines[2].endswith(" 1") and lines[16].startswith("  240-255 |") and lines[16].endswith(" 3")
    assert lines[16].count("#") == 40 and lines[3].count("#") == 0


# -- the tool ---------------------------------------------------------------------------------------------------------


def test_cli_with_workers(videos, tmp_path, capsys):
    root, truth = videos
    out = tmp_path / "out" / "videos.csv"
    code = prepare_dataset.main(["--videos", str(root), "--out", str(out), "--workers", "2", "--no_progress"])
    assert code == 0
    header, rows = read_csv(out)
    assert header == list(COLUMNS)
    assert sorted(r["path"] for r in rows) == sorted(ORDER)
    for r in rows:  # data_dir + path finds the video
        assert os.path.isfile(os.path.join(root, r["path"]))
        assert int(r["length"]) == 24 and float(r["fps"]) == 8.0
        assert 0 <= int(r["motion_bucket_id"]) <= 255
    by_path = {r["path"]: r for r in rows}
    scores = [float(by_path[n]["motion_score"]) for n in ORDER]
    buckets = [int(by_path[n]["motion_bucket_id"]) for n in ORDER]
    assert scores == sorted(scores) and buckets == sorted(buckets) and len(set(buckets)) == 4
    _, rejected = read_csv(tmp_path / "out" / "rejected.csv")
    assert {r["path"] for r in rejected} == {"clips/broken.mp4", "empty.avi"}
    assert all(r["reason"] for r in rejected)
    saved = json.loads((tmp_path / "out" / "videos.mapping.json").read_text())
    assert saved["score"]["flow_size"] == 128 and saved["mapping"]["kind"] == "power"
    assert not (tmp_path / "out" / "videos.progress.jsonl").exists()
    printed = capsys.readouterr().out
    assert "motion_bucket_id histogram (4 videos)" in printed and "2 videos rejected" in printed


def test_resume_skips_done_rows_and_rebuckets(videos, tmp_path):
    root, _ = videos
    out = str(tmp_path / "videos.csv")
    items = items_of(root)
    first = run(items[:2], out, progress=False, log=lambda s: None)
    assert (first.measured, first.reused) == (2, 0)
    calls = []

    def spy(file, settings):
        calls.append(os.path.basename(file))
        return measure_or_reason(file, settings)

    second = run(items, out, progress=False, measure=spy, log=lambda s: None)
    assert (second.measured, second.reused, second.rows) == (2, 2, 4)
    assert sorted(calls) == sorted(os.path.basename(it.path) for it in items[2:])
    before = {r["path"]: r for r in read_csv(out)[1]}

    def must_not_decode(file, settings):
        raise AssertionError("a finished row was measured again")

    # a new mapping re-buckets every row from the stored scores
    third = run(items, out, mapping=MappingSpec(fit="quantiles"), progress=False, measure=must_not_decode, log=print)
    assert (third.measured, third.reused, third.exit_code) == (0, 4, 0)
    after = {r["path"]: r for r in read_csv(out)[1]}
    assert {p: r["motion_score"] for p, r in after.items()} == {p: r["motion_score"] for p, r in before.items()}
    assert sorted(int(r["motion_bucket_id"]) for r in after.values()) == [0, 85, 170, 255]


def test_interrupt_and_killed_run_lose_nothing(videos, tmp_path):
    root, _ = videos
    out = tmp_path / "videos.csv"
    items = items_of(root)
    seen = []

    def interrupt_third(file, settings):
        seen.append(file)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return measure_or_reason(file, settings)

    result = run(items, str(out), progress=False, measure=interrupt_third, log=lambda s: None)
    assert result.interrupted and result.exit_code == 130 and result.rows == 2
    header, rows = read_csv(out)
    assert header == list(COLUMNS) and len(rows) == 2

    # a run killed hard leaves its progress file, the last line possibly cut short: the complete lines count
    progress = tmp_path / "videos.progress.jsonl"
    m = measure_video(items[2].file)
    lines = [json.dumps({"settings": ScoreSettings().to_dict()})]
    lines.append(json.dumps({"path": items[2].path, "length": m.length, "fps": m.fps, "motion_score": m.motion_score}))
    progress.write_text("\n".join(lines) + '\n{"path": "' + items[3].path + '", "len')
    calls = []

    def spy(file, settings):
        calls.append(file)
        return measure_or_reason(file, settings)

    result = run(items, str(out), progress=False, measure=spy, log=lambda s: None)
    assert calls == [items[3].file] and (result.reused, result.rows, result.exit_code) == (3, 4, 0)
    assert not progress.exists()
    assert len(read_csv(out)[1]) == 4


def crash_on_pan(file, settings):
    """A measure function for worker processes that kills its process on the pan video (a decoder crash)."""
    if file.endswith("pan.mp4"):
        os._exit(3)
    return measure_or_reason(file, settings)


def test_worker_crash_is_a_rejection(videos, tmp_path):
    root, _ = videos
    out = tmp_path / "videos.csv"
    result = run(items_of(root), str(out), workers=2, progress=False, measure=crash_on_pan, log=lambda s: None)
    assert (result.rows, result.rejected, result.exit_code) == (3, 1, 0)
    _, rejected = read_csv(tmp_path / "rejected.csv")
    assert rejected == [{"path": "clips/deep/pan.mp4", "reason": CRASHED}]


def test_refuses_mismatched_outputs(videos, tmp_path):
    root, _ = videos
    items = items_of(root)[:1]
    out = tmp_path / "videos.csv"
    run(items, str(out), progress=False, log=lambda s: None)
    with pytest.raises(UsageError, match="flow_size 128, not sample_fps 2.0, flow_size 64"):
        run(items, str(out), ScoreSettings(flow_size=64), progress=False, log=lambda s: None)
    assert run(items, str(out), ScoreSettings(flow_size=64), overwrite=True, progress=False, log=lambda s: None).rows
    foreign = tmp_path / "other.csv"
    foreign.write_text("video,caption\na.mp4,hello\n")
    with pytest.raises(UsageError, match="has no path, length, fps, motion_score column"):
        run(items, str(foreign), progress=False, log=lambda s: None)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--out", "x.csv"], "required: --videos"),
        (["--videos", "/no/such/folder", "--out", "x.csv"], "is not a folder"),
        (["--videos", ".", "--out", "x.csv", "--workers", "-2"], "--workers must be >= 0"),
        (["--videos", ".", "--out", "x.csv", "--gamma", "-1"], "gamma must be a positive number"),
        (["--videos", ".", "--out", "x.csv", "--bucket_min", "300"], "bucket range"),
        (["--videos", ".", "--out", "x.csv", "--fit", "linear"], "invalid choice"),
        (["--videos", ".", "--out", "x.csv", "--fit", "power", "--mapping", "m.json"], "exclude each other"),
        (["--videos", ".", "--out", "x.csv", "--flow_size", "4"], "flow_size must be at least 16"),
    ],
)
def test_bad_arguments_one_line(args, words, capsys):
    with pytest.raises(SystemExit) as e:
        prepare_dataset.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and err.count("\n") == 1, err


def test_scripts_run_without_mindspore(videos, tmp_path):
    root, _ = videos
    code = "import sys, svd_tools.prepare_dataset, svd_tools.convert_webvid; sys.exit('mindspore' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    out = tmp_path / "v.csv"
    args = ["--videos", str(root / "clips" / "deep"), "--out", str(out), "--workers", "0", "--fit", "quantiles"]
    proc = subprocess.run(
        [sys.executable, "svd_tools/prepare_dataset.py", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "cannot fit" in proc.stdout  # one video: the quantile fit falls back to the flags' mapping
    assert [r["path"] for r in read_csv(out)[1]] == ["pan.mp4"]


# -- WebVid-style import ----------------------------------------------------------------------------------------------


def test_clean_caption():
    assert convert_webvid.clean_caption("('A dog, running.\\n',)\n") == "A dog, running."
    assert convert_webvid.clean_caption("  two\nlines\\tand tabs ") == "two lines and tabs"
    assert convert_webvid.clean_caption("(not a tuple") == "(not a tuple"


def test_webvid_csv(videos, tmp_path):
    root, _ = videos
    listing = tmp_path / "results.csv"
    with open(listing, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "page_dir", "name", "length"])
        w.writerow(["pan", "clips/deep", 'a pan, with "quotes"', "999"])
        w.writerow(["still", ".", "a still picture", "1"])
        w.writerow(["gone", "clips", "missing file", "1"])
        w.writerow(["pan", "clips/deep", "listed twice", "999"])
    out = tmp_path / "train" / "train.csv"
    args = ["--csv", str(listing), "--videos", str(root), "--path_format", "{page_dir}/{videoid}.mp4"]
    assert convert_webvid.main([*args, "--out", str(out), "--workers", "0", "--no_progress"]) == 0
    header, rows = read_csv(out)
    # computed columns first, the listed `length` replaced by the real one, other columns kept
    assert header == [*COLUMNS, "videoid", "page_dir", "name"]
    assert [(r["path"], r["length"], r["name"]) for r in rows] == [
        ("clips/deep/pan.mp4", "24", 'a pan, with "quotes"'),
        ("still.mp4", "24", "a still picture"),
    ]
    assert int(rows[0]["motion_bucket_id"]) > int(rows[1]["motion_bucket_id"])
    _, rejected = read_csv(tmp_path / "train" / "rejected.csv")
    assert rejected == [{"path": "clips/gone.mp4", "reason": "file not found"}]
    # a video column and a chosen subset of columns
    listing.write_text("video,caption,extra\nstill.mp4,still,x\n,no path,y\n")
    out2 = tmp_path / "t2.csv"
    args = ["--csv", str(listing), "--videos", str(root), "--keep", "caption", "--out", str(out2), "--workers", "0"]
    assert convert_webvid.main(args) == 0
    header, rows = read_csv(out2)
    assert header == [*COLUMNS, "caption"] and [r["caption"] for r in rows] == ["still"]
    assert "no video path" in read_csv(tmp_path / "rejected.csv")[1][0]["reason"]


def test_webvid_folder_with_captions(tmp_path):
    root = tmp_path / "webvid" / "00000"
    write_synthetic(str(root / "000001.mp4"), "pan", seconds=2.0)
    write_synthetic(str(root / "000002.mp4"), "still", seconds=2.0)
    (root / "000001.txt").write_text("('Aerial pan over a forest, 4k',)")
    out = tmp_path / "webvid.csv"
    assert convert_webvid.main(["--videos", str(tmp_path / "webvid"), "--out", str(out), "--workers", "0"]) == 0
    header, rows = read_csv(out)
    assert header == [*COLUMNS, "caption"]
    assert [(r["path"], r["length"], r["caption"]) for r in rows] == [
        ("00000/000001.mp4", "16", "Aerial pan over a forest, 4k"),
        ("00000/000002.mp4", "16", ""),
    ]


def test_webvid_bad_arguments(tmp_path, capsys):
    listing = tmp_path / "l.csv"
    listing.write_text("video,caption\na.mp4,x\n")
    for args, words in [
        ([], "give --csv, --videos, or both"),
        (["--csv", str(listing), "--video_column", "clip"], "has no column 'clip'"),
        (["--csv", str(listing), "--path_format", "{id}.mp4"], "does not fit the columns"),
        (["--csv", str(listing), "--keep", "caption,nope"], "no column nope"),
        (["--csv", str(tmp_path / "none.csv")], "No such file"),
    ]:
        with pytest.raises(SystemExit) as e:
            convert_webvid.main([*args, "--out", str(tmp_path / "o.csv")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and err.count("\n") == 1, (args, err)


def test_items_keep_extra_columns_through_resume(videos, tmp_path):
    root, _ = videos
    out = str(tmp_path / "v.csv")
    item = Item("still.mp4", str(root / "still.mp4"), {"caption": "first"})
    run([item], out, extra_columns=["caption"], progress=False, log=lambda s: None)
    item.extra["caption"] = "edited"
    result = run([item], out, extra_columns=["caption"], progress=False, log=lambda s: None)
    assert result.reused == 1 and read_csv(out)[1][0]["caption"] == "edited"
