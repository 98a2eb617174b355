"""Device and execution-mode set-up: the one place that calls mindspore.set_context."""

from __future__ import annotations

import logging
import os
import random

import mindspore as ms
import numpy as np

logger = logging.getLogger(__name__)

MODES = {0: ms.GRAPH_MODE, 1: ms.PYNATIVE_MODE}


def available_device() -> str:
    """The best device this MindSpore build can use: Ascend, then GPU, then CPU."""
    from mindspore import device_context

    for name, probe in (("Ascend", device_context.ascend), ("GPU", device_context.gpu)):
        try:
            if probe.is_available():
                return name
        except Exception:  # a backend library that is not installed counts as unavailable
            continue
    return "CPU"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    ms.set_seed(seed)


def init_env(
    mode: int = 1,
    device_target: str | None = None,
    seed: int | None = 42,
    debug: bool = False,
    distributed: bool = False,
    max_device_memory: str | None = None,
) -> tuple[int, int]:
    """Set the device (automatic when None), the mode (0 graph, 1 PyNative) and the seed.

    With `distributed`, initialises the communication group and data-parallel gradient averaging.
    Returns (rank_id, device_num).
    """
    if int(mode) not in MODES:
        raise ValueError(f"mode must be 0 (graph) or 1 (PyNative), got {mode}")
    device_target = device_target or available_device()
    ms.set_context(mode=MODES[1 if debug else int(mode)], device_target=device_target)
    if debug or (int(mode) == 1 and device_target == "CPU"):
        # PyNative launches kernels asynchronously from a thread that spins while they run; on the CPU it takes a core
        # from them: with it, a 2048^3 matmul ran at 104 GFLOP/s against 206 synchronously on 2 cores, and the tiny
        # UNet evaluation (benchmarks/bench_unet.py --mode 1) took 1.8 s against 0.22 s.
        ms.set_context(pynative_synchronize=True)
    if max_device_memory and device_target != "CPU":
        ms.set_context(max_device_memory=max_device_memory)
    rank, world = 0, 1
    if distributed:
        from mindspore.communication import get_group_size, get_rank, init

        init()
        rank, world = get_rank(), get_group_size()
        ms.reset_auto_parallel_context()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=world)
    if seed is not None:
        seed_everything(seed)
    logger.info("device %s, mode %s, rank %d of %d, pid %d", device_target, mode, rank, world, os.getpid())
    return rank, world
