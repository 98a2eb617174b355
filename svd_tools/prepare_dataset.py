"""Turn a folder of videos into the training CSV, with SVD motion buckets.

    python svd_tools/prepare_dataset.py --videos DIR --out DIR/videos.csv [--workers N] [--fit quantiles]

Finds every video under DIR (recursively; the extensions in `data.video_io.VIDEO_EXTENSIONS`; hidden files and
folders skipped), opens each once and writes one row per usable video:

    path,length,fps,motion_score,motion_bucket_id

`path` is relative to DIR ('/'-separated), so `data_dir=DIR` plus `path` finds the file; `length` is the frame count,
`fps` the average frame rate, `motion_score` the optical-flow score of `svd_tools.motion` (percent of the frame's
shorter side per second) and `motion_bucket_id` its 0..255 bucket. How the score and the bucket are computed is
documented in `svd_tools/motion.py`.

Beside the CSV:

* `rejected.csv` (`path,reason`): the videos that could not be used in this run (unreadable, too short, ...).
* `<name>.mapping.json`: the score settings and the score -> bucket mapping used; pass it back with `--mapping` to
  bucket another dataset the same way.
* `<name>.progress.jsonl`, only while a run is going or after it was killed: every measured video is appended there
  at once, so nothing measured is lost.

Resume: a second run reuses the rows already in the CSV (and in a left-over progress file) and measures only the
rest; videos rejected before are tried again. Buckets are recomputed for all rows on every run, from the stored
scores and the mapping flags of that run, so changing `--gamma` or `--fit` re-buckets without decoding anything.
The CSV is only ever replaced whole (write to a temporary file, then rename), so it is never half-written.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import signal
import sys
from collections import deque
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from data.video_io import VIDEO_EXTENSIONS, atomic_path
from svd_tools.motion import (
    BucketMap,
    PowerMap,
    ScoreSettings,
    VideoMotion,
    fit_power,
    fit_quantiles,
    histogram,
    map_from_dict,
    measure_or_reason,
)

COLUMNS = ("path", "length", "fps", "motion_score", "motion_bucket_id")
REJECTED_COLUMNS = ("path", "reason")
FIT_CHOICES = ("none", "power", "quantiles")
EXIT_INTERRUPTED = 130
SCORE_UNIT_SHORT = "% of the shorter side per second"


class UsageError(ValueError):
    """Bad arguments or inputs: reported as one line, exit code 2."""


@dataclass
class Item:
    """One video to measure: `path` as written in the CSV, `file` where to read it, `extra` columns to keep."""

    path: str
    file: str
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class MappingSpec:
    """How to turn scores into buckets: a saved mapping file, a fit over the dataset, or a PowerMap from flags."""

    fit: str = "none"
    score_max: float = 40.0
    gamma: float = 0.5
    bucket_min: int = 0
    bucket_max: int = 255
    median_bucket: float = 127.0
    mapping_file: Optional[str] = None

    def validate(self) -> MappingSpec:
        if self.fit not in FIT_CHOICES:
            raise UsageError(f"--fit must be one of {', '.join(FIT_CHOICES)}, got {self.fit!r}")
        if self.mapping_file and self.fit != "none":
            raise UsageError("--mapping and --fit exclude each other")
        try:
            PowerMap(self.score_max, self.gamma, self.bucket_min, self.bucket_max)
        except ValueError as e:
            raise UsageError(str(e)) from e
        if not 0 < self.median_bucket < 255:
            raise UsageError(f"--median_bucket must be in (0, 255), got {self.median_bucket}")
        if self.mapping_file:
            self.load_file()
        return self

    def load_file(self) -> BucketMap:
        try:
            with open(self.mapping_file) as f:
                return map_from_dict(json.load(f)["mapping"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--mapping {self.mapping_file}: not a usable mapping file ({e})") from e

    def resolve(self, scores: Sequence[float]) -> tuple[BucketMap, str]:
        """The mapping for these scores, and a note when a fit was not possible."""
        default = PowerMap(self.score_max, self.gamma, self.bucket_min, self.bucket_max)
        if self.mapping_file:
            return self.load_file(), ""
        try:
            if self.fit == "quantiles":
                return fit_quantiles(scores, self.bucket_min, self.bucket_max), ""
            if self.fit == "power":
                return fit_power(scores, self.median_bucket, self.bucket_min, self.bucket_max), ""
        except ValueError as e:
            return default, f"cannot fit ({e}); using the flags' power mapping"
        return default, ""


def scan_videos(root: str) -> list[Item]:
    """Every video under `root` (recursively, sorted), skipping hidden files and folders."""
    items = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(VIDEO_EXTENSIONS):
                file = os.path.join(directory, name)
                items.append(Item(Path(file).relative_to(root).as_posix(), file))
    return items


# -- measuring, in parallel -----------------------------------------------------------------------------------------

Measure = Callable[[str, ScoreSettings], "tuple[Optional[VideoMotion], Optional[str]]"]
CRASHED = "the decoder crashed its worker process"


def _init_worker() -> None:
    # Ctrl-C is handled by the parent, which writes what is done; workers just stop with the pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import cv2

    cv2.setNumThreads(1)


def measure_all(
    items: Sequence[Item], settings: ScoreSettings, workers: int, measure: Measure = measure_or_reason
) -> Iterator[tuple[Item, Optional[VideoMotion], Optional[str]]]:
    """(item, result, None) or (item, None, reason) for every item, in completion order.

    `workers` 0 measures in this process; otherwise a pool of spawned processes (spawn: a decoder must not inherit
    the parent's threads or libraries). A worker that dies (a decoder crash) breaks the pool: the videos that were in
    flight are then measured again one at a time, each in a fresh process, and the one that kills it is rejected.
    """
    if workers == 0:
        for item in items:
            yield (item, *measure(item.file, settings))
        return
    ctx = multiprocessing.get_context("spawn")
    queue, suspects = deque(items), deque()
    while queue or suspects:
        if suspects:
            item = suspects.popleft()
            with ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_worker) as pool:
                try:
                    yield (item, *pool.submit(measure, item.file, settings).result())
                except BrokenProcessPool:
                    yield item, None, CRASHED
            continue
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)
        inflight, broken = {}, False
        try:
            while queue or inflight:
                while queue and not broken and len(inflight) < 2 * workers:
                    item = queue.popleft()
                    try:
                        inflight[pool.submit(measure, item.file, settings)] = item
                    except BrokenProcessPool:
                        queue.appendleft(item)
                        broken = True
                if not inflight:
                    break
                # once the pool is broken every pending future fails at once; collect them all
                done, _ = wait(inflight, return_when=ALL_COMPLETED if broken else FIRST_COMPLETED)
                for future in done:
                    item = inflight.pop(future)
                    error = future.exception()
                    if isinstance(error, BrokenProcessPool):
                        suspects.append(item)
                        broken = True
                    elif error is not None:
                        yield item, None, f"{type(error).__name__}: {error}"
                    else:
                        yield (item, *future.result())
                if broken and not inflight:
                    break
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


# -- resume state ---------------------------------------------------------------------------------------------------


def side_paths(out: str) -> dict[str, str]:
    base = os.path.splitext(out)[0]
    return {
        "rejected": os.path.join(os.path.dirname(os.path.abspath(out)), "rejected.csv"),
        "mapping": base + ".mapping.json",
        "progress": base + ".progress.jsonl",
    }


def _motion_from(row: dict) -> Optional[VideoMotion]:
    try:
        m = VideoMotion(int(row["length"]), float(row["fps"]), float(row["motion_score"]))
    except (KeyError, TypeError, ValueError):
        return None
    return m if m.length > 0 and np.isfinite([m.fps, m.motion_score]).all() else None


def _settings_text(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items() if k != "unit")


def read_previous(out: str, settings: ScoreSettings) -> tuple[dict[str, VideoMotion], int]:
    """Rows measured by earlier runs (the CSV, then a left-over progress file) and the number of unusable rows.

    Raises UsageError when `out` is not a CSV of this tool or was measured with other score settings.
    """
    paths, done, bad = side_paths(out), {}, 0
    expected = settings.to_dict()
    if os.path.exists(paths["mapping"]) and os.path.exists(out):
        try:
            with open(paths["mapping"]) as f:
                earlier = json.load(f).get("score")
        except (OSError, ValueError, AttributeError):
            earlier = None
        if earlier is not None and earlier != expected:
            raise UsageError(
                f"{out} was measured with {_settings_text(earlier)}, not {_settings_text(expected)}; "
                "use the same settings, another --out or --overwrite"
            )
    if os.path.exists(out):
        with open(out, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS[:4] if c not in (reader.fieldnames or [])]
            if missing:
                raise UsageError(
                    f"{out} exists but has no {', '.join(missing)} column; choose another --out or pass --overwrite"
                )
            for row in reader:
                m = _motion_from(row)
                if m is None or not row.get("path"):
                    bad += 1
                else:
                    done[row["path"]] = m
    if os.path.exists(paths["progress"]):
        with open(paths["progress"]) as f:
            lines = f.read().split("\n")
        # the last piece is "" after a complete line, or a line cut short by a kill: never trusted
        for i, line in enumerate(lines[:-1]):
            try:
                record = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if i == 0 and "settings" in record:
                if record["settings"] != expected:
                    raise UsageError(
                        f"{paths['progress']} was measured with {_settings_text(record['settings'])}, "
                        f"not {_settings_text(expected)}; "
                        "use the same settings or pass --overwrite"
                    )
                continue
            m = _motion_from(record)
            if m is None or not record.get("path"):
                bad += 1
            else:
                done[record["path"]] = m
    return done, bad


# -- the run ----------------------------------------------------------------------------------------------------------


def _fmt_fps(fps: float) -> str:
    return f"{fps:.6g}"


def write_table(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """A CSV written whole under a temporary name, then renamed over `path`."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)


@dataclass
class RunResult:
    rows: int
    measured: int
    reused: int
    rejected: int
    interrupted: bool

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return 0 if self.rows else 1


def run(
    items: Sequence[Item],
    out: str,
    settings: Optional[ScoreSettings] = None,
    mapping: Optional[MappingSpec] = None,
    workers: int = 0,
    extra_columns: Sequence[str] = (),
    overwrite: bool = False,
    progress: bool = True,
    rejected_before: Sequence[tuple[str, str]] = (),
    measure: Measure = measure_or_reason,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Measure the items not done yet, then write the CSV, rejected.csv and the mapping file (also after Ctrl-C).

    `rejected_before`: (what, reason) pairs found before measuring (e.g. CSV rows without a video), for rejected.csv.
    """
    from tqdm import tqdm

    settings = (settings or ScoreSettings()).validate()
    mapping = (mapping or MappingSpec()).validate()
    if os.path.isdir(out):
        raise UsageError(f"--out {out} is a folder; give a CSV file name")
    paths = side_paths(out)
    if overwrite:
        done, bad = {}, 0
        if os.path.exists(paths["progress"]):
            os.remove(paths["progress"])
    else:
        done, bad = read_previous(out, settings)
    if bad:
        log(f"note: {bad} unreadable rows from an earlier run are measured again")
    wanted = {item.path for item in items}
    reused = sum(p in done for p in wanted)
    stale = len(set(done) - wanted)
    if stale:
        log(f"note: {stale} rows of an earlier run name videos that are not among these; they are dropped")
    todo = [item for item in items if item.path not in done]
    log(f"{len(items)} videos: {reused} done before, {len(todo)} to measure with {workers or 'no'} worker processes")

    rejected: list[tuple[str, str]] = list(rejected_before)
    measured, interrupted = 0, False
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    journal = open(paths["progress"], "a")
    bar = tqdm(total=len(todo), unit="video", disable=not progress or not todo, dynamic_ncols=True)
    try:
        if journal.tell() == 0:
            journal.write(json.dumps({"settings": settings.to_dict()}) + "\n")
        for item, result, reason in measure_all(todo, settings, workers, measure):
            if result is None:
                rejected.append((item.path, reason))
                bar.set_postfix(rejected=len(rejected), refresh=False)
            else:
                done[item.path] = result
                measured += 1
                record = {"path": item.path, "length": result.length, "fps": result.fps}
                journal.write(json.dumps({**record, "motion_score": result.motion_score}) + "\n")
                journal.flush()
            bar.update()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        journal.close()
    if interrupted:
        log("interrupted: writing what is done; run the same command again to go on")

    ok = [item for item in items if item.path in done]
    scores = [done[item.path].motion_score for item in ok]
    bucket_map, note = mapping.resolve(scores)
    if note:
        log(f"note: {note}")
    buckets = bucket_map(scores) if ok else np.zeros(0, np.int64)
    header = list(COLUMNS) + list(extra_columns)
    rows = []
    for item, bucket in zip(ok, buckets):
        m = done[item.path]
        row = [item.path, m.length, _fmt_fps(m.fps), f"{m.motion_score:.4f}", int(bucket)]
        rows.append(row + [item.extra.get(c, "") for c in extra_columns])
    write_table(out, header, rows)
    write_table(paths["rejected"], REJECTED_COLUMNS, rejected)
    with atomic_path(paths["mapping"]) as tmp:
        with open(tmp, "w") as f:
            json.dump({"score": settings.to_dict(), "mapping": bucket_map.to_dict()}, f, indent=1)
    # everything in the progress file is in the CSV now
    os.remove(paths["progress"])

    log(f"mapping: {bucket_map.describe()}")
    if ok:
        s = np.asarray(scores)
        log(f"motion_score: min {s.min():.3f}, median {np.median(s):.3f}, max {s.max():.3f} ({SCORE_UNIT_SHORT})")
        log(histogram(buckets))
    log(f"wrote {out}: {len(rows)} rows ({measured} measured now, {reused} from earlier runs)")
    if rejected:
        log(f"{len(rejected)} videos rejected, reasons in {paths['rejected']}")
    if not rows:
        log("error: no usable video")
    return RunResult(len(rows), measured, reused, len(rejected), interrupted)


# -- command line ---------------------------------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (`prog: error: ...`) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags shared with convert_webvid.py: output, workers, score settings, bucket mapping."""
    parser.add_argument("--out", required=True, help="the CSV to write (resumed if it exists)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (0: in this process)")
    parser.add_argument("--overwrite", action="store_true", help="measure everything again, ignoring an earlier CSV")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    g = parser.add_argument_group("motion score (see svd_tools/motion.py)")
    g.add_argument("--sample_fps", type=float, default=2.0, help="frames per second compared by optical flow")
    g.add_argument("--flow_size", type=int, default=128, help="shorter side, in pixels, of the frames given to flow")
    g = parser.add_argument_group(
        "score -> bucket", "bucket = clip(round(255 * (score / score_max) ** gamma), bucket_min, bucket_max)"
    )
    g.add_argument("--score_max", type=float, default=40.0, help="score mapped to bucket 255")
    g.add_argument("--gamma", type=float, default=0.5, help="exponent; below 1 spreads the low scores")
    g.add_argument("--bucket_min", type=int, default=0, help="lowest bucket")
    g.add_argument("--bucket_max", type=int, default=255, help="highest bucket")
    g.add_argument(
        "--fit",
        choices=FIT_CHOICES,
        default="none",
        help="fit the mapping to this dataset: quantiles (buckets spread evenly over the range), power (score_max "
        "and gamma so that the median lands on --median_bucket and the 99th percentile on 255)",
    )
    g.add_argument("--median_bucket", type=float, default=127.0, help="with --fit power: bucket of the median score")
    g.add_argument("--mapping", default=None, help="a <name>.mapping.json of an earlier run: bucket the same way")


def common_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[ScoreSettings, MappingSpec]:
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    try:
        settings = ScoreSettings(args.sample_fps, args.flow_size).validate()
        spec = MappingSpec(
            args.fit, args.score_max, args.gamma, args.bucket_min, args.bucket_max, args.median_bucket, args.mapping
        ).validate()
    except ValueError as e:
        parser.error(str(e))
    if os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a folder; give a CSV file name")
    return settings, spec


def stop_on_sigterm() -> None:
    """Treat SIGTERM (a scheduler's kill) like Ctrl-C: write what is done, then stop."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def main(argv: Optional[list[str]] = None) -> int:
    parser = OneLineParser(
        prog="prepare_dataset.py",
        description="Turn a folder of videos into a training CSV with motion buckets (see svd_tools/motion.py).",
    )
    parser.add_argument("--videos", required=True, help="folder of videos, searched recursively")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    settings, spec = common_from_args(parser, args)
    if not os.path.isdir(args.videos):
        parser.error(f"--videos {args.videos} is not a folder")
    items = scan_videos(args.videos)
    if not items:
        parser.error(f"no videos ({' '.join(VIDEO_EXTENSIONS)}) under {args.videos}")
    stop_on_sigterm()
    try:
        result = run(
            items, args.out, settings, spec, args.workers, overwrite=args.overwrite, progress=not args.no_progress
        )
    except UsageError as e:
        parser.error(str(e))
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
