"""Import a WebVid-style dataset into the training CSV (`path,length,fps,motion_score,motion_bucket_id` + kept columns).

Two layouts:

    # a CSV with one video per row (other columns, e.g. caption, are kept after the computed ones)
    python svd_tools/convert_webvid.py --csv results.csv --videos ROOT --out ROOT/train.csv \
        [--video_column video | --path_format "{page_dir}/{videoid}.mp4"] [--keep caption,name]

    # a folder of videos, each with its caption in a sibling <stem>.txt (the layout of video2dataset downloads)
    python svd_tools/convert_webvid.py --videos ROOT --out ROOT/train.csv

Paths in the CSV are relative to `--videos` (default: the CSV's folder); the written `path` is relative to it too.
A listed video that is missing or unreadable goes to `rejected.csv`. Length, fps, motion score and bucket come from
the same code as `prepare_dataset.py`, with the same flags, resume and outputs (see its docstring).
"""

from __future__ import annotations

import ast
import csv
import os
import posixpath
import sys
from typing import Optional, Sequence

from svd_tools.prepare_dataset import (
    COLUMNS,
    Item,
    OneLineParser,
    UsageError,
    add_common_arguments,
    common_from_args,
    run,
    scan_videos,
    stop_on_sigterm,
)

CAPTION = "caption"


def clean_caption(text: str) -> str:
    """A caption from a .txt file on one line: a Python repr such as `('a dog',)` (what some downloaders store) is
    unwrapped; escape sequences and runs of whitespace become single spaces."""
    text = text.strip()
    if text[:1] in "('\"[":
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = None
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], str):
            text = value[0]
        elif isinstance(value, str):
            text = value
    for escape in ("\\n", "\\r", "\\t"):
        text = text.replace(escape, " ")
    return " ".join(text.split())


def items_from_folder(root: str) -> tuple[list[Item], int]:
    """Every video under `root`, with the caption of its sibling `<stem>.txt`; also the count without a caption."""
    items, missing = scan_videos(root), 0
    for item in items:
        txt = os.path.splitext(item.file)[0] + ".txt"
        try:
            with open(txt, encoding="utf-8", errors="replace") as f:
                item.extra[CAPTION] = clean_caption(f.read())
        except OSError:
            item.extra[CAPTION] = ""
            missing += 1
    return items, missing


def _relative(root: str, raw: str) -> tuple[str, str]:
    """(path for the CSV, relative to root and '/'-separated; file to read) for a path as listed."""
    raw = raw.strip()
    if os.path.isabs(raw):
        return os.path.relpath(raw, root).replace(os.sep, "/"), raw
    rel = posixpath.normpath(raw.replace("\\", "/"))
    return rel, os.path.join(root, rel)


def items_from_csv(
    csv_file: str,
    root: str,
    video_column: str = "video",
    path_format: Optional[str] = None,
    keep: Optional[Sequence[str]] = None,
) -> tuple[list[Item], list[str], list[tuple[str, str]], int]:
    """Items of a CSV with one video per row: (items, kept columns, rows without a usable path, duplicate rows).

    The video is `row[video_column]`, or `path_format.format(**row)` when given. Kept columns default to every
    column except the video column and the ones this tool computes.
    """
    csv.field_size_limit(1 << 28)  # long captions
    try:
        f = open(csv_file, newline="", encoding="utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"--csv {csv_file}: {e.strerror}") from e
    with f:
        reader = csv.DictReader(f)
        columns = [c for c in (reader.fieldnames or []) if c is not None]
        if not columns:
            raise UsageError(f"--csv {csv_file} is empty")
        if path_format is None and video_column not in columns:
            raise UsageError(
                f"--csv {csv_file} has no column {video_column!r} (columns: {', '.join(columns)}); "
                "set --video_column or --path_format"
            )
        if keep is None:
            keep = [c for c in columns if c != video_column and c not in COLUMNS]
        unknown = [c for c in keep if c not in columns]
        if unknown:
            raise UsageError(f"--keep: no column {', '.join(unknown)} in {csv_file} (columns: {', '.join(columns)})")
        clash = [c for c in keep if c in COLUMNS]
        if clash:
            raise UsageError(f"--keep: {', '.join(clash)} are computed by this tool and cannot be kept")
        items, bad, seen, duplicates = [], [], set(), 0
        for line, row in enumerate(reader, start=2):
            try:
                raw = path_format.format(**row) if path_format else (row.get(video_column) or "")
            except (KeyError, IndexError, ValueError) as e:
                raise UsageError(f"--path_format {path_format!r} does not fit the columns of {csv_file}: {e}") from e
            if not raw.strip():
                bad.append((f"{csv_file}:{line}", "no video path in this row"))
                continue
            path, file = _relative(root, raw)
            if path in seen:
                duplicates += 1
                continue
            seen.add(path)
            items.append(Item(path, file, {c: row.get(c) or "" for c in keep}))
    return items, list(keep), bad, duplicates


def main(argv: Optional[list[str]] = None) -> int:
    parser = OneLineParser(
        prog="convert_webvid.py",
        description="Import a WebVid-style CSV, or a folder of videos with .txt captions, into the training CSV.",
    )
    parser.add_argument("--csv", default=None, help="CSV with one video per row (without it: folder + .txt layout)")
    parser.add_argument("--videos", default=None, help="root of the video paths (default: the CSV's folder)")
    parser.add_argument("--video_column", default="video", help="column holding the video path")
    parser.add_argument(
        "--path_format", default=None, help='video path from the columns, e.g. "{page_dir}/{videoid}.mp4"'
    )
    parser.add_argument("--keep", default=None, help="comma-separated columns to keep (default: all other columns)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    settings, spec = common_from_args(parser, args)
    if args.csv is None and args.videos is None:
        parser.error("give --csv, --videos, or both")
    root = args.videos if args.videos is not None else os.path.dirname(os.path.abspath(args.csv))
    if not os.path.isdir(root):
        parser.error(f"--videos {root} is not a folder")
    keep = None if args.keep is None else [c.strip() for c in args.keep.split(",") if c.strip()]
    bad: list[tuple[str, str]] = []
    try:
        if args.csv is None:
            if args.keep is not None or args.path_format is not None:
                parser.error("--keep and --path_format need --csv")
            items, missing = items_from_folder(root)
            columns = [CAPTION]
            if missing:
                print(f"note: {missing} videos have no .txt caption; their caption is empty")
        else:
            items, columns, bad, duplicates = items_from_csv(args.csv, root, args.video_column, args.path_format, keep)
            if duplicates:
                print(f"note: {duplicates} rows repeat a video listed before; only the first is kept")
        if not items:
            parser.error("no videos listed" if args.csv else f"no videos under {root}")
        stop_on_sigterm()
        result = run(
            items,
            args.out,
            settings,
            spec,
            args.workers,
            extra_columns=columns,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            rejected_before=bad,
        )
    except UsageError as e:
        parser.error(str(e))
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
