"""One optimizer update of the training step alone: ours (modules.training.Updater: gradient norm, clipping, AdamW
with torch's semantics, in graph mode by default) against torch's clip_grad_norm_ and AdamW, on random gradients.

    python benchmarks/bench_update.py                                  # 100 tensors of 6.5 M values: 650 M, SVD's
                                                                       # temporal layers hold 656 M
    python benchmarks/bench_update.py --tensors 20 --side ours --mode 1
    SVD_CPU_KERNELS=0 python benchmarks/bench_update.py --side ours     # MindSpore's operators, not optim.cc

Both sides: float32, clipping to a norm of 1, lr 1e-5, betas 0.9/0.999, weight decay 0.01; the weights, gradients
and moments are held in memory at once, so the peak is at least 16 bytes per value. The last line is
`ours_s=... ref_s=... ratio=...` (median seconds per update).
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks import harness
from benchmarks.harness import Case, Measurement


def arrays(case: Case) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(weights, gradients): `tensors` float32 arrays of `values` each."""
    rng = np.random.default_rng(0)
    n, size = case.extra["tensors"], case.extra["values"]
    weights = [rng.standard_normal(size, dtype=np.float32) * 0.02 for _ in range(n)]
    grads = [rng.standard_normal(size, dtype=np.float32) * 1e-3 for _ in range(n)]
    return weights, grads


def ours(case: Case) -> Measurement:
    import mindspore as ms
    from mindspore import Parameter, Tensor

    harness.mindspore_setup(case)
    from modules.memory import peak_memory_mb
    from modules.training import OptimizerSettings, StepSettings, Updater

    weights, grads = arrays(case)
    params = [Parameter(Tensor(w), name=f"w{i}") for i, w in enumerate(weights)]
    update = Updater(params, OptimizerSettings(betas=[0.9, 0.999]), set(), StepSettings())
    g = tuple(Tensor(x) for x in grads)
    del weights, grads
    lr = Tensor(1e-5, ms.float32)

    def run():
        return float(update(g, lr)[0].asnumpy())

    times, first = harness.timed(run, case.runs, case.warmup)
    notes = {"kernels": update.use_kernels, "values": case.extra["tensors"] * case.extra["values"]}
    return Measurement(times, first, peak_memory_mb(), notes=notes)


def ref(case: Case) -> Measurement:
    import torch

    harness.torch_setup(case)
    weights, grads = arrays(case)
    params = [torch.nn.Parameter(torch.from_numpy(w)) for w in weights]
    for p, g in zip(params, grads):
        p.grad = torch.from_numpy(g)
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def run():
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(norm)

    times, first = harness.timed(run, case.runs, case.warmup)
    return Measurement(times, first, harness.torch_peak_mb(), notes={"foreach": opt.defaults.get("foreach")})


def describe(case: Case) -> str:
    n, size = case.extra["tensors"], case.extra["values"]
    return f"optimizer update: {n} tensors of {size:,} values ({n * size / 1e6:.0f} M), clipping and AdamW"


if __name__ == "__main__":
    parser = harness.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=100, help="number of trained tensors")
    parser.add_argument("--values", type=int, default=6_500_000, help="values per tensor")
    sys.exit(harness.main(parser, ours, ref, ("tensors", "values"), describe))
