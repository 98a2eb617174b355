"""train.py on the tiny config: graph-mode runs, temporal-only freezing, exact resume, a 2-worker msrun run, bad
inputs; and the optimizer, schedule and loss-scale pieces against their definitions.

Training runs are subprocesses (graph mode is process-wide). The graph-mode runs all build the same graphs
(temporal-only, accumulation 2, EMA) and share a MindSpore compile cache, so they are compiled once. The cache must
not be shared by runs whose graphs differ: it is keyed by source files, not by settings, and would hand one run
another's graph.
"""

import json
import os
import socket
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor

from data.video_dataset import VideoDataset, collate
from modules.build import build_engine
from modules.training import (
    LossScaleSettings,
    OptimizerSettings,
    SchedulerSettings,
    StepSettings,
    Trainer,
    Updater,
    load_into,
    lr_schedule,
    no_decay_names,
    select_trainable,
    update_groups,
)
from tests.test_dataset import make_dataset_dir
from train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/tiny/svd_tiny.yaml"
PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Videos (4 clips of 12 frames, and a 1-clip set of exactly 4 frames), a 'pretrained' tiny checkpoint whose
    zero-initialised layers are filled (so every layer gets gradients), and a shared compile cache."""
    root = tmp_path_factory.mktemp("train")
    videos = make_dataset_dir(root / "videos", n=4, num_frames=12, height=72, width=96)
    one = make_dataset_dir(root / "one", n=1, num_frames=4, height=64, width=64)
    ms.set_seed(0)
    engine = build_engine(TINY)
    rng = np.random.default_rng(0)
    for p in engine.unet.get_parameters():
        if not p.asnumpy().any():
            p.set_data(Tensor(rng.normal(0.0, 0.05, p.shape).astype(np.float32)))
    pretrained = str(root / "pretrained.ckpt")
    ms.save_checkpoint(engine, pretrained)
    plain = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env = dict(plain, MS_COMPILER_CACHE_ENABLE="1", MS_COMPILER_CACHE_PATH=str(root / "compile_cache"))
    return {"root": root, "videos": videos, "one": one, "pretrained": pretrained, "env": env, "plain_env": plain}


def reference_args(work, output_dir, data=None, epochs=2, mode=0):
    """The reference command's flags, on the tiny config (temporal-only, accumulation 2, EMA)."""
    data_dir, metadata = data or work["videos"]
    return [
        "--config=configs/tiny/svd_train_tiny.yaml",
        f"--svd_config={TINY}",
        f"--train.pretrained={work['pretrained']}",
        f"--train.output_dir={output_dir}",
        f"--environment.mode={mode}",
        "--train.temporal_only=True",
        f"--train.epochs={epochs}",
        "--train.dataset.init_args.frames=4",
        "--train.dataset.init_args.step=2",
        f"--train.dataset.init_args.data_dir={data_dir}",
        f"--train.dataset.init_args.metadata={metadata}",
        "--train.settings.gradient_accumulation_steps=2",
        "--train.ema_decay=0.9",
    ]


def run_train(work, args, timeout=400):
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=work["env"], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def load(path):
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def read_log(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference_run(work):
    out = work["root"] / "run_a"
    proc = run_train(work, reference_args(work, out))
    return out, proc.stdout + proc.stderr


def test_reference_command_writes_the_run_folder(reference_run):
    out, log = reference_run
    assert sorted(os.listdir(out)) == [
        "checkpoints", "config.yaml", "final.ckpt", "final_ema.ckpt", "loss.png", "svd.yaml", "train.log",
        "train_log.csv",
    ]  # fmt: skip
    rows = read_log(out / "train_log.csv")
    # 4 videos, 2 epochs, accumulation 2: 4 optimizer steps
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(float(r["loss"])) and float(r["lr"]) == pytest.approx(1e-3) for r in rows)
    assert set(rows[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "loss_scale", "skipped", "step_time_s"}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert ckpts == ["step_00000002", "step_00000004"]  # a checkpoint every 2 steps, the last 2 kept
    last = out / "checkpoints" / ckpts[-1]
    assert sorted(os.listdir(last)) == ["ema.ckpt", "model.ckpt", "state.json", "train_state.ckpt"]
    state = json.loads((last / "state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (4, 2, 0)
    # trained parameters only: the temporal ones
    assert all("time_" in k for k in load(last / "model.ckpt"))
    assert "training 656,786 parameters in 318 tensors" in log


def test_temporal_only_leaves_every_other_parameter_bit_identical(work, reference_run):
    out, _ = reference_run
    before, after = load(work["pretrained"]), load(out / "final.ckpt")
    assert set(before) == set(after)
    engine = build_engine(TINY, lazy=True)
    temporal = engine.unet.get_temporal_param_names(prefix=PREFIX)
    frozen = [k for k in before if k not in temporal]
    assert len(frozen) == 814 and len(temporal) == 318
    for k in frozen:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    changed = [k for k in temporal if not np.array_equal(after[k], before[k])]
    assert len(changed) > 0.9 * len(temporal)
    ema = load(out / "final_ema.ckpt")
    k = changed[0]
    assert not np.array_equal(ema[k], after[k]) and not np.array_equal(ema[k], before[k])


def test_stop_and_resume_equals_the_uninterrupted_run(work, reference_run):
    out_a, _ = reference_run
    out_b = work["root"] / "run_b"
    run_train(work, reference_args(work, out_b) + ["--train.max_steps=3"])
    assert [int(r["step"]) for r in read_log(out_b / "train_log.csv")] == [1, 2, 3]
    state = json.loads((out_b / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert (state["epoch"], state["batch"]) == (1, 2)  # stopped in the middle of the second epoch
    proc = run_train(work, reference_args(work, out_b) + ["--train.resume=True"])
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = out_a / "checkpoints" / "step_00000004", out_b / "checkpoints" / "step_00000004"
    for name in ("model.ckpt", "ema.ckpt", "train_state.ckpt"):
        wa, wb = load(a / name), load(b / name)
        assert set(wa) == set(wb)
        for k in wa:
            np.testing.assert_allclose(wb[k], wa[k], rtol=0, atol=1e-6, err_msg=f"{name}: {k}")
    la, lb = read_log(out_a / "train_log.csv"), read_log(out_b / "train_log.csv")
    assert [r["loss"] for r in lb] == [r["loss"] for r in la]


def held_out_losses(checkpoints, data, seeds=range(4)) -> list[float]:
    """The training loss of the clip at fixed noise draws, without conditioning dropout, for each checkpoint
    (PyNative, in process)."""
    engine = build_engine(TINY, checkpoints[0])
    dataset = VideoDataset(*data, frames=4, step=1, height=64, width=64)
    trainer = Trainer(engine, select_trainable(engine, True), 4, np.ones(1, np.float32), OptimizerSettings(),
                      StepSettings())  # fmt: skip
    batch = collate([dataset.get(0, np.random.default_rng(0))])
    means = []
    for ckpt in checkpoints:
        load_into(list(engine.get_parameters()), ckpt, "model")
        losses = [trainer.step_cell.loss(*trainer.prepare(batch, np.random.default_rng(s))) for s in seeds]
        means.append(float(np.mean([x.asnumpy() for x in losses])))
    return means


def test_overfitting_one_clip_lowers_the_loss(work):
    out = work["root"] / "overfit"
    data = work["one"]
    # the one clip has exactly 4 frames (step 1); 48 epochs with accumulation 2 are 24 optimizer steps
    args = reference_args(work, out, data, epochs=48)
    args += ["--train.dataset.init_args.step=1", "--train.scheduler.lr=1e-2"]
    run_train(work, args)
    before, after = held_out_losses([work["pretrained"], str(out / "final.ckpt")], data)
    assert after < 0.6 * before, (before, after)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_msrun_two_workers_end_with_identical_weights(work):
    out, logs = work["root"] / "dp", work["root"] / "dp_logs"
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    launch = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}", f"--log_dir={logs}"]
    flags = ["--environment.distributed=True", "--train.settings.gradient_accumulation_steps=1", "--train.max_steps=2"]
    flags += ["--train.validation.interval=2"]
    cmd = [*launch, "--join=True", "train.py", *reference_args(work, out, epochs=1, mode=1), *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=work["plain_env"], capture_output=True, text=True, timeout=400)
    text = {r: (logs / f"worker_{r}.log").read_text() for r in range(2)}
    assert proc.returncode == 0, text[0][-3000:] + text[1][-3000:]
    digests = [t.split("trained weights sha256 ")[1].split()[0] for t in text.values()]
    assert digests[0] == digests[1]
    assert "2 rank(s), 2 batches" in text[0]  # 4 videos: 2 per rank
    assert [int(r["step"]) for r in read_log(out / "train_log.csv")] == [1, 2]  # rank 0 alone writes
    assert os.listdir(out / "validation") == ["step_00000002.mp4"]


def test_a_csv_from_prepare_dataset_trains_as_is(work, tmp_path):
    """svd_tools/prepare_dataset.py output (path,length,fps,motion_score,motion_bucket_id) is train.py's input."""
    from svd_tools import prepare_dataset

    data_dir, _ = work["videos"]
    csv = tmp_path / "prepared.csv"
    assert prepare_dataset.main(["--videos", data_dir, "--out", str(csv), "--no_progress"]) == 0
    out = tmp_path / "run"
    args = reference_args(work, out, (data_dir, str(csv)), epochs=1, mode=1)
    run_train(work, args + ["--train.settings.gradient_accumulation_steps=1", "--train.max_steps=1"])
    rows = read_log(out / "train_log.csv")
    assert [int(r["step"]) for r in rows] == [1] and np.isfinite(float(rows[0]["loss"]))


def test_bad_inputs_fail_with_one_line_and_write_nothing(work, tmp_path, capsys):
    data_dir, _ = work["videos"]
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("path,length\nv0.mp4,12\n")
    out = tmp_path / "out"
    args = reference_args(work, out, (data_dir, str(bad_csv)))
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing required column(s) motion_bucket_id" in err[0]
    assert main(reference_args(work, out) + ["--train.pretrained=/no/such.ckpt"]) == 1
    assert "pretrained not found" in capsys.readouterr().err
    assert main(reference_args(work, out) + ["--train.settings.gradient_accumulation_steps=0"]) == 1
    assert not out.exists()
    used = work["root"] / "used"
    (used / "checkpoints" / "step_00000001").mkdir(parents=True)
    (used / "checkpoints" / "step_00000001" / "state.json").write_text("{}")
    assert main(reference_args(work, used)) == 1
    assert "already holds a training run" in capsys.readouterr().err


def test_lr_schedule_warmup_then_cosine():
    lr = lr_schedule(SchedulerSettings(name="cosine_decay", lr=1.0, end_lr=0.1, warmup_steps=4), 14)
    np.testing.assert_allclose(lr[:4], [0.25, 0.5, 0.75, 1.0])
    assert lr[4] == pytest.approx(1.0) and lr[9] == pytest.approx(0.55) and lr[-1] > 0.1
    assert np.all(np.diff(lr[4:]) < 0)
    const = lr_schedule(SchedulerSettings(name="constant", lr=0.5, warmup_steps=0), 5)
    np.testing.assert_array_equal(const, np.full(5, 0.5, np.float32))


@pytest.mark.parametrize(
    "kernels,mode,group_values",  # the compiled kernels or MindSpore's operators; one group or one per parameter
    [(True, 1, 1 << 25), (True, 0, 1 << 25), (True, 0, 1), (False, 1, 1), (False, 0, 1 << 25)],
)
def test_updater_matches_torch_adamw_with_clipping_skips_and_ema(kernels, mode, group_values, monkeypatch):
    monkeypatch.setenv("SVD_CPU_KERNELS", "1" if kernels else "0")
    previous = ms.get_context("mode")
    ms.set_context(mode=mode)
    try:
        _updater_against_torch(kernels, group_values)
    finally:
        ms.set_context(mode=previous)


def _updater_against_torch(kernels, group_values):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((4,)).astype(np.float32)]
    params = [Parameter(Tensor(w0[0]), name="a.weight"), Parameter(Tensor(w0[1]), name="a.bias")]
    lr = lr_schedule(SchedulerSettings(name="cosine_decay", lr=1e-2, end_lr=1e-4, warmup_steps=2), 10)
    opt_settings = OptimizerSettings(betas=[0.9, 0.98], eps=1e-6, weight_decay=0.1)
    step = StepSettings(clip_norm=0.5)
    up = Updater(params, opt_settings, {"a.bias"}, step, ema_decay=0.9, group_values=group_values)
    assert up.use_kernels == kernels
    ref = [torch.nn.Parameter(torch.tensor(w)) for w in w0]
    groups = [{"params": [ref[0]], "weight_decay": 0.1}, {"params": [ref[1]], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1.0, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(lr[s]))
    ema = [w.copy() for w in w0]
    for step in range(6):
        grads = [3 * rng.standard_normal(w.shape).astype(np.float32) for w in w0]
        if step == 3:
            grads[0][0, 0] = np.inf  # skipped: weights, moments, step and EMA unchanged
        n_before = int(up.step.asnumpy())
        norm, finite = up(tuple(Tensor(g) for g in grads), Tensor(float(lr[n_before]), ms.float32))
        if step == 3:
            assert not finite.asnumpy() and int(up.step.asnumpy()) == n_before
            continue
        for p, g in zip(ref, grads):
            p.grad = torch.tensor(g)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
        opt.step()
        sched.step()
        for e, p in zip(ema, ref):
            e += 0.1 * (p.detach().numpy() - e)
        assert float(norm.asnumpy()) == pytest.approx(float(ref_norm), rel=1e-5)
    for p, r, e, x in zip(params, ref, up.ema, ema):
        np.testing.assert_allclose(p.asnumpy(), r.detach().numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(e.asnumpy(), x, rtol=0, atol=1e-6)


def test_update_groups_are_consecutive_and_bounded():
    sizes = [5, 3, 4, 10, 1, 1, 2]
    groups = update_groups(sizes, limit=8)
    assert groups == ((0, 2), (2, 3), (3, 4), (4, 7))  # a parameter over the limit is a group of its own
    assert [i for a, b in groups for i in range(a, b)] == list(range(len(sizes)))
    assert update_groups([], 8) == () and update_groups([3], 1) == ((0, 1),)


def test_a_skipped_step_without_clipping_leaves_everything_bit_identical():
    """Without clipping the factor stays finite on overflow: the gradient's infinities and NaNs must not reach the
    moments (0 * inf is NaN)."""
    w0 = np.linspace(-1, 1, 6, dtype=np.float32)
    p = Parameter(Tensor(w0), name="w")
    up = Updater([p], OptimizerSettings(), set(), StepSettings(clip_grad=False))
    lr = Tensor(0.1, ms.float32)
    up((Tensor(np.full(6, 0.5, np.float32)),), lr)
    before = [x.asnumpy().copy() for x in (p, up.exp_avg[0], up.exp_avg_sq[0])]
    assert not np.array_equal(before[0], w0)
    _, finite = up((Tensor(np.array([1, np.inf, -np.inf, np.nan, 2, 3], np.float32)),), lr)
    assert not finite.asnumpy() and int(up.step.asnumpy()) == 1
    for x, b in zip((p, up.exp_avg[0], up.exp_avg_sq[0]), before):
        np.testing.assert_array_equal(x.asnumpy(), b)


def test_dynamic_loss_scale_halves_on_overflow_and_grows_after_a_window():
    p = Parameter(Tensor(np.ones(3, np.float32)), name="w")
    up = Updater([p], OptimizerSettings(), set(), StepSettings(), LossScaleSettings(1024.0, 2.0, 2))
    lr = Tensor(0.1, ms.float32)
    scales = []
    for g in ([np.inf] * 3, [1.0] * 3, [1.0] * 3, [1.0] * 3):
        up((Tensor(np.array(g, np.float32)),), lr)
        scales.append(float(up.loss_scale.asnumpy()))
    assert scales == [512.0, 512.0, 1024.0, 1024.0]
    assert int(up.step.asnumpy()) == 3
    # gradients arrive multiplied by the scale: the update used the unscaled ones (|g| = 1/512 per element)
    assert np.all(p.asnumpy() < 1.0)


def test_trainable_set_and_weight_decay_groups():
    engine = build_engine(TINY, lazy=True)
    full = select_trainable(engine, temporal_only=False)
    assert {p.name for p in full} == {p.name for p in engine.unet.get_parameters()}
    temporal = {p.name for p in select_trainable(engine, temporal_only=True)}
    assert temporal == engine.unet.get_temporal_param_names(prefix=PREFIX)
    assert {p.name for p in engine.get_parameters() if p.requires_grad} == temporal
    no_decay = no_decay_names(engine)
    assert PREFIX + "out.0.weight" in no_decay  # a GroupNorm weight
    assert PREFIX + "input_blocks.1.0.time_mixer.mix_factor" in no_decay
    assert PREFIX + "out.2.weight" not in no_decay and PREFIX + "out.2.bias" in no_decay
