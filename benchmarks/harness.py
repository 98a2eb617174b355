"""Side-by-side benchmarks: ours (MindSpore) against the diffusers/PyTorch reference on the same shapes, dtype and
thread count, each side in a fresh process of its own (peak memory is per process, and one process only ever loads
one framework).

A benchmark script defines a `Case`-building argument parser and two functions, `ours(case)` and `ref(case)`, that
build their side, run it `case.warmup` times untimed (graph compilation), then `case.runs` times, and return a
`Measurement`. `main()` runs both sides as `python SCRIPT --side ours|ref ...`, one after the other (or, with
`--interleave`, both alive at once with their timed runs alternating), and prints:

    side  median_s  min_s  max_s  peak_MiB  GFLOP  GFLOP/s  matmul_GFLOP/s  first_s
    ...
    ours_s=... ref_s=... ratio=...

FLOPs are counted on the reference with torch's FlopCounterMode (both sides compute the same function); matmul
GFLOP/s is a 2048^3 fp32 matmul in each side's framework, measured in the same process, so the achieved GFLOP/s can
be read against what the machine gives.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

PRESETS = {
    "tiny": dict(config="configs/tiny/svd_tiny.yaml", frames=4, height=64, width=64),
    "small": dict(config="configs/tiny/svd_small.yaml", frames=8, height=128, width=128),
    "svd": dict(config="configs/svd.yaml", frames=14, height=128, width=128),
}


@dataclass
class Case:
    config: str
    frames: int
    height: int
    width: int
    mode: int = 0
    runs: int = 3
    warmup: int = 1
    threads: int = 0  # 0: all cores
    extra: dict = field(default_factory=dict)


@dataclass
class Measurement:
    times_s: list[float]
    first_s: float  # the untimed warm-up runs, compilation included
    peak_memory_mb: float
    gflop: float | None = None  # counted on the reference side
    matmul_gflops: float | None = None
    notes: dict = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


class _Turns:
    """An interleaved worker's timed calls: after the warm-up it prints READY, then runs one call per `run` line on
    stdin and answers `TIME seconds`, until `done`."""

    def __init__(self):
        self.claimed = False

    def run(self, fn: Callable[[], object], sync: Callable[[object], object]) -> list[float]:
        print("READY", flush=True)
        times = []
        for line in sys.stdin:
            if line.strip() != "run":
                break
            start = time.perf_counter()
            sync(fn())
            times.append(time.perf_counter() - start)
            print(f"TIME {times[-1]}", flush=True)
        return times


_turns: _Turns | None = None  # set in an interleaved worker; its first `timed` call takes turns


def timed(fn: Callable[[], object], runs: int, warmup: int, sync: Callable[[object], object] = lambda r: r):
    """(times of `runs` calls, seconds of the `warmup` calls before them); `sync` waits for a result. In an
    interleaved worker (`--interleave`), the first call's timed runs are the ones the parent asks for."""
    start = time.perf_counter()
    for _ in range(warmup):
        sync(fn())
    first = time.perf_counter() - start
    if _turns is not None and not _turns.claimed:
        _turns.claimed = True
        return _turns.run(fn, sync), first
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return times, first


def time_our_calls(case: Case, calls: list[tuple[Callable, tuple, int]]) -> Measurement:
    """Ours timed on operator calls alone: one run calls each (cell, inputs, count) of `calls` `count` times, in
    order; reading the last (small) output back waits for them all."""
    from modules.memory import peak_memory_mb

    def run():
        for cell, args, count in calls:
            for _ in range(count):
                y = cell(*args)
        return y.asnumpy()

    times, first = timed(run, case.runs, case.warmup)
    return Measurement(times, first, peak_memory_mb(), matmul_gflops=mindspore_matmul_gflops())


def time_ref_calls(case: Case, calls: list[tuple[Callable, tuple, int]], gflop: float) -> Measurement:
    """The reference side of `time_our_calls`, under torch.inference_mode; `gflop` is what one run computes."""
    import torch

    def run():
        with torch.inference_mode():
            for fn, args, count in calls:
                for _ in range(count):
                    y = fn(*args)
        return y

    times, first = timed(run, case.runs, case.warmup)
    return Measurement(times, first, torch_peak_mb(), gflop=gflop, matmul_gflops=torch_matmul_gflops())


def timed_after_build(fn: Callable[[], object], runs: int, warmup: int, build_peak_mb: float):
    """`timed`, with the peak memory of the calls alone: (times, warmup seconds, notes). On Linux the notes hold
    `generation_peak_mb` (the peak count restarted before the calls, so what is held then still counts) and
    `build_peak_mb`; elsewhere they are empty."""
    reset = reset_peak_rss()
    times, first = timed(fn, runs, warmup)
    notes = dict(generation_peak_mb=round(peak_rss_mb()), build_peak_mb=round(build_peak_mb)) if reset else {}
    return times, first, notes


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(threads: int) -> int:
    """Pin the intra-op thread count of both frameworks (before either is imported)."""
    n = threads or cpu_count()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    return n


def torch_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Restart the kernel's peak resident size count (VmHWM) from the current size; Linux only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """Peak resident size since the last `reset_peak_rss` (or the start), in MiB; None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def log_memory(what: str) -> None:
    """One line on stderr with the process's resident and peak resident size (Linux), for a side that may be killed
    for memory: the harness shows the end of a failed side's stderr."""
    sizes = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    sizes[line[:5]] = int(line.split()[1]) / 2**20
    except OSError:
        return
    sys.stderr.write(f"memory {what}: {sizes.get('VmRSS', 0):.2f} GiB resident, peak {sizes.get('VmHWM', 0):.2f} GiB\n")
    sys.stderr.flush()


def torch_matmul_gflops(n: int = 2048, runs: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b, runs, 0)[0])
    return 2 * n**3 / best / 1e9


def mindspore_matmul_gflops(n: int = 2048, runs: int = 5) -> float:
    import numpy as np
    from mindspore import Tensor, ops

    a = Tensor(np.random.randn(n, n).astype(np.float32))
    b = Tensor(np.random.randn(n, n).astype(np.float32))
    ops.matmul(a, b).asnumpy()
    best = min(timed(lambda: ops.matmul(a, b), runs, 0, lambda r: r.asnumpy())[0])
    return 2 * n**3 / best / 1e9


def count_flops(fn: Callable[[], object]) -> float:
    """GFLOP of one call, by torch's FlopCounterMode (matmuls and convolutions, as the usual convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def torch_setup(case: Case) -> None:
    import torch

    torch.set_num_threads(case.threads or cpu_count())
    torch.manual_seed(0)


def mindspore_setup(case: Case) -> None:
    import mindspore as ms

    from modules.env import init_env

    init_env(mode=case.mode, seed=0)
    ms.set_context(runtime_num_threads=case.threads or cpu_count())


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="shapes: tiny, small or real SVD")
    p.add_argument("--config", help="model config (default: the preset's)")
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int, help="pixels")
    p.add_argument("--width", type=int, help="pixels")
    p.add_argument("--mode", type=int, default=0, help="ours: 0 graph mode, 1 PyNative")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads of both sides (0: all cores)")
    p.add_argument("--side", choices=["ours", "ref", "both"], default="both")
    p.add_argument("--json", action="store_true", help="print the measurements as one JSON line")
    p.add_argument(
        "--interleave", action="store_true",
        help="keep both sides' processes alive (both sides' memory at once) and alternate their timed runs, so that "
        "a change in the machine's load falls on both",
    )  # fmt: skip
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # an interleaved worker
    return p


def case_from_args(args: argparse.Namespace, extra_keys: tuple[str, ...] = ()) -> Case:
    preset = PRESETS[args.preset]
    return Case(
        config=args.config or preset["config"],
        frames=args.frames or preset["frames"],
        height=args.height or preset["height"],
        width=args.width or preset["width"],
        mode=args.mode,
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        extra={k: getattr(args, k) for k in extra_keys},
    )


def _row(name: str, m: Measurement, gflop: float | None) -> str:
    rate = f"{gflop / m.median_s:8.1f}" if gflop else "       -"
    mm = f"{m.matmul_gflops:8.1f}" if m.matmul_gflops else "       -"
    return (
        f"{name:5s} {m.median_s:9.3f} {min(m.times_s):7.3f} {max(m.times_s):7.3f} {m.peak_memory_mb:9.0f} "
        f"{f'{gflop:8.1f}' if gflop else '       -'} {rate} {mm} {m.first_s:8.1f}"
    )


def _worker(side: str, *extra: str) -> list[str]:
    argv = [a for a in sys.argv[1:] if not a.startswith("--side") and a != "--interleave"]
    return [sys.executable, sys.argv[0], *argv, f"--side={side}", *extra]


def _result(side: str, code: int, out: str, err: str) -> Measurement:
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if code or not lines:
        sys.stderr.write(out[-3000:] + err[-3000:])
        raise RuntimeError(f"the {side} side failed (exit code {code})")
    return Measurement(**json.loads(lines[-1][len("RESULT ") :]))


def _one_after_the_other() -> dict[str, Measurement]:
    results = {}
    for side in ("ours", "ref"):
        proc = subprocess.run(_worker(side), capture_output=True, text=True, env=dict(os.environ, GLOG_v="3"))
        results[side] = _result(side, proc.returncode, proc.stdout, proc.stderr)
    return results


def _interleaved(runs: int) -> dict[str, Measurement]:
    """Both workers built and warmed up side by side, then their timed runs in alternation (ours first in even
    rounds, the reference first in odd ones); the idle one waits on its stdin."""
    import tempfile

    procs, logs = {}, {}
    try:
        for side in ("ours", "ref"):
            logs[side] = tempfile.TemporaryFile("w+")
            procs[side] = subprocess.Popen(
                _worker(side, "--serve"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[side],
                text=True, env=dict(os.environ, GLOG_v="3"),
            )  # fmt: skip
            _expect(procs[side], "READY", side, logs[side])  # one build at a time: the peaks stay apart
        for i in range(runs):
            for side in ("ours", "ref") if i % 2 == 0 else ("ref", "ours"):
                procs[side].stdin.write("run\n")
                procs[side].stdin.flush()
                _expect(procs[side], "TIME", side, logs[side])
        results = {}
        for side, proc in procs.items():
            out, _ = proc.communicate("done\n")
            logs[side].seek(0)
            results[side] = _result(side, proc.returncode, out, logs[side].read())
        return results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        for log in logs.values():
            log.close()


def _expect(proc: subprocess.Popen, word: str, side: str, log) -> str:
    """Read a worker's stdout up to the line starting with `word`."""
    for line in proc.stdout:
        if line.startswith(word):
            return line
    proc.wait()
    log.seek(0)
    sys.stderr.write(log.read()[-3000:])
    raise RuntimeError(f"the {side} side failed (exit code {proc.returncode})")


def main(
    parser: argparse.ArgumentParser,
    ours: Callable[[Case], Measurement],
    ref: Callable[[Case], Measurement],
    extra_keys: tuple[str, ...] = (),
    describe: Callable[[Case], str] | None = None,
) -> int:
    args = parser.parse_args()
    case = case_from_args(args, extra_keys)
    if args.side != "both":  # a worker: one side, one process
        global _turns
        _turns = _Turns() if args.serve else None
        set_threads(case.threads)
        m = (ours if args.side == "ours" else ref)(case)
        print("RESULT " + json.dumps(asdict(m)), flush=True)
        return 0

    try:
        results = _interleaved(case.runs) if args.interleave else _one_after_the_other()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    o, r = results["ours"], results["ref"]
    gflop = r.gflop
    print(describe(case) if describe else f"{case.config} {case.frames}x{case.height}x{case.width}")
    print(f"threads {case.threads or cpu_count()}, ours in mode {case.mode}, fp32, {case.runs} timed runs each")
    print("side   median_s   min_s   max_s  peak_MiB    GFLOP  GFLOP/s  mm_GF/s  first_s")
    print(_row("ours", o, gflop))
    print(_row("ref", r, gflop))
    if gflop and o.matmul_gflops:
        print(f"ours reach {gflop / o.median_s / o.matmul_gflops:.0%} of their matmul GFLOP/s")
    for name, m in (("ours", o), ("ref", r)):
        if m.notes:
            print(f"{name} notes: " + ", ".join(f"{k}={v}" for k, v in m.notes.items()))
    if args.json:
        print(json.dumps({"case": asdict(case), "ours": asdict(o), "ref": asdict(r)}))
    if args.interleave:  # run i of each side shared the machine's state
        paired = [a / b for a, b in zip(o.times_s, r.times_s)]
        print("paired ratios " + " ".join(f"{x:.3f}" for x in paired) + f", median {statistics.median(paired):.3f}")
    print(f"ours_s={o.median_s:.3f} ref_s={r.median_s:.3f} ratio={o.median_s / r.median_s:.3f}")
    return 0
