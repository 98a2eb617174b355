import mindspore  # must be imported before decord anywhere in the test session
import numpy as np
import pytest

from benchmarks.models import SVD_SCHEDULER_CONFIG  # noqa: F401  (the scheduler config the tests use)

mindspore.set_context(pynative_synchronize=True)  # as modules.env.init_env does on the CPU: much faster there


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


@pytest.fixture(autouse=True, scope="module")
def _restore_execution_mode():
    """Give every test module the execution mode the session started in: a test that switches to graph mode
    (init_env(mode=0)) would otherwise leave it on for the modules after it, whose cells then build and name their
    parameters differently."""
    mode = mindspore.get_context("mode")
    yield
    mindspore.set_context(mode=mode)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
