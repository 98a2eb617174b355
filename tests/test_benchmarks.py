"""The benchmark harness: both sides' timed runs, one after the other or interleaved, and the report's last line."""

import os
import pathlib
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    from benchmarks import harness
    from benchmarks.harness import Measurement

    def side(name, seconds):
        def run(case):
            if os.environ.get("FAIL_SIDE") == name:
                raise SystemExit("cannot build " + name)

            def call():
                with open({log!r}, "a") as f:
                    f.write(name + "\\n")
                time.sleep(seconds)
            times, first = harness.timed(call, case.runs, case.warmup)
            return Measurement(times, first, 1.0)
        return run

    sys.exit(harness.main(harness.base_parser("test"), side("ours", 0.02), side("ref", 0.04)))
    """
)


def _bench(tmp_path, *args, fail=None):
    log = tmp_path / "calls.log"
    script = tmp_path / "bench_sleep.py"
    script.write_text(SCRIPT.format(root=str(pathlib.Path(__file__).parents[1]), log=str(log)))
    env = dict(os.environ, FAIL_SIDE=fail or "")
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120, env=env)
    if fail:
        return out
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines(), log.read_text().split()


def test_sides_run_one_after_the_other_by_default(tmp_path):
    lines, calls = _bench(tmp_path, "--runs", "3", "--warmup", "1")
    assert calls == ["ours"] * 4 + ["ref"] * 4
    assert lines[-1].startswith("ours_s=") and " ratio=" in lines[-1]
    assert 0.3 < float(lines[-1].split("ratio=")[1]) < 0.7  # 20 ms against 40 ms


def test_interleaved_sides_alternate_their_timed_runs(tmp_path):
    lines, calls = _bench(tmp_path, "--runs", "4", "--warmup", "1", "--interleave")
    # the warm-up calls of each side as it builds, then the timed ones in turns, each side first every other round
    assert calls == ["ours", "ref"] + ["ours", "ref", "ref", "ours"] * 2
    paired = next(line for line in lines if line.startswith("paired ratios"))
    assert len(paired.split(",")[0].split()) == 2 + 4
    assert 0.3 < float(lines[-1].split("ratio=")[1]) < 0.7


def test_a_side_that_fails_fails_the_benchmark_in_both_ways(tmp_path):
    for extra in ([], ["--interleave"]):
        out = _bench(tmp_path, "--runs", "2", *extra, fail="ref")
        assert out.returncode == 1 and "error: the ref side failed" in out.stderr
        assert "cannot build ref" in out.stderr


def test_profile_sorts_our_operators_into_kinds():
    from benchmarks import profile_unet

    assert profile_unet._our_kind("Custom", ["a-VideoUNet", "conv-_Conv", "Custom-op3"]) == "convolution"
    assert profile_unet._our_kind("Custom", ["proj-Linear", "Custom-op4"]) == "fully connected"
    assert profile_unet._our_kind("Custom", ["0-GEGLU", "Custom-op5"]) == "fully connected"  # fused matmuls
    assert profile_unet._our_kind("Custom", ["0-GEGLU", "Custom-op5"], train=True) == "elementwise"  # gating only
    assert profile_unet._our_kind("BatchMatMul", ["attn1-CrossAttention", "BatchMatMul-op1"]) == "attention"
    grad = ["to_q-Linear", "Grad_Custom", "Custom-op9"]  # a compiled kernel's gradient: the cell above it
    assert profile_unet._our_kind("Custom", grad) == "fully connected"
    assert profile_unet._our_kind("Custom", ["attention-Attention", "Grad_Custom", "Custom-op2"]) == "attention"
    assert profile_unet._our_kind("Custom", ["attn2-CrossAttention", "Custom-op6"]) == "elementwise"  # add-rows
    assert profile_unet._our_kind("Custom", ["Default", "updater-Updater", "Custom-op7"]) == "optimizer"
    assert profile_unet._ref_kind("aten::lerp_") == profile_unet._ref_kind("aten::linalg_vector_norm") == "optimizer"
    assert profile_unet._ref_kind("aten::mkldnn_convolution") == "convolution"
    assert profile_unet._ref_kind("aten::addmm") == "fully connected"
    assert profile_unet._ref_kind("aten::copy_") == "permutation and copies"


def test_profile_of_the_tiny_unet_accounts_for_every_operator():
    from benchmarks.profile_unet import KINDS

    root = pathlib.Path(__file__).parents[1]
    out = subprocess.run(
        [sys.executable, "benchmarks/profile_unet.py", "--side=ours", "--threads=1"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    total_ms = float(next(x for x in lines if "operator time" in x).split("operator time")[1].split()[0]) * 1e3
    kinds = {x.split(" ms")[0].rsplit(maxsplit=1)[0].strip(): float(x.split(" ms")[0].rsplit(maxsplit=1)[1])
             for x in lines if x.startswith("  ") and "%" in x}  # fmt: skip
    assert set(kinds) == {*KINDS, "other"}
    assert kinds["convolution"] > 0 and kinds["fully connected"] > 0 and kinds["attention"] > 0
    assert abs(sum(kinds.values()) - total_ms) <= 0.01 * total_ms + 1.0


def test_update_benchmark_runs_both_sides():
    root = pathlib.Path(__file__).parents[1]
    cmd = [sys.executable, "benchmarks/bench_update.py", "--tensors", "3", "--values", "5000", "--runs", "1"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "ours notes: kernels=True, values=15000" in lines
    assert lines[-1].startswith("ours_s=") and " ratio=" in lines[-1]


def test_linear_benchmark_counts_the_unets_fully_connected_layers():
    """The shapes follow the SVD UNet: at 2 x 14 frames of 128x128 they hold 1,030 GFLOP, half of the evaluation's
    2,015 (counted by torch on diffusers' UNet in bench_unet.py), in 16 transformers' worth of layers; and a small
    case runs on both sides."""
    from benchmarks.bench_linear import gflop, shapes
    from benchmarks.harness import Case

    svd = Case("configs/svd.yaml", frames=14, height=128, width=128)
    assert sum(calls for *_, calls in shapes(svd)) == 16 * 16
    assert (7168, 320, 2560, 15) in shapes(svd) and (112, 5120, 1280, 3) in shapes(svd)
    assert 1000 < gflop(svd) < 1060
    root = pathlib.Path(__file__).parents[1]
    small = ["--frames", "2", "--height", "64", "--width", "64", "--runs", "1"]
    cmd = [sys.executable, "benchmarks/bench_linear.py", *small]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("fully connected layers of one UNet evaluation: 2 x 2 frames of 64x64, 256 calls")
    assert lines[-1].startswith("ours_s=") and " ratio=" in lines[-1]


def test_conv_benchmark_counts_the_unets_convolutions():
    """The shapes follow the SVD UNet: at 2 x 14 frames of 128x128, 110 calls (as many convolutions as the profile
    of one evaluation counts) holding 880 GFLOP, the rest of the evaluation's 2,015 beside the fully connected
    layers' 1,030; and a small case runs on both sides."""
    from benchmarks.bench_conv import gflop, shapes
    from benchmarks.harness import Case

    svd = Case("configs/svd.yaml", frames=14, height=128, width=128)
    assert sum(s[-1] for s in shapes(svd)) == 110
    assert ("2d", (28, 2560, 2, 2), (1280, 2560, 3, 3), 1, 3) in shapes(svd)
    assert ("3d", (2, 1280, 14, 2, 2), (1280, 1280, 3, 1, 1), 1, 14) in shapes(svd)
    assert 860 < gflop(svd) < 900
    root = pathlib.Path(__file__).parents[1]
    small = ["--frames", "2", "--height", "64", "--width", "64", "--runs", "1"]
    out = subprocess.run([sys.executable, "benchmarks/bench_conv.py", *small], cwd=root, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("convolutions of one UNet evaluation: 2 x 2 frames of 64x64, 110 calls")
    assert lines[-1].startswith("ours_s=") and " ratio=" in lines[-1]


def test_attention_benchmark_counts_the_self_attentions():
    """The shapes follow the SVD UNet: at 2 x 14 frames of 128x128, 32 self-attentions (16 spatial, 16 temporal: the
    fused kernel's calls in the profile of one evaluation) and the VAE decoder's one single-head attention over the
    latent's pixels; and a small case runs on both sides, for the VAE's alone too."""
    from benchmarks.bench_attention import shapes
    from benchmarks.harness import Case

    svd = Case("configs/svd.yaml", frames=14, height=128, width=128, extra={"vae_only": False})
    unet = [s for s in shapes(svd) if not s[4]]
    assert sum(s[-1] for s in unet) == 32
    assert (28, 256, 5, 64, False, 5) in unet and (512, 14, 5, 64, False, 5) in unet
    assert shapes(svd)[-1] == (14, 256, 1, 512, True, 1)
    root = pathlib.Path(__file__).parents[1]
    for only in ([], ["--vae_only"]):
        small = ["--frames", "2", "--height", "64", "--width", "64", "--runs", "1", *only]
        out = subprocess.run([sys.executable, "benchmarks/bench_attention.py", *small], cwd=root, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        lines = out.stdout.splitlines()
        assert ("VAE decoder" in lines[0]) == bool(only) and "2 frames of 64x64" in lines[0]
        assert lines[-1].startswith("ours_s=") and " ratio=" in lines[-1]
