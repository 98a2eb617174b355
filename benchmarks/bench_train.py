"""Training speed and peak memory of the fine-tuning step, on random clips and random weights.

    python benchmarks/bench_train.py                     # the tiny and the small config, each in a fresh process
    python benchmarks/bench_train.py --config configs/tiny/svd_small.yaml --frames 8 --height 128 --width 128 --mode 0

One step is what train.py does per optimizer step without video decoding: the VAE posterior sample and the
conditioner outside the gradient, then the compiled loss + gradient + AdamW step. The first steps (graph compilation
in mode 0) are timed apart and left out of steps/s. Peak memory is the process's (modules.memory.peak_memory_mb:
device memory on GPU/Ascend, resident memory on CPU), which is why every case runs in its own process.

A reference framework plugs in as another entry of FRAMEWORKS: a function taking the Case and returning a Result
(e.g. diffusers' UNetSpatioTemporalConditionModel with torch.optim.AdamW, built by benchmarks/models.py from the
same config).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

PRESETS = {
    "tiny": dict(config="configs/tiny/svd_tiny.yaml", frames=4, height=64, width=64),
    "small": dict(config="configs/tiny/svd_small.yaml", frames=8, height=128, width=128),
}


@dataclass
class Case:
    config: str
    frames: int
    height: int
    width: int
    mode: int = 0
    batch_size: int = 1
    steps: int = 5
    warmup: int = 2
    temporal_only: bool = True
    accumulation: int = 1
    amp_level: str = "O0"
    recompute: bool = False


@dataclass
class Result:
    framework: str
    device: str
    trainable_params: int
    first_steps_s: float  # the warm-up steps, compilation included
    step_s: float  # mean over the timed steps
    steps_per_s: float
    conditioning_s: float  # of step_s: VAE sample + conditioner, outside the gradient
    peak_memory_mb: float


def random_batch(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    b, t = case.batch_size, case.frames
    frames = rng.uniform(-1, 1, (b, t, 3, case.height, case.width)).astype(np.float32)
    return {
        "frames": frames,
        "cond_frames_without_noise": frames[:, 0].copy(),
        "cond_frames": frames[:, 0] + 0.02 * rng.standard_normal(frames[:, 0].shape, dtype=np.float32),
        "fps_id": np.full((b,), 6.0, np.float32),
        "motion_bucket_id": np.full((b,), 127.0, np.float32),
        "cond_aug": np.full((b,), 0.02, np.float32),
    }


def bench_mindspore(case: Case) -> Result:
    import mindspore as ms
    from mindspore import Tensor

    from modules.env import init_env
    from modules.memory import peak_memory_mb
    from modules.training import (
        OptimizerSettings,
        SchedulerSettings,
        StepSettings,
        Trainer,
        build_training_engine,
        lr_schedule,
        param_count,
        select_trainable,
    )

    init_env(mode=case.mode, seed=0)
    engine = build_training_engine(case.config, None, case.recompute, 0.1)
    rng = np.random.default_rng(0)
    for p in engine.unet.get_parameters():  # fill zero-initialised layers so that every layer gets gradients
        if not p.asnumpy().any():
            p.set_data(Tensor(rng.normal(0.0, 0.02, p.shape).astype(np.float32)))
    if case.amp_level == "O2":
        engine.compute_dtype = ms.float16
    params = select_trainable(engine, case.temporal_only)
    total = (case.warmup + case.steps) * 2
    lr = lr_schedule(SchedulerSettings(name="constant", lr=1e-5), total)
    trainer = Trainer(engine, params, case.frames, lr, OptimizerSettings(),
                      StepSettings(gradient_accumulation_steps=case.accumulation))  # fmt: skip
    batch = random_batch(case, rng)

    def one_step(step: int) -> float:
        """An optimizer step; returns the seconds spent outside the gradient."""
        cond = 0.0
        for micro in range(case.accumulation):
            start = time.perf_counter()
            inputs = trainer.prepare(batch, trainer.rng(step, micro))
            cond += time.perf_counter() - start
            trainer.micro_step(inputs)
        return cond

    start = time.perf_counter()
    for s in range(case.warmup):
        one_step(s)
    first = time.perf_counter() - start
    start = time.perf_counter()
    cond = sum(one_step(case.warmup + s) for s in range(case.steps))
    step_s = (time.perf_counter() - start) / case.steps
    return Result(
        framework="mindspore",
        device=ms.get_context("device_target"),
        trainable_params=param_count(params),
        first_steps_s=first,
        step_s=step_s,
        steps_per_s=1.0 / step_s,
        conditioning_s=cond / case.steps,
        peak_memory_mb=peak_memory_mb(),
    )


FRAMEWORKS: dict[str, Callable[[Case], Result]] = {"mindspore": bench_mindspore}


def describe(case: Case, r: Result) -> str:
    what = f"{os.path.basename(case.config)} {case.batch_size}x{case.frames}x{case.width}x{case.height}"
    how = f"mode {case.mode}, {'temporal' if case.temporal_only else 'full UNet'}, {case.amp_level}"
    return (
        f"{what} | {how} | {r.framework} on {r.device}, {r.trainable_params / 1e6:.2f}M trained | "
        f"first {case.warmup} steps {r.first_steps_s:.1f} s | {r.steps_per_s:.3f} steps/s ({r.step_s:.2f} s/step, "
        f"conditioning {r.conditioning_s:.2f} s) | peak memory {r.peak_memory_mb:.0f} MiB"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="model config; without it, the tiny and small presets run in turn")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--mode", type=int, default=0, help="0: graph mode, 1: PyNative")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation)")
    parser.add_argument("--full_unet", action="store_true", help="train the whole UNet, not only temporal layers")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--amp_level", choices=["O0", "O2"], default="O0")
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--framework", choices=sorted(FRAMEWORKS), default="mindspore")
    parser.add_argument("--json", action="store_true", help="print one JSON object per case instead")
    args = parser.parse_args()
    common = dict(
        mode=args.mode, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
        temporal_only=not args.full_unet, accumulation=args.accumulation, amp_level=args.amp_level,
        recompute=args.recompute,
    )  # fmt: skip

    if args.config is None:  # each preset in a fresh process: peak memory is per process
        for name, preset in PRESETS.items():
            sizes = {k: getattr(args, k) or preset[k] for k in ("frames", "height", "width")}
            flags = [f"--config={preset['config']}"] + [f"--{k}={v}" for k, v in sizes.items()]
            code = subprocess.call([sys.executable, __file__, *flags, *sys.argv[1:]])
            if code:
                print(f"{name}: failed with exit code {code}", file=sys.stderr)
                return code
        return 0

    preset = next((p for p in PRESETS.values() if p["config"] == args.config), {})
    sizes = {k: getattr(args, k) or preset.get(k) for k in ("frames", "height", "width")}
    missing = [k for k, v in sizes.items() if v is None]
    if missing:
        parser.error(f"--{', --'.join(missing)} needed with a config that is not a preset")
    case = Case(config=args.config, **sizes, **common)
    result = FRAMEWORKS[args.framework](case)
    print(json.dumps({"case": asdict(case), "result": asdict(result)}) if args.json else describe(case, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
