"""Building blocks against PyTorch on random inputs and random affine parameters."""

import os
import shutil

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor

from modules import kernels
from modules.layers import GELU, GroupNorm


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize(
    "shape, groups, silu", [((2, 32, 6, 5), 8, False), ((1, 16, 3, 4, 5), 4, True), ((2, 8, 7), 1, True)]
)
def test_group_norm_matches_torch_with_its_affine_and_gradients(mode, shape, groups, silu):
    """GroupNorm, alone or with its SiLU fused in (the compiled kernel where it builds)."""
    ms.set_context(mode=mode)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 1
    weight = rng.standard_normal(shape[1]).astype(np.float32)
    bias = rng.standard_normal(shape[1]).astype(np.float32)
    ours = GroupNorm(groups, shape[1], eps=1e-6, silu=silu)
    ours.weight.set_data(Tensor(weight))
    ours.bias.set_data(Tensor(bias))
    ref = torch.nn.GroupNorm(groups, shape[1], eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(weight))
        ref.bias.copy_(torch.from_numpy(bias))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = torch.nn.functional.silu(ref(xt)) if silu else ref(xt)
    np.testing.assert_allclose(ours(Tensor(x)).asnumpy(), yt.detach().numpy(), rtol=1e-4, atol=1e-4)

    # gradients for the input and both affine parameters, through a weighted sum
    w = rng.standard_normal(shape).astype(np.float32)
    (yt * torch.from_numpy(w)).sum().backward()

    def loss(inp):
        return (ours(inp) * Tensor(w)).sum()

    grad_fn = ms.value_and_grad(loss, 0, ours.trainable_params())
    _, (gx, (gw, gb)) = grad_fn(Tensor(x))
    np.testing.assert_allclose(gx.asnumpy(), xt.grad.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(gw.asnumpy(), ref.weight.grad.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(gb.asnumpy(), ref.bias.grad.numpy(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_its_gradient_match_torch(mode, approximate):
    ms.set_context(mode=mode)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 40, 17)) * 3).astype(np.float32)  # well into both tails
    w = rng.standard_normal(x.shape).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = torch.nn.functional.gelu(xt, approximate=approximate)
    (yt * torch.from_numpy(w)).sum().backward()
    ours = GELU(approximate)

    def loss(inp):
        return (ours(inp) * Tensor(w)).sum()

    np.testing.assert_allclose(ours(Tensor(x)).asnumpy(), yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    gx = ms.grad(loss)(Tensor(x))
    np.testing.assert_allclose(gx.asnumpy(), xt.grad.numpy(), rtol=1e-5, atol=1e-5)
    # half-precision inputs (mixed precision) get a gradient of their own dtype
    g16 = ms.grad(loss)(Tensor(x, ms.float16))
    assert g16.dtype == ms.float16
    np.testing.assert_allclose(g16.asnumpy().astype(np.float32), xt.grad.numpy(), rtol=1e-2, atol=2e-2)


def _gelu_cells(monkeypatch, kernel: bool):
    """GELU and GEGLU built with the compiled kernels or with MindSpore's own operators."""
    from modules.attention import GEGLU

    monkeypatch.setenv("SVD_CPU_KERNELS", "1" if kernel else "0")
    gelu, geglu = GELU(), GEGLU(6, 5)
    assert (gelu.kernel is not None) == kernel and (geglu.kernel is not None) == kernel
    return gelu, geglu


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU kernels need g++")
def test_cpu_kernels_build_into_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels.library.cache_clear()
    try:
        path = kernels.library()
        assert path is not None and os.path.dirname(path) == str(tmp_path / "svd_mindspore")
        assert os.listdir(tmp_path / "svd_mindspore") == [os.path.basename(path)]  # no temporary file left
    finally:
        kernels.library.cache_clear()


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU kernels need g++")
@pytest.mark.parametrize("mode", [0, 1])
def test_gelu_kernels_agree_with_mindspores_own_operators(monkeypatch, mode):
    """GELU and GEGLU, outputs and gradients: the compiled kernels against the fallback, on a transposed input too
    (PyNative may hand the kernel a view)."""
    ms.set_context(mode=mode)
    rng = np.random.default_rng(2)
    x = Tensor((rng.standard_normal((4, 7, 10)) * 3).astype(np.float32))
    xt = Tensor((rng.standard_normal((10, 7, 4)) * 3).astype(np.float32)).transpose(2, 1, 0)
    big = Tensor((rng.standard_normal(((1 << 20) // 5 + 1, 10)) * 3).astype(np.float32))  # all threads for both
    fast, slow = _gelu_cells(monkeypatch, True), _gelu_cells(monkeypatch, False)
    slow[1].proj.weight.set_data(fast[1].proj.weight.value())
    slow[1].proj.bias.set_data(fast[1].proj.bias.value())
    for k, inp in ((0, x), (0, xt), (1, x[..., :6]), (0, big), (1, big[:, :6])):
        ours, ref = fast[k], slow[k]
        # outputs up to about 15: a few float32 ulps
        np.testing.assert_allclose(ours(inp).asnumpy(), ref(inp).asnumpy(), rtol=1e-5, atol=1e-5)
        g_ours = ms.grad(ours)(inp).asnumpy()
        g_ref = ms.grad(ref)(inp).asnumpy()
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-5)
        if k == 1:  # the projection's weight and bias (the kernel adds the bias itself)
            for a, b in zip(
                ms.grad(ours, None, ours.trainable_params())(inp), ms.grad(ref, None, ref.trainable_params())(inp)
            ):
                np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU kernels need g++")
@pytest.mark.parametrize("mode", [0, 1])
def test_group_norm_kernel_agrees_with_mindspores_own_operators(monkeypatch, mode):
    """GroupNorm with and without SiLU, affine or not, on 4-D and 5-D inputs, a float16 input and a transposed view:
    the compiled kernel against the fallback, outputs and gradients."""
    ms.set_context(mode=mode)
    rng = np.random.default_rng(3)
    x4 = Tensor((rng.standard_normal((3, 12, 5, 7)) * 2 - 1).astype(np.float32))
    x5 = Tensor((rng.standard_normal((2, 12, 4, 3, 5)) * 2 + 1).astype(np.float32))
    view = Tensor(rng.standard_normal((7, 5, 12, 3)).astype(np.float32)).transpose(3, 2, 1, 0)
    for silu, affine in ((True, True), (False, True), (True, False)):
        cells = []
        for kernel in (True, False):
            monkeypatch.setenv("SVD_CPU_KERNELS", "1" if kernel else "0")
            cells.append(GroupNorm(4, 12, eps=1e-6, affine=affine, silu=silu))
            assert (cells[-1].kernel is not None) == kernel
        fast, slow = cells
        if affine:
            for p, q in zip(fast.trainable_params(), slow.trainable_params()):
                values = rng.standard_normal(p.shape).astype(np.float32)
                p.set_data(Tensor(values))
                q.set_data(Tensor(values))
        for inp in (x4, x5, view, x4.astype(ms.float16)):
            y = fast(inp)
            assert y.dtype == inp.dtype and y.shape == inp.shape
            tol = 2e-3 if inp.dtype == ms.float16 else 1e-5
            np.testing.assert_allclose(y.asnumpy(), slow(inp).asnumpy(), rtol=tol, atol=tol)
            if affine:
                g_fast, (*g_fast_params,) = ms.grad(fast, 0, fast.trainable_params())(inp)
                g_slow, (*g_slow_params,) = ms.grad(slow, 0, slow.trainable_params())(inp)
            else:
                g_fast, g_slow, g_fast_params, g_slow_params = ms.grad(fast)(inp), ms.grad(slow)(inp), [], []
            assert g_fast.dtype == inp.dtype and len(g_fast_params) == (2 if affine else 0)
            for a, b in zip([g_fast, *g_fast_params], [g_slow, *g_slow_params]):
                np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=10 * tol, atol=10 * tol)


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU kernels need g++")
def test_group_norm_kernel_on_all_threads_matches_float64(monkeypatch):
    """Over 2^20 values (the kernel's threads share the work): GroupNorm + SiLU and its input gradient against torch
    in float64. The kernel sums in double; MindSpore's own float32 LayerNorm gradient is off by about 1e-4 on these
    132,096-value groups, so the fallback is no reference here."""
    monkeypatch.setenv("SVD_CPU_KERNELS", "1")
    ms.set_context(mode=0)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 12, 256, 172)).astype(np.float32)
    weight, bias = rng.standard_normal(12).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    xt = torch.from_numpy(x).double().requires_grad_(True)
    w, b = torch.from_numpy(weight).double(), torch.from_numpy(bias).double()
    yt = torch.nn.functional.silu(torch.nn.functional.group_norm(xt, 4, w, b, 1e-6))
    yt.sum().backward()
    ours = GroupNorm(4, 12, eps=1e-6, silu=True)
    assert ours.kernel is not None
    ours.weight.set_data(Tensor(weight))
    ours.bias.set_data(Tensor(bias))
    np.testing.assert_allclose(ours(Tensor(x)).asnumpy(), yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ms.grad(ours)(Tensor(x)).asnumpy(), xt.grad.numpy(), rtol=1e-5, atol=1e-5)


class _WeightedSum(ms.nn.Cell):
    """sum(cell(x) * w): its gradients are the cell's gradients for an output gradient of w."""

    def __init__(self, cell, w):
        super().__init__()
        self.cell, self.w = cell, w

    def construct(self, x):
        return (self.cell(x).astype(ms.float32) * self.w).sum()


def _conv_cases():
    """(cell arguments, input shape): the geometries of the UNet and the VAE, and a grouped one."""
    return [
        (dict(kernel_size=3, padding=1), (2, 6, 9, 7)),
        (dict(kernel_size=3, padding=1), (2, 6, 48, 48)),  # pixels enough for Winograd (on CPUs where oneDNN has it)
        (dict(kernel_size=3, padding=1), (3, 6, 2, 2)),  # the UNet's 2x2 level: the kernel's one-GEMM path
        (dict(kernel_size=3, padding=1), (2, 6, 1, 1)),
        (dict(kernel_size=3, stride=2, padding=1), (2, 6, 4, 3)),  # 2x2 outputs through a stride
        (dict(kernel_size=3, stride=2, padding=(0, 1, 0, 1)), (3, 6, 10, 11)),  # the VAE encoder's downsampling
        (dict(kernel_size=3, stride=2, padding=1), (1, 6, 8, 8)),  # the UNet's
        (dict(kernel_size=1), (2, 6, 5, 6)),
        (dict(kernel_size=1, bias=False), (2, 6, 5, 6)),
        (dict(kernel_size=3, padding=1, groups=2), (2, 6, 6, 5)),
    ]


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("kernel", ["chunked", True, False])
def test_convolutions_match_torch_with_their_gradients(monkeypatch, mode, kernel):
    """Conv2d in every geometry the networks use and TemporalConv, with the oneDNN kernel (where it builds; also with
    a memory bound that makes it run one sample, and for TemporalConv one column, at a time) and without: outputs
    and the gradients of input, weight and bias against torch in float64, on float32, float16 and transposed-view
    inputs. All geometries run in one process, so each must keep its own output shape."""
    from modules.layers import Conv2d, TemporalConv

    ms.set_context(mode=mode)
    monkeypatch.setenv("SVD_CPU_KERNELS", "1" if kernel else "0")
    if kernel == "chunked":
        monkeypatch.setenv("SVD_CONV_CHUNK_BYTES", "1")  # one sample at a time, TemporalConv one column
    rng = np.random.default_rng(5)
    cases = [(Conv2d(6, 4, **kw), shape) for kw, shape in _conv_cases()]
    cases.append((Conv2d(16, 24, 3, padding=1), (3, 16, 4, 4)))  # channels enough for the kernel's own Winograd
    cases.append((TemporalConv(6, 4, (3, 1, 1)), (2, 6, 5, 3, 4)))
    cases.append((TemporalConv(6, 4, (3, 1, 1)), (1, 6, 5, 2, 3)))  # one clip, as the VAE decoder gives it
    # channels enough for the kernel's Winograd F(2, 3) along time: an odd and an even number of frames, and one
    cases.append((TemporalConv(64, 72, (3, 1, 1)), (2, 64, 5, 2, 3)))
    cases.append((TemporalConv(72, 64, (3, 1, 1)), (1, 72, 4, 3, 2)))
    cases.append((TemporalConv(64, 64, (3, 1, 1)), (2, 64, 1, 2, 2)))
    for cell, shape in cases:
        assert (cell.conv.kernel is not None) == (kernel and kernels.onednn_library() is not None)
        for p in cell.trainable_params():
            p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32)))
        x = rng.standard_normal(shape).astype(np.float32)
        xt = torch.from_numpy(x).double().requires_grad_(True)
        weight = torch.from_numpy(cell.weight.asnumpy()).double().requires_grad_(True)
        bias = torch.from_numpy(cell.bias.asnumpy()).double().requires_grad_(True) if cell.has_bias else None
        if isinstance(cell, TemporalConv):
            yt = torch.nn.functional.conv3d(xt, weight, bias, padding=(1, 0, 0))
        else:
            pt, pb, pl, pr = (cell.conv.pad,) * 4 if isinstance(cell.conv.pad, int) else cell.conv.pad
            xp = torch.nn.functional.pad(xt, (pl, pr, pt, pb))
            yt = torch.nn.functional.conv2d(xp, weight, bias, stride=cell.conv.stride, groups=cell.conv.groups)
        dy = rng.standard_normal(tuple(yt.shape)).astype(np.float32)
        (yt * torch.from_numpy(dy).double()).sum().backward()

        loss, params = _WeightedSum(cell, Tensor(dy)), cell.trainable_params()
        view = Tensor(np.ascontiguousarray(np.moveaxis(x, 0, -1))).transpose((len(shape) - 1, *range(len(shape) - 1)))
        for inp, tol in ((Tensor(x), 1e-4), (view, 1e-4), (Tensor(x).astype(ms.float16), 3e-2)):
            y = cell(inp)
            assert y.dtype == inp.dtype and y.shape == tuple(yt.shape)
            np.testing.assert_allclose(y.asnumpy().astype(np.float64), yt.detach().numpy(), rtol=tol, atol=tol)
            dx, grads = ms.grad(loss, 0, params)(inp)
            want = [xt.grad, weight.grad] + ([bias.grad] if bias is not None else [])
            for ours, ref in zip([dx, *grads], want):
                np.testing.assert_allclose(ours.asnumpy().astype(np.float64), ref.numpy(), rtol=10 * tol, atol=10 * tol)


def _assert_padded_conv_matches_torch(cell, x: np.ndarray) -> None:
    """cell(x) against torch's convolution with one pixel of padding on every side, in float64."""
    want = torch.nn.functional.conv2d(
        torch.from_numpy(x).double(),
        torch.from_numpy(cell.weight.asnumpy()).double(),
        torch.from_numpy(cell.bias.asnumpy()).double(),
        padding=1,
    )
    np.testing.assert_allclose(cell(Tensor(x)).asnumpy(), want.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("setting", ["0", "1", None])
def test_convolution_algorithms_match_torch(monkeypatch, setting):
    """The kernel's 3x3 convolutions with Winograd's algorithm off, on (where oneDNN has it), and as the kernel
    chooses, and its temporal convolutions with and without the F(2, 3) along time: each output against torch's in
    float64."""
    from modules.layers import Conv2d, TemporalConv

    if kernels.onednn_library() is None:
        pytest.skip("no oneDNN kernel on this machine")
    ms.set_context(mode=1)
    monkeypatch.setenv("SVD_CPU_KERNELS", "1")
    if setting is None:
        monkeypatch.delenv("SVD_CONV_WINOGRAD", raising=False)
    else:
        monkeypatch.setenv("SVD_CONV_WINOGRAD", setting)
    rng = np.random.default_rng(11)
    cell = Conv2d(64, 64, 3, padding=1)
    for shape in [(2, 64, 12, 12), (3, 64, 8, 4)]:
        x = rng.standard_normal(shape).astype(np.float32)
        _assert_padded_conv_matches_torch(cell, x)
    temporal = TemporalConv(64, 80, (3, 1, 1))  # Winograd F(2, 3) along time unless SVD_CONV_WINOGRAD=0
    for shape in [(2, 64, 14, 4, 4), (1, 64, 7, 3, 5)]:
        x = rng.standard_normal(shape).astype(np.float32)
        want = torch.nn.functional.conv3d(
            torch.from_numpy(x).double(),
            torch.from_numpy(temporal.weight.asnumpy()).double(),
            torch.from_numpy(temporal.bias.asnumpy()).double(),
            padding=(1, 0, 0),
        )
        np.testing.assert_allclose(temporal(Tensor(x)).asnumpy(), want.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", ["0", "1"])
def test_small_image_winograd_matches_torch(monkeypatch, fused):
    """3x3 convolutions of images of at most 16 pixels, which the kernel runs as its own Winograd F(4x4, 3x3) (F(2x2,
    3x3) at 2x2) where built with AVX-512, and with that off: against torch in float64. The cases cover one and
    several tiles per image, images that end inside a tile, more samples than one vector of columns, more input
    channels than one block and output channels that are no multiple of the register block."""
    from modules.layers import Conv2d

    if kernels.onednn_library() is None:
        pytest.skip("no oneDNN kernel on this machine")
    ms.set_context(mode=1)
    monkeypatch.setenv("SVD_CPU_KERNELS", "1")
    monkeypatch.setenv("SVD_CONV_FUSED", fused)
    rng = np.random.default_rng(13)
    for c, o, shape in [
        (48, 40, (3, 48, 4, 4)),
        (64, 72, (20, 64, 2, 2)),
        (32, 30, (5, 32, 3, 4)),
        (160, 24, (2, 160, 4, 3)),
        (16, 16, (1, 16, 1, 1)),
        (32, 33, (37, 32, 2, 3)),
    ]:
        cell = Conv2d(c, o, 3, padding=1)
        x = rng.standard_normal(shape).astype(np.float32)
        _assert_padded_conv_matches_torch(cell, x)


@pytest.mark.skipif(" avx512f" not in kernels._cpu_flags(), reason="the kernel's own Winograd needs AVX-512")
def test_small_image_winograd_is_the_one_that_runs(monkeypatch):
    """SVD_CONV_FUSED switches the 4x4 and 2x2 convolutions between the kernel's Winograd and oneDNN's algorithms:
    their outputs agree to rounding but not bit for bit, so the switch reaches a different computation."""
    from modules.layers import Conv2d

    if kernels.onednn_library() is None:
        pytest.skip("no oneDNN kernel on this machine")
    ms.set_context(mode=1)
    monkeypatch.setenv("SVD_CPU_KERNELS", "1")
    rng = np.random.default_rng(17)
    cell = Conv2d(64, 64, 3, padding=1)
    for shape in [(4, 64, 4, 4), (4, 64, 2, 2)]:
        x = Tensor(rng.standard_normal(shape).astype(np.float32))
        outs = []
        for fused in ("1", "0"):
            monkeypatch.setenv("SVD_CONV_FUSED", fused)
            outs.append(cell(x).asnumpy())
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)
        assert not np.array_equal(outs[0], outs[1])


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU kernels need g++")
def test_convolution_kernel_builds_against_mindspores_own_onednn():
    """The requirements install oneDNN's headers of MindSpore's version, so the kernel builds; and it runs on the
    libdnnl that MindSpore ships, not on another 2.x copy of the same soname (two copies of one library in one
    process would not agree on their global state). The only other oneDNN is the fully connected layers' oneDNN 3,
    a library of another soname."""
    import ctypes

    path = kernels.onednn_library()
    assert path is not None
    ctypes.CDLL(path)
    with open("/proc/self/maps") as f:
        loaded = {os.path.realpath(line.split()[-1]) for line in f if "libdnnl" in line}
    assert {p for p in loaded if ".so.2" in p} == {
        os.path.realpath(os.path.join(os.path.dirname(ms.__file__), "lib", "libdnnl.so.2"))
    }
    assert {p for p in loaded if ".so.2" not in p} <= {os.path.realpath(kernels._dnnl3() or "")}


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("kernel", [True, False])
def test_layer_norm_matches_torch_with_its_gradients(monkeypatch, mode, kernel):
    """LayerNorm over the last axis of 2-D and 3-D inputs, affine or not, with the kernel and without: output and
    the gradients of input, weight and bias against torch in float64."""
    from modules.layers import LayerNorm

    ms.set_context(mode=mode)
    monkeypatch.setenv("SVD_CPU_KERNELS", "1" if kernel else "0")
    rng = np.random.default_rng(6)
    # the last shape has enough values for the gradient kernel to split its rows between threads
    for shape, affine in (((7, 12), True), ((2, 5, 12), True), ((3, 4, 12), False), ((2, 1400, 384), True)):
        cell = LayerNorm(shape[-1], eps=1e-6, affine=affine)
        assert (cell.kernel is not None) == kernel
        for p in cell.trainable_params():
            p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32)))
        x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        xt = torch.from_numpy(x).double().requires_grad_(True)
        params = [torch.from_numpy(p.asnumpy()).double().requires_grad_(True) for p in cell.trainable_params()]
        yt = torch.nn.functional.layer_norm(xt, shape[-1:], *(params or [None, None]), eps=1e-6)
        (yt * torch.from_numpy(dy).double()).sum().backward()
        np.testing.assert_allclose(cell(Tensor(x)).asnumpy(), yt.detach().numpy(), rtol=1e-5, atol=1e-5)
        dx, grads = ms.grad(_WeightedSum(cell, Tensor(dy)), 0, cell.trainable_params())(Tensor(x))
        for ours, ref in zip([dx, *grads], [xt.grad] + [p.grad for p in params]):
            np.testing.assert_allclose(ours.asnumpy(), ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("kernel", ["dnnl3", "dnnl2", None])
def test_linear_matches_torch_with_its_gradients(monkeypatch, mode, kernel):
    """Linear with oneDNN 3's matmul (`matmul.cc`), with oneDNN 2.2's (`onednn.cc`) and with MindSpore's MatMul:
    2-D, 3-D and 4-D inputs, with and without bias, on float32, float16 and transposed-view inputs; output and the
    gradients of input, weight and bias against torch in float64. The shapes differ in every axis, so a swapped
    dimension cannot pass."""
    from modules.layers import Linear

    ms.set_context(mode=mode)
    monkeypatch.setenv("SVD_LINEAR_KERNEL", "1" if kernel else "0")
    monkeypatch.setenv("SVD_LINEAR_DNNL3", "0" if kernel == "dnnl2" else "1")
    if kernel is not None and shutil.which("g++") is None:
        pytest.skip("the CPU kernels need g++")
    library = {"dnnl3": kernels.matmul_library, "dnnl2": kernels.onednn_library, None: lambda: None}[kernel]()
    assert (library is None) == (kernel is None)
    rng = np.random.default_rng(7)
    for shape, out, bias in (((5, 6), 4, True), ((2, 3, 6), 7, True), ((2, 3, 4, 6), 5, False)):
        cell = Linear(shape[-1], out, bias=bias)
        assert (cell.kernel is None) == (kernel is None)
        if kernel is not None:
            assert cell.kernel.func.startswith(library + ":Linear")
        for p in cell.trainable_params():
            p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32)))
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape[:-1] + (out,)).astype(np.float32)
        xt = torch.from_numpy(x).double().requires_grad_(True)
        params = [torch.from_numpy(p.asnumpy()).double().requires_grad_(True) for p in cell.trainable_params()]
        yt = torch.nn.functional.linear(xt, *params)
        (yt * torch.from_numpy(dy).double()).sum().backward()
        loss = _WeightedSum(cell, Tensor(dy))
        view = Tensor(np.ascontiguousarray(np.moveaxis(x, -1, 0))).transpose((*range(1, len(shape)), 0))
        for inp, tol in ((Tensor(x), 1e-5), (view, 1e-5), (Tensor(x).astype(ms.float16), 3e-2)):
            y = cell(inp)
            assert y.dtype == inp.dtype and y.shape == tuple(yt.shape)
            np.testing.assert_allclose(y.asnumpy().astype(np.float64), yt.detach().numpy(), rtol=tol, atol=tol)
            dx, grads = ms.grad(loss, 0, cell.trainable_params())(inp)
            for ours, ref in zip([dx, *grads], [xt.grad] + [p.grad for p in params]):
                np.testing.assert_allclose(ours.asnumpy().astype(np.float64), ref.numpy(), rtol=10 * tol, atol=10 * tol)


class _WithResidual(ms.nn.Cell):
    def __init__(self, cell, w):
        super().__init__()
        self.cell, self.w = cell, w

    def construct(self, x, residual):
        return (self.cell.with_residual(x, residual) * self.w).sum()


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("kernel", ["fused", "add"])
def test_linear_with_residual_matches_torch_with_its_gradients(monkeypatch, mode, kernel):
    """Linear.with_residual (x W^T + b + r) with the residual in oneDNN 3's matmul epilogue, and as a separate
    addition (SVD_RESIDUAL_FUSED=0), on 2-D and 3-D inputs whose rows exceed one thread's share: output and the
    gradients of input, residual, weight and bias against torch in float64."""
    from modules.layers import Linear

    ms.set_context(mode=mode)
    monkeypatch.setenv("SVD_LINEAR_KERNEL", "1")
    monkeypatch.setenv("SVD_RESIDUAL_FUSED", "1" if kernel == "fused" else "0")
    fused = kernel == "fused" and shutil.which("g++") is not None and kernels.matmul_library() is not None
    rng = np.random.default_rng(11)
    for shape, out in (((5, 6), 4), ((3, 700, 24), 40)):
        cell = Linear(shape[-1], out)
        assert (cell.kernel_residual is not None) == fused
        for p in cell.trainable_params():
            p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32)))
        x = rng.standard_normal(shape).astype(np.float32)
        r, dy = (rng.standard_normal(shape[:-1] + (out,)).astype(np.float32) for _ in range(2))
        xt, rt = (torch.from_numpy(a).double().requires_grad_(True) for a in (x, r))
        params = [torch.from_numpy(p.asnumpy()).double().requires_grad_(True) for p in cell.trainable_params()]
        yt = torch.nn.functional.linear(xt, *params) + rt
        (yt * torch.from_numpy(dy).double()).sum().backward()
        y = cell.with_residual(Tensor(x), Tensor(r))
        np.testing.assert_allclose(y.asnumpy(), yt.detach().numpy(), rtol=1e-5, atol=1e-5)
        (dx, dr), grads = ms.grad(_WithResidual(cell, Tensor(dy)), (0, 1), cell.trainable_params())(
            Tensor(x), Tensor(r)
        )
        for ours, ref in zip([dx, dr, *grads], [xt.grad, rt.grad] + [p.grad for p in params]):
            np.testing.assert_allclose(ours.asnumpy(), ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU kernels need g++")
@pytest.mark.parametrize("mode", [0, 1])
def test_fused_geglu_matches_torch_with_its_gradients(monkeypatch, mode):
    """GEGLU's projection and gating as two oneDNN 3 matmuls with fused epilogues (outside training) and as the
    projection plus the gating kernel (training): output and the gradients of input, weight and bias against torch
    in float64, on a row count that fills no block and on a 3-D input; the fused rows in pieces of 10 (their gate
    buffer bounded to 1,600 bytes), the last one shorter."""
    from modules.attention import GEGLU

    ms.set_context(mode=mode)
    monkeypatch.setenv("SVD_LINEAR_KERNEL", "1")
    monkeypatch.setenv("SVD_GEGLU_GATE_BYTES", str(10 * 40 * 4))
    rng = np.random.default_rng(11)
    weight = (rng.standard_normal((80, 24)) * 0.5).astype(np.float32)
    bias = (rng.standard_normal(80) * 0.5).astype(np.float32)
    w, b = torch.from_numpy(weight).double(), torch.from_numpy(bias).double()
    for training in (False, True):
        cell = GEGLU(24, 40).set_train(training)  # a new cell: a compiled graph keeps the mode it was traced in
        assert cell.fused is not None and cell.fused.func.startswith(kernels.matmul_library() + ":Geglu")
        cell.proj.weight.set_data(Tensor(weight))
        cell.proj.bias.set_data(Tensor(bias))
        for shape in ((37, 24), (3, 19, 24)):
            x = rng.standard_normal(shape).astype(np.float32)
            dy = rng.standard_normal(shape[:-1] + (40,)).astype(np.float32)
            xt, wt, bt = (t.clone().requires_grad_(True) for t in (torch.from_numpy(x).double(), w, b))
            h, gate = torch.nn.functional.linear(xt, wt, bt).chunk(2, dim=-1)
            yt = h * torch.nn.functional.gelu(gate)
            (yt * torch.from_numpy(dy).double()).sum().backward()
            np.testing.assert_allclose(cell(Tensor(x)).asnumpy(), yt.detach().numpy(), rtol=1e-5, atol=1e-5)
            dx, grads = ms.grad(_WeightedSum(cell, Tensor(dy)), 0, cell.trainable_params())(Tensor(x))
            for ours, ref in zip([dx, *grads], [xt.grad, wt.grad, bt.grad]):
                np.testing.assert_allclose(ours.asnumpy(), ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU kernels need g++")
def test_permute_kernel_matches_numpy_with_its_gradient(monkeypatch):
    """The compiled permutation against numpy on the patterns the networks use (heads, tokens, frames: whole rows)
    and on ones that transpose the innermost axis or hold axes of size one, in float32 and float16; its gradient
    is the inverse permutation, also in a graph; SVD_PERMUTE_KERNEL=0 gives MindSpore's Transpose."""
    from modules.layers import _PermuteKernel, _Transpose, permuter

    ms.set_context(mode=1)
    assert isinstance(permuter((1, 0)), _PermuteKernel)
    rng = np.random.default_rng(8)
    cases = [
        ((3, 40, 5, 8), (0, 2, 1, 3)),
        ((2, 6, 33, 35), (0, 2, 3, 1)),
        ((2, 33, 35, 6), (0, 3, 1, 2)),
        ((2, 5, 6, 4, 3), (0, 2, 1, 3, 4)),
        ((3, 1, 4, 1, 5), (4, 2, 0, 3, 1)),
        ((70, 90), (1, 0)),
        ((7,), (0,)),
    ]
    for shape, perm in cases:
        for dtype in (np.float32, np.float16):
            x = rng.standard_normal(shape).astype(dtype)
            y = kernels.permute(Tensor(x), perm).asnumpy()
            assert y.dtype == dtype and np.array_equal(y, np.transpose(x, perm)), (shape, perm)
        w = rng.standard_normal(np.transpose(x, perm).shape).astype(np.float32)
        weights = Tensor(w)

        def loss(t, perm=perm, weights=weights):
            return (kernels.permute(t, perm) * weights).sum()

        grad = ms.grad(loss)(Tensor(x.astype(np.float32)))
        np.testing.assert_array_equal(grad.asnumpy(), np.transpose(w, np.argsort(perm)))
    ms.set_context(mode=0)
    cell = permuter((0, 2, 3, 1))
    assert isinstance(cell, _PermuteKernel)
    x = rng.standard_normal((3, 40, 5, 8)).astype(np.float32)
    np.testing.assert_array_equal(cell(Tensor(x)).asnumpy(), np.transpose(x, (0, 2, 3, 1)))
    w = rng.standard_normal((3, 5, 8, 40)).astype(np.float32)
    grad = ms.grad(_WeightedSum(cell, Tensor(w)))(Tensor(x))
    np.testing.assert_array_equal(grad.asnumpy(), np.transpose(w, (0, 3, 1, 2)))
    monkeypatch.setenv("SVD_PERMUTE_KERNEL", "0")
    assert isinstance(permuter((1, 0)), _Transpose)


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU kernels need g++")
@pytest.mark.parametrize("mode", [0, 1])
def test_upsample_kernel_matches_torch_with_its_gradient(mode):
    """Nearest 2x upsampling by the compiled kernel against torch's interpolate, on a tensor of one thread and one
    split between threads: the output bit for bit in float32 and float16, the gradient (2x2 block sums) in float32
    against float64 and in float16 against float32; the UNet's and the VAE's Upsample cells hold the kernel."""
    from modules.autoencoder import Upsample as VaeUpsample
    from modules.layers import upsample_nearest2x
    from modules.unet import Upsample as UnetUpsample

    op = kernels.upsample_op()
    assert UnetUpsample(4, True).upsample is not None and VaeUpsample(4).upsample is not None
    ms.set_context(mode=mode)
    rng = np.random.default_rng(10)
    for shape in ((2, 3, 5, 7), (3, 64, 24, 40)):
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal((*shape[:2], 2 * shape[2], 2 * shape[3])).astype(np.float32)
        xt = torch.from_numpy(x).double().requires_grad_(True)
        yt = torch.nn.functional.interpolate(xt, scale_factor=2, mode="nearest")
        (yt * torch.from_numpy(dy).double()).sum().backward()
        for dtype in (np.float32, np.float16):
            y = op(Tensor(x.astype(dtype))).asnumpy()
            assert y.dtype == dtype and np.array_equal(y, yt.detach().numpy().astype(dtype)), (shape, dtype)
            assert np.array_equal(upsample_nearest2x(Tensor(x.astype(dtype))).asnumpy(), y)  # MindSpore's Tile
        dx = ms.grad(_WeightedSum(op, Tensor(dy)))(Tensor(x)).asnumpy()
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-5, atol=1e-5)
        dx16 = ms.grad(_WeightedSum(op, Tensor(dy.astype(np.float16))))(Tensor(x.astype(np.float16))).asnumpy()
        assert dx16.dtype == np.float16
        np.testing.assert_allclose(dx16, dx, rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize("shape", [(5, 7), (3000, 300)])  # one thread, then rows split between threads
def test_column_sums_match_numpy(shape):
    op = kernels.sum_rows_op()
    x = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(op(Tensor(x)).asnumpy(), x.astype(np.float64).sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", [0, 1])
def test_softmax_kernel_and_its_gradient_match_torch(mode):
    """Softmax over the last axis by the compiled kernel, on rows of one thread and of several: output and input
    gradient against torch in float64, with scores large enough that a missing max subtraction would overflow."""
    op = kernels.softmax_op()
    ms.set_context(mode=mode)
    rng = np.random.default_rng(9)
    for shape in ((3, 5, 7), (2, 10, 256, 256)):
        x = (rng.standard_normal(shape) * 40).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        xt = torch.from_numpy(x).double().requires_grad_(True)
        yt = torch.softmax(xt, -1)
        (yt * torch.from_numpy(dy).double()).sum().backward()
        np.testing.assert_allclose(op(Tensor(x)).asnumpy(), yt.detach().numpy(), rtol=1e-5, atol=1e-6)
        dx = ms.grad(_WeightedSum(op, Tensor(dy)))(Tensor(x))
        np.testing.assert_allclose(dx.asnumpy(), xt.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("kernel", ["1", "0"])
@pytest.mark.parametrize(
    "b, lq, lk, heads, d, first",
    [  # temporal-like; query rows in blocks; one key; channels first (the VAE's), one head and, with the kernel, two
        (3, 14, 14, 2, 8, False), (1, 600, 4000, 2, 8, False), (1, 40, 1, 2, 4, False), (1, 300, 4000, 1, 8, True),
        (2, 30, 30, 2, 4, True),
    ],
)  # fmt: skip
def test_attention_matches_torch_with_gradients(monkeypatch, mode, kernel, b, lq, lk, heads, d, first):
    """The Attention cell (the fused kernel, or the permutations, BatchMatMul and softmax without it) against torch's
    scaled_dot_product_attention on heads packed as (B, L, H*D), or (B, H*D, L) channels first, with the gradients
    of q, k and v."""
    monkeypatch.setenv("SVD_ATTENTION_KERNEL", kernel)
    kernels.attention_op.cache_clear()
    from modules.layers import Attention

    ms.set_context(mode=mode)
    if first and heads > 1 and not (kernel == "1" and kernels.enabled()):
        with pytest.raises(ValueError, match="one head"):
            Attention(heads, channels_first=True)
        return
    cell = Attention(heads, channels_first=first)
    assert (cell.fused is not None) == (kernel == "1" and kernels.enabled())
    rng = np.random.default_rng(10)
    q, k, v = (rng.standard_normal((b, n, heads * d)).astype(np.float32) * 2 for n in (lq, lk, lk))
    dy = rng.standard_normal((b, lq, heads * d)).astype(np.float32)
    qt, kt, vt = (torch.from_numpy(a).double().requires_grad_(True) for a in (q, k, v))

    def split(t):
        return t.reshape(b, t.shape[1], heads, d).transpose(1, 2)

    yt = torch.nn.functional.scaled_dot_product_attention(split(qt), split(kt), split(vt))
    yt = yt.transpose(1, 2).reshape(b, lq, heads * d)
    (yt * torch.from_numpy(dy).double()).sum().backward()
    ref_grads = [t.grad.numpy() for t in (qt, kt, vt)]
    if first:  # the same problem with every tensor transposed to (B, H*D, L); so are the gradients
        q, k, v, dy = (np.ascontiguousarray(a.transpose(0, 2, 1)) for a in (q, k, v, dy))
        yt = yt.transpose(1, 2)
        ref_grads = [g.transpose(0, 2, 1) for g in ref_grads]

    def loss(q_, k_, v_):
        return (cell(q_, k_, v_) * Tensor(dy)).sum()

    np.testing.assert_allclose(cell(Tensor(q), Tensor(k), Tensor(v)).asnumpy(), yt.detach(), rtol=1e-4, atol=1e-5)
    grads = ms.grad(loss, (0, 1, 2))(Tensor(q), Tensor(k), Tensor(v))
    for ours, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(ours.asnumpy(), ref, rtol=1e-4, atol=1e-4)
    kernels.attention_op.cache_clear()
