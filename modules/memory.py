"""Peak memory of this process: device memory on GPU/Ascend, resident host memory on CPU."""

from __future__ import annotations

import resource
import sys

import mindspore as ms


def peak_memory_mb() -> float:
    """Peak allocated device memory (GPU/Ascend) or peak resident set size of the process (CPU), in MiB."""
    if ms.get_context("device_target") != "CPU":
        try:
            return ms.runtime.max_memory_allocated() / 2**20
        except Exception:  # older runtimes lack the statistic; fall back to host memory
            pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
