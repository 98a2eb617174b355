import mindspore  # noqa: F401  (must be imported before decord anywhere in the test session)
import numpy as np
import pytest

from benchmarks.models import SVD_SCHEDULER_CONFIG  # noqa: F401  (the scheduler config the tests use)


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
