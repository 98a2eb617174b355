"""Fine-tuning machinery behind train.py: settings, the loss and train-step cells, AdamW, the LR schedule, loss
scaling, EMA, checkpoints and the step log.

One training step (per micro-batch):
  outside the gradient, in Python: VAE posterior sample of the frames (times scale_factor), the conditioner with
  conditioning dropout, one sigma per clip, the noise;
  one compiled cell: loss -> gradients of the trainable parameters -> (every `accumulation` micro-batches)
  all-reduce, unscale, overflow check, dynamic loss scale, global-norm clipping, AdamW, EMA.
Every random draw comes from numpy generators seeded by (seed, step, micro-batch, rank) and, for the data, by
(seed, epoch, row), so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import List, Literal, Optional, Union

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from data.video_io import atomic_path
from modules import kernels

logger = logging.getLogger("train")

CHECKPOINTS = "checkpoints"
IMAGE_KEYS = ("cond_frames", "cond_frames_without_noise")  # the embedders conditioning dropout applies to


# ----------------------------------------------------------------------------------------------------------------
# settings (the `--train.*` groups of train.py)


@dataclass
class DataLoaderSettings:
    batch_size: int = 1
    """Clips per micro-batch on each device."""
    shuffle: bool = True
    drop_remainder: bool = True
    """Drop the last incomplete batch of an epoch (otherwise it is filled with clips from the start)."""
    num_workers: int = 2
    """Threads that decode clips ahead of the training step (0: decode in the main thread)."""


@dataclass
class SchedulerSettings:
    name: Literal["constant", "cosine_decay"] = "cosine_decay"
    lr: float = 3.0e-5
    end_lr: float = 1.0e-7
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up (the schedule counts optimizer steps, not micro-batches)."""


@dataclass
class OptimizerSettings:
    name: Literal["adamw"] = "adamw"
    betas: List[float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to normalisation weights, biases or scalars."""


@dataclass
class StepSettings:
    gradient_accumulation_steps: int = 1
    clip_grad: bool = True
    clip_norm: float = 1.0
    """Clip the global gradient norm to this (after unscaling)."""
    drop_overflow_update: bool = True
    """Skip the update when the gradients are not finite (the loss scale is lowered in fp16)."""


@dataclass
class LossScaleSettings:
    """Dynamic loss scaling, used with float16 compute (amp_level O2 + fp16): the scale is divided by
    `scale_factor` on overflow and multiplied by it after `scale_window` finite steps."""

    loss_scale_value: float = 65536.0
    scale_factor: float = 2.0
    scale_window: int = 1000


@dataclass
class ValidationSettings:
    interval: int = 0
    """Make a validation video every this many optimizer steps (0: never)."""
    image: Optional[str] = None
    """Conditioning image; default: the first frame of the first clip of the dataset."""
    num_frames: Optional[int] = None
    """Default: the clip length."""
    sampling_steps: Optional[int] = None
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    seed: int = 42


# ----------------------------------------------------------------------------------------------------------------
# command line


def build_parser():
    """The command line of train.py (jsonargparse): `--environment.*`, `--train.*`, `--svd_config`, `--LossScale.*`."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from data.video_dataset import VideoDataset
    from modules.env import init_env

    parser = ArgumentParser(description="Fine-tune Stable Video Diffusion on videos listed in a CSV file.")
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file holding any of these flags")
    parser.add_argument("--svd_config", type=str, default="configs/svd.yaml", help="the model config")
    parser.add_function_arguments(init_env, "environment")
    add = parser.add_argument
    add("--train.epochs", type=int, default=10, help="passes over each device's shard of the dataset")
    add(
        "--train.max_steps",
        type=Optional[int],
        default=None,
        help="end the run after this many optimizer steps (the learning-rate schedule spans them)",
    )
    add("--train.temporal_only", type=bool, default=True, help="train only the UNet's temporal layers")
    add(
        "--train.pretrained",
        type=Optional[str],
        default=None,
        help="weights to start from (MindSpore .ckpt, sgm .safetensors or a diffusers folder); none: random",
    )
    add(
        "--train.amp_level",
        type=Literal["O0", "O2"],
        default="O0",
        help="O0: float32; O2: the UNet computes in amp_dtype, weights and optimizer stay float32",
    )
    add(
        "--train.amp_dtype",
        type=Literal["fp16", "bf16"],
        default="fp16",
        help="half type for O2; fp16 uses dynamic loss scaling (--LossScale.*)",
    )
    add("--train.output_dir", type=str, default="output/train", help="checkpoints, logs and videos go here")
    add("--train.save_interval", type=int, default=500, help="save a checkpoint every this many optimizer steps")
    add("--train.keep_checkpoints", type=int, default=3, help="keep the last this many checkpoints")
    add(
        "--train.save_trainable_only",
        type=bool,
        default=True,
        help="checkpoints hold only the trained parameters (resuming then needs the same --train.pretrained)",
    )
    add(
        "--train.export_final",
        type=bool,
        default=True,
        help="write all weights to <output_dir>/final.ckpt at the end (loadable by image_to_video.py)",
    )
    add(
        "--train.resume",
        type=Union[bool, str],
        default=False,
        help="True: continue from the last checkpoint in output_dir (if any); or a checkpoint folder",
    )
    add(
        "--train.ucg_rate",
        type=Optional[float],
        default=0.1,
        help="conditioning dropout of the image embeddings (CLIP and VAE latent) per clip; None: the model config's",
    )
    add("--train.ema_decay", type=Optional[float], default=None, help="keep an EMA of the trained weights")
    add("--train.recompute", type=bool, default=False, help="recompute UNet blocks in the backward pass (less memory)")
    parser.add_subclass_arguments(VideoDataset, "train.dataset", required=True, instantiate=True)
    parser.add_class_arguments(DataLoaderSettings, "train.dataloader")
    parser.add_class_arguments(SchedulerSettings, "train.scheduler")
    parser.add_class_arguments(OptimizerSettings, "train.optimizer")
    parser.add_class_arguments(StepSettings, "train.settings")
    parser.add_class_arguments(ValidationSettings, "train.validation")
    parser.add_class_arguments(LossScaleSettings, "LossScale")
    return parser


def check_args(args) -> None:
    """Impossible settings and missing inputs, found before anything is built or written (ValueError)."""
    from modules.config import load_config

    t = args.train
    positive = {
        "--train.epochs": t.epochs,
        "--train.save_interval": t.save_interval,
        "--train.keep_checkpoints": t.keep_checkpoints,
        "--train.dataloader.batch_size": t.dataloader.batch_size,
        "--train.settings.gradient_accumulation_steps": t.settings.gradient_accumulation_steps,
    }
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if t.max_steps is not None and t.max_steps < 1:
        raise ValueError(f"--train.max_steps must be at least 1, got {t.max_steps}")
    if t.scheduler.lr <= 0 or t.scheduler.end_lr < 0 or t.scheduler.warmup_steps < 0:
        raise ValueError("--train.scheduler: lr must be positive, end_lr and warmup_steps not negative")
    if t.settings.clip_grad and t.settings.clip_norm <= 0:
        raise ValueError(f"--train.settings.clip_norm must be positive, got {t.settings.clip_norm}")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        raise ValueError(f"--train.ema_decay must be between 0 and 1, got {t.ema_decay}")
    if t.ucg_rate is not None and not 0.0 <= t.ucg_rate <= 1.0:
        raise ValueError(f"--train.ucg_rate must be between 0 and 1, got {t.ucg_rate}")
    if len(t.optimizer.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.optimizer.betas):
        raise ValueError(f"--train.optimizer.betas must be two numbers in [0, 1), got {list(t.optimizer.betas)}")
    if t.validation.interval < 0:
        raise ValueError(f"--train.validation.interval must not be negative, got {t.validation.interval}")
    if t.validation.interval and t.validation.image is not None and not os.path.isfile(t.validation.image):
        raise ValueError(f"validation image not found: {t.validation.image}")
    if t.pretrained is not None and not os.path.exists(t.pretrained):
        raise ValueError(f"--train.pretrained not found: {t.pretrained}")
    load_config(args.svd_config)  # raises ValueError with the reason
    if resume_folder(t.output_dir, t.resume) is None and (
        list_checkpoints(t.output_dir) or os.path.isfile(os.path.join(t.output_dir, "train_log.csv"))
    ):
        raise ValueError(
            f"{t.output_dir} already holds a training run: pass --train.resume=True to continue it, "
            "or choose another --train.output_dir"
        )


def make_dataset(spec):
    """The dataset of a `--train.dataset` class_path/init_args spec."""
    from modules.config import get_obj

    init_args = vars(spec.init_args) if spec.init_args is not None else {}
    return get_obj(spec.class_path)(**init_args)


def write_text(path: str, text: str) -> None:
    """Write a small text file atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def build_training_engine(svd_config: str, pretrained: str | None, recompute: bool, ucg_rate: float | None):
    """The engine of `svd_config` with `pretrained` weights (or random ones), recompute and conditioning dropout."""
    from modules.build import build_engine
    from modules.config import load_config, to_container

    cfg = to_container(load_config(svd_config))
    if recompute:
        cfg["model"]["params"]["network_config"].setdefault("params", {})["use_checkpoint"] = True
    engine = build_engine(cfg, pretrained)
    if ucg_rate is not None:
        cond = engine.conditioner
        for i, keys in enumerate(cond.input_keys):
            if any(k in IMAGE_KEYS for k in keys):
                cond.ucg_rates[i] = float(ucg_rate)
    return engine


def describe(engine: nn.Cell, params: list[Parameter]) -> list[str]:
    """Parameter counts for the start-of-run banner."""
    parts = {
        "UNet": engine.unet.get_parameters(),
        "conditioner": engine.conditioner.get_parameters(),
        "VAE": engine.first_stage_model.get_parameters(),
    }
    counts = {k: param_count(list(v)) for k, v in parts.items()}
    total = param_count(list(engine.get_parameters()))
    out = [", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()) + f", total {total / 1e6:.2f}M parameters"]
    out.append(f"training {param_count(params):,} parameters in {len(params)} tensors; every other one is frozen")
    return out


def configure_logging(output_dir: str | None, rank: int) -> None:
    """INFO to the console on every rank (msrun keeps one log per worker); rank 0 also writes train.log."""
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if not root.handlers:
        console = logging.StreamHandler()
        console.setFormatter(fmt)
        root.addHandler(console)
    if output_dir is not None:
        handler = logging.FileHandler(os.path.join(output_dir, "train.log"))
        handler.setFormatter(fmt)
        root.addHandler(handler)


# ----------------------------------------------------------------------------------------------------------------
# what trains


def select_trainable(engine: nn.Cell, temporal_only: bool) -> list[Parameter]:
    """The UNet's parameters, or only its temporal ones; every other parameter of the engine is frozen.

    Parameters the model builds frozen (e.g. a `fixed` blend factor, sgm's buffer) stay frozen.
    """
    unet = {p.name for p in engine.unet.get_parameters() if p.requires_grad}
    temporal = None
    if temporal_only:
        prefix = "model.diffusion_model."
        temporal = engine.unet.get_temporal_param_names(prefix=prefix)
        if not temporal & unet:  # names relative to the UNet (it was built outside an engine)
            temporal = {n[len(prefix) :] for n in temporal}
    params = []
    for p in engine.get_parameters():
        train = p.name in unet and (temporal is None or p.name in temporal)
        p.requires_grad = train
        if train:
            params.append(p)
    if not params:
        raise ValueError("no parameter to train (temporal_only with a UNet that has no temporal layers?)")
    return params


def no_decay_names(engine: nn.Cell) -> set[str]:
    """Parameters excluded from weight decay: normalisation weights, biases and scalars (blend factors)."""
    from modules.layers import GroupNorm, LayerNorm

    names = set()
    for _, cell in engine.cells_and_names():
        if isinstance(cell, (GroupNorm, LayerNorm)):
            names.update(p.name for p in cell.get_parameters(expand=False))
    for p in engine.get_parameters():
        if p.name.endswith(".bias") or len(p.shape) <= 1:
            names.add(p.name)
    return names


def param_count(params) -> int:
    return int(sum(math.prod(p.shape) for p in params))


def weights_digest(params) -> str:
    """sha256 of the parameters' bytes, in order (ranks of a data-parallel run must agree)."""
    h = hashlib.sha256()
    for p in params:
        h.update(np.ascontiguousarray(p.asnumpy()).tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# learning rate


def lr_schedule(settings: SchedulerSettings, total_steps: int) -> np.ndarray:
    """The learning rate of optimizer steps 0..total_steps-1: linear warm-up to `lr`, then constant or a cosine
    decay to `end_lr` over the remaining steps."""
    steps = np.arange(max(total_steps, 1), dtype=np.float64)
    lr = np.full_like(steps, settings.lr)
    w = settings.warmup_steps
    if settings.name == "cosine_decay":
        progress = np.clip((steps - w) / max(1, total_steps - w), 0.0, 1.0)
        lr = settings.end_lr + 0.5 * (settings.lr - settings.end_lr) * (1.0 + np.cos(math.pi * progress))
    if w > 0:
        lr = np.where(steps < w, settings.lr * (steps + 1) / w, lr)
    return lr.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# cells


def edm_c_noise(sigma: np.ndarray) -> np.ndarray:
    """c_noise = ln(sigma) / 4, the noise conditioning of both EDM scalings, computed on the host.

    MindSpore's CPU Log kernel on a few elements changes its last bits with the parallel block size it searches
    for over the first launches, so an in-graph c_noise would make a resumed run drift from an uninterrupted one.
    """
    return (0.25 * np.log(sigma.astype(np.float64))).astype(np.float32)


class DiffusionLoss(nn.Cell):
    """The EDM loss of a micro-batch: mean_frames w(sigma) |D(x + sigma n; sigma, cond) - x|^2, with
    D = c_skip x + c_out F(c_in x, c_noise, cond) from the engine's denoiser scaling and weighting.

    x, noise: (b t) c h w latents and unit noise; sigma, c_noise: (b t,), one value per clip repeated over its frames
    (c_noise from `edm_c_noise`); concat (b t) c h w, context (b t) 1 d, y (b t) d: the conditioning, per frame.
    """

    def __init__(self, engine: nn.Cell, num_frames: int):
        super().__init__(auto_prefix=False)
        if engine.loss_fn is None or engine.sigma_sampler is None:
            raise ValueError("the model config needs loss_fn_config and sigma_sampler_config to train")
        scaling = engine.denoiser.scaling
        probe = np.array([0.05, 1.0, 30.0], np.float32)
        if not np.allclose(scaling(Tensor(probe))[3].asnumpy(), edm_c_noise(probe), atol=1e-5):
            name = type(scaling).__name__
            raise NotImplementedError(f"{name}: training supports denoiser scalings with c_noise = ln(sigma) / 4")
        self.model = engine.model
        self.scaling = scaling
        self.weighting = engine.denoiser.weighting
        self.loss_fn = engine.loss_fn
        self.compute_dtype = engine.compute_dtype
        self.num_frames = num_frames

    def construct(self, x, noise, sigma, c_noise, concat, context, y):
        s = sigma.reshape(-1, 1, 1, 1)
        noised = x + noise * s
        c_skip, c_out, c_in, _ = self.scaling(s)
        dt = self.compute_dtype
        out = self.model(
            (noised * c_in).astype(dt), c_noise, concat.astype(dt), context.astype(dt), y.astype(dt), self.num_frames
        )
        pred = out.astype(ms.float32) * c_out + noised * c_skip
        return self.loss_fn(pred, x, self.weighting(s)).mean()


_adamw = ops.MultitypeFuncGraph("adamw")


@_adamw.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Bool", "Bool", "Tensor",
                 "Tensor", "Tensor", "Tensor")  # fmt: skip
def _adamw_update(opt, factor, b1, b2, eps, lr, wd, guard, decay, param, m, v, g):
    """One parameter's AdamW step with MindSpore's fused in-place kernel on the gradient times `factor` (unscaling
    and clipping); that product is the only temporary, one parameter's size. With `guard`, infinities and NaNs
    become zeros, so that a skipped step (betas of 1, a learning rate of 0) leaves the parameter and both moments
    exactly as they are: `where` would broadcast its condition and its zero to the parameter's shape."""
    g = g.astype(param.dtype) * factor.astype(param.dtype)
    if guard:
        g = ops.nan_to_num(g, 0.0, 0.0, 0.0)
    return opt(param, m, v, lr, b1, b2, eps, wd if decay else wd * 0, g)


_ema = ops.MultitypeFuncGraph("ema")


@_ema.register("Tensor", "Tensor", "Tensor")
def _ema_update(rate, ema, param):
    return ops.assign_add(ema, rate * (param.astype(ema.dtype) - ema))


_sq = ops.MultitypeFuncGraph("sq")


@_sq.register("Tensor")
def _sum_sq(g):
    return ops.square(g.astype(ms.float32)).sum()


_sq_kernel = ops.MultitypeFuncGraph("sq_kernel")


@_sq_kernel.register("Function", "Tensor")
def _sum_sq_kernel(op, g):
    return op(g).reshape(())


_adamw_kernel = ops.MultitypeFuncGraph("adamw_kernel")


@_adamw_kernel.register("Function", "Tensor", "Tensor", "Bool", "Tensor", "Tensor", "Tensor", "Tensor")
def _adamw_kernel_update(op, with_decay, without_decay, decay, param, m, v, g):
    """One parameter's AdamW step in the compiled kernel (in place; see `modules/kernels/optim.cc`)."""
    return op(param, m, v, g, with_decay if decay else without_decay)


_after = ops.MultitypeFuncGraph("after")


@_after.register("Tensor", "Tensor")
def _after_tensor(done, x):
    return ops.depend(x, done)


def update_groups(sizes: list[int], limit: int = 1 << 25) -> tuple[tuple[int, int], ...]:
    """Consecutive (start, end) ranges of parameters, each holding at most `limit` values unless one parameter alone
    is larger. The update runs them one after the other, so that its temporaries never exceed one group."""
    groups, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and total + n > limit:
            groups.append((start, i))
            start, total = i, 0
        total += n
    if start < len(sizes):
        groups.append((start, len(sizes)))
    return tuple(groups)


class Updater(nn.Cell):
    """From summed, loss-scaled gradients to updated weights: all-reduce, unscale, overflow check, loss-scale update,
    global-norm clipping, AdamW (torch semantics, learning rate indexed by optimizer step), EMA.

    State: AdamW moments `adam_m.*`/`adam_v.*`, `optimizer_step` (successful updates), `loss_scale`,
    `loss_scale_good_steps`, and the EMA weights `ema.*` when asked.

    Memory: besides the moments, the update needs one group of `group_values` values for its temporaries (128 MB
    in float32 by default), none with the compiled kernels. Updating all at once held several scaled and masked
    copies of every gradient: on 650 M values it peaked at 17.0 GiB in PyNative, against 9.7 GiB for the weights,
    gradients and moments (`benchmarks/bench_update.py`).
    """

    def __init__(
        self,
        params: list[Parameter],
        optimizer: OptimizerSettings,
        no_decay: set[str],
        step: StepSettings,
        loss_scale: LossScaleSettings | None = None,
        ema_decay: float | None = None,
        world: int = 1,
        group_values: int = 1 << 25,
    ):
        super().__init__(auto_prefix=False)  # keep the engine's parameter names (and the state's own)
        self.params = ParameterTuple(params)
        self.exp_avg = self.params.clone("adam_m", "zeros")
        self.exp_avg_sq = self.params.clone("adam_v", "zeros")
        for p in self.exp_avg + self.exp_avg_sq:
            p.requires_grad = False
        self.decay = tuple(p.name not in no_decay for p in params)
        self.weight_decay = float(optimizer.weight_decay)
        self.beta1 = float(optimizer.betas[0])
        self.beta2 = float(optimizer.betas[1])
        self.eps = float(optimizer.eps)
        self.adam = ops.AdamWeightDecay()
        self.step = Parameter(Tensor(0, ms.int32), name="optimizer_step", requires_grad=False)
        self.dynamic_scale = loss_scale is not None
        init_scale = float(loss_scale.loss_scale_value) if loss_scale is not None else 1.0
        self.loss_scale = Parameter(Tensor(init_scale, ms.float32), name="loss_scale", requires_grad=False)
        self.good_steps = Parameter(Tensor(0, ms.int32), name="loss_scale_good_steps", requires_grad=False)
        ls = loss_scale or LossScaleSettings()
        self.scale_factor = float(ls.scale_factor)
        self.scale_window = int(ls.scale_window)
        self.accum_steps = int(step.gradient_accumulation_steps)
        self.clip = float(step.clip_norm) if step.clip_grad else 0.0
        self.drop_overflow = bool(step.drop_overflow_update)
        self.use_ema = ema_decay is not None
        self.ema_decay = 0.0
        if self.use_ema:
            self.ema = self.params.clone("ema", "same")
            for p in self.ema:
                p.requires_grad = False
            self.ema_decay = float(ema_decay)
        self.reducer = nn.DistributedGradReducer(self.params, mean=True, degree=world) if world > 1 else None
        self.hyper_map = ops.HyperMap()
        self.groups = update_groups([int(np.prod(p.shape)) for p in params], group_values)
        # the compiled kernels when every trained parameter is float32 (the default); else MindSpore's operators
        found = kernels.optimizer_ops() if all(p.dtype == ms.float32 for p in params) else None
        self.use_kernels = found is not None
        if found is not None:
            self.sum_squares, self.adamw_step = found

    def state_parameters(self) -> list[Parameter]:
        """Optimizer and loss-scale state (the EMA weights are saved apart, under the model's names)."""
        return [self.step, self.loss_scale, self.good_steps, *self.exp_avg, *self.exp_avg_sq]

    def construct(self, grads, lr):
        if self.reducer is not None:
            grads = self.reducer(grads)
        inv = 1.0 / (self.loss_scale * self.accum_steps)
        if self.use_kernels:
            squares = self.hyper_map(ops.partial(_sq_kernel, self.sum_squares), grads)
        else:
            squares = self.hyper_map(_sq, grads)
        norm = ops.sqrt(ops.addn(squares)) * inv  # of the unscaled gradients
        finite = ops.isfinite(norm)
        if self.dynamic_scale:
            good = ops.where(finite, self.good_steps + 1, ops.zeros_like(self.good_steps))
            grow = good >= self.scale_window
            scale = ops.where(finite, self.loss_scale, ops.maximum(self.loss_scale / self.scale_factor, 1.0))
            scale = ops.where(grow, scale * self.scale_factor, scale)
            ops.assign(self.good_steps, ops.where(grow, ops.zeros_like(good), good))
            ops.assign(self.loss_scale, scale)
        factor = inv
        if self.clip > 0:
            factor = inv * ops.minimum(self.clip / (norm + 1e-6), 1.0)
        ok = finite if self.drop_overflow else ops.ones_like(finite)

        # torch.optim.AdamW through the fused kernel p -= lr' (m / (sqrt(v) + eps') + wd' p): the bias corrections
        # go into lr' = lr sqrt(bc2) / bc1 and eps' = eps sqrt(bc2), and wd' = wd / (lr' / lr) keeps the decay lr wd
        t = (self.step + 1).astype(ms.float32)
        bc1 = 1.0 - ops.pow(self.beta1, t)
        root_bc2 = ops.sqrt(1.0 - ops.pow(self.beta2, t))
        lr_t = ops.where(ok, lr * root_bc2 / bc1, ops.zeros_like(lr))
        wd = self.weight_decay * bc1 / root_bc2
        one = ops.ones_like(lr)
        b1 = ops.where(ok, one * self.beta1, one)
        b2 = ops.where(ok, one * self.beta2, one)
        eps = one * self.eps * root_bc2
        if self.use_kernels:
            values = [factor * one, lr_t, b1, b2, eps, wd * one, one * float(self.drop_overflow), one * 0]
            with_decay = ops.stack(values).astype(ms.float32)
            values[5] = one * 0
            adam = ops.partial(_adamw_kernel, self.adamw_step, with_decay, ops.stack(values).astype(ms.float32))
        else:
            adam = ops.partial(_adamw, self.adam, factor, b1, b2, eps, lr_t, wd, self.drop_overflow)
        rate = ops.where(ok, one * (1.0 - self.ema_decay), ops.zeros_like(one))
        # group after group: a graph would otherwise be free to run every parameter's scaling first and hold a
        # scaled copy of all gradients at once; the EMA reads each group's parameters once their update is done
        done = norm  # a scalar that waits for each group in turn
        for start, end in self.groups:
            g = self.hyper_map(ops.partial(_after, done), grads[start:end])
            out = self.hyper_map(adam, self.decay[start:end], self.params[start:end], self.exp_avg[start:end],
                                 self.exp_avg_sq[start:end], g)  # fmt: skip
            # the kernel's one-value outputs are summed: a data dependency on each, which no pass can prune
            done = ops.depend(done, ops.addn(out)) if self.use_kernels else ops.depend(done, out)
            if self.use_ema:
                params = self.hyper_map(ops.partial(_after, done), self.params[start:end])
                done = ops.depend(done, self.hyper_map(ops.partial(_ema, rate), self.ema[start:end], params))
        norm = done
        norm = ops.depend(norm, ops.assign(self.step, ops.where(ok, self.step + 1, self.step)))
        return norm, finite


class TrainStep(nn.Cell):
    """One micro-batch: loss and its gradients with respect to the trainable parameters, then the update (no
    accumulation: all in one compiled graph) or the sum into the accumulators (ApplyAccumulated then updates).

    Returns (loss, gradient norm, finite); with accumulation the last two are placeholders until the update.
    """

    def __init__(self, loss: DiffusionLoss, updater: Updater):
        super().__init__(auto_prefix=False)
        self.loss = loss
        self.updater = updater
        self.weights = updater.params
        self.accum_steps = updater.accum_steps
        # one forward and one backward: the gradients of loss * loss_scale, and the unscaled loss alongside
        self.grad = ms.value_and_grad(self.scaled_loss, None, self.weights, has_aux=True)
        self.hyper_map = ops.HyperMap()
        if self.accum_steps > 1:
            self.accum = self.weights.clone("accum", "zeros")
            for p in self.accum:
                p.requires_grad = False

    def scaled_loss(self, x, noise, sigma, c_noise, concat, context, y):
        loss = self.loss(x, noise, sigma, c_noise, concat, context, y)
        return loss * ops.stop_gradient(self.updater.loss_scale).astype(loss.dtype), loss

    def construct(self, x, noise, sigma, c_noise, concat, context, y, lr):
        (_, loss), grads = self.grad(x, noise, sigma, c_noise, concat, context, y)
        if self.accum_steps == 1:
            norm, finite = self.updater(grads, lr)
            return loss, norm, finite
        added = self.hyper_map(ops.assign_add, self.accum, grads)
        return ops.depend(loss, added), ops.zeros((), ms.float32), ops.ones((), ms.bool_)


class ApplyAccumulated(nn.Cell):
    """The update from the accumulated gradients, then the accumulators back to zero (a small separate graph)."""

    def __init__(self, step: TrainStep):
        super().__init__(auto_prefix=False)
        self.updater = step.updater
        self.accum = step.accum
        self.hyper_map = ops.HyperMap()

    def construct(self, lr):
        norm, finite = self.updater(self.accum, lr)
        # zeroed once the update is done: the update reads them as plain inputs
        zeros = self.hyper_map(ops.partial(_after, norm), self.hyper_map(ops.zeros_like, self.accum))
        zero = self.hyper_map(ops.assign, self.accum, zeros)
        return ops.depend(norm, zero), finite


# ----------------------------------------------------------------------------------------------------------------
# the trainer


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool
    lr: float
    loss_scale: float


class Trainer:
    """Prepares micro-batches outside the gradient and runs the compiled step, accumulating when asked."""

    def __init__(
        self,
        engine: nn.Cell,
        params: list[Parameter],
        num_frames: int,
        lr: np.ndarray,
        optimizer: OptimizerSettings,
        step: StepSettings,
        loss_scale: LossScaleSettings | None = None,
        ema_decay: float | None = None,
        seed: int = 42,
        rank: int = 0,
        world: int = 1,
    ):
        self.engine = engine
        self.params = params
        self.num_frames = num_frames
        self.seed = seed
        self.rank = rank
        self.lr = lr  # per optimizer step (successful updates); fed to the step as an input
        self.updater = Updater(params, optimizer, no_decay_names(engine), step, loss_scale, ema_decay, world)
        self.step_cell = TrainStep(DiffusionLoss(engine, num_frames), self.updater)
        self.apply_cell = ApplyAccumulated(self.step_cell) if self.updater.accum_steps > 1 else None
        self.accum_steps = self.updater.accum_steps
        self._micro = 0
        self._losses: list[float] = []
        engine.set_train(False)
        engine.unet.set_train(True)
        self.step_cell.set_train(True)

    def rng(self, step: int, micro: int) -> np.random.Generator:
        """The generator of micro-batch `micro` of optimizer step `step` on this rank."""
        return np.random.default_rng([self.seed, 2, step, micro, self.rank])

    def prepare(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[Tensor, ...]:
        """A collated batch -> the step cell's inputs (x, noise, sigma, c_noise, concat, context, y), (b t)-major.

        Draw order: the VAE posterior noise, the conditioning dropout, sigma, the diffusion noise.
        """
        engine = self.engine
        b, t = batch["frames"].shape[:2]
        if t != self.num_frames:
            raise ValueError(f"the batch has {t} frames per clip, the step was built for {self.num_frames}")
        frames = batch["frames"].reshape((b * t,) + batch["frames"].shape[2:])
        f = engine.latent_factor
        z_shape = (b * t, engine.unet.out_channels, frames.shape[2] // f, frames.shape[3] // f)
        eps = rng.standard_normal(z_shape, dtype=np.float32)
        x = engine.encode_first_stage(Tensor(frames), noise=Tensor(eps))
        cbatch = {k: Tensor(batch[k]) for k in IMAGE_KEYS}
        for k in ("fps_id", "motion_bucket_id", "cond_aug"):
            cbatch[k] = Tensor(np.repeat(batch[k].astype(np.float32), t))  # one value per frame, (b t)
        cond = engine.conditioner.construct_dict(cbatch, ucg_rng=rng)
        concat = ops.repeat_interleave(cond["concat"], t, 0)
        context = ops.repeat_interleave(cond["crossattn"], t, 0)
        sigma = np.repeat(engine.sigma_sampler(b, rng), t).astype(np.float32)
        noise = engine.loss_fn.sample_noise(tuple(x.shape), rng)
        return x, Tensor(noise), Tensor(sigma), Tensor(edm_c_noise(sigma)), concat, context, cond["vector"]

    def train_batch(self, batch: dict[str, np.ndarray], step: int) -> StepResult | None:
        """One micro-batch of optimizer step `step` (its randomness keyed by step, micro-batch and rank)."""
        return self.micro_step(self.prepare(batch, self.rng(step, self._micro)))

    def micro_step(self, inputs: tuple[Tensor, ...]) -> StepResult | None:
        """Run one micro-batch; returns the result when it completed an optimizer step."""
        lr = float(self.lr[min(int(self.updater.step.asnumpy()), len(self.lr) - 1)])
        scale = float(self.updater.loss_scale.asnumpy())
        loss, norm, finite = self.step_cell(*inputs, Tensor(lr, ms.float32))
        self._losses.append(float(loss.asnumpy()))
        self._micro += 1
        if self._micro < self.accum_steps:
            return None
        if self.apply_cell is not None:
            norm, finite = self.apply_cell(Tensor(lr, ms.float32))
        result = StepResult(
            loss=float(np.mean(self._losses)),
            grad_norm=float(norm.asnumpy()),
            skipped=not bool(finite.asnumpy()) and self.updater.drop_overflow,
            lr=lr,
            loss_scale=scale,
        )
        self._micro, self._losses = 0, []
        return result

    def state_parameters(self) -> list[Parameter]:
        return self.updater.state_parameters()

    def ema_weights(self) -> dict[str, Tensor] | None:
        """The EMA weights under the trained parameters' names, or None without EMA."""
        if not self.updater.use_ema:
            return None
        return {p.name: e for p, e in zip(self.params, self.updater.ema)}


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: <output_dir>/checkpoints/step_XXXXXXXX/{model.ckpt, train_state.ckpt, ema.ckpt, state.json}


def _save_ckpt(items: list[tuple[str, Tensor]], path: str) -> None:
    ms.save_checkpoint([{"name": n, "data": t} for n, t in items], path)


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints of a run, oldest first: [(step, folder)]."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith("step_") and name[5:].isdigit() and os.path.isfile(os.path.join(path, "state.json")):
            found.append((int(name[5:]), path))
    return sorted(found)


def save_checkpoint(
    output_dir: str,
    step: int,
    model: list[Parameter],
    state: list[Parameter],
    meta: dict,
    ema: dict[str, Tensor] | None = None,
    keep: int = 3,
) -> str:
    """Write a checkpoint folder atomically (built under a temporary name, then renamed) and keep the last `keep`."""
    root = os.path.join(output_dir, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = tempfile.mkdtemp(prefix=f".step_{step:08d}.", dir=root)
    try:
        _save_ckpt([(p.name, p) for p in model], os.path.join(tmp, "model.ckpt"))
        _save_ckpt([(p.name, p) for p in state], os.path.join(tmp, "train_state.ckpt"))
        if ema is not None:
            _save_ckpt(list(ema.items()), os.path.join(tmp, "ema.ckpt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({**meta, "step": step}, f, indent=2)
        if os.path.exists(final):  # a re-run of the same step after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    for _, old in list_checkpoints(output_dir)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_into(params: list[Parameter], path: str, what: str, names: list[str] | None = None) -> None:
    """Fill `params` from a MindSpore checkpoint by their names (or by `names`); all must be there, same shapes."""
    try:
        saved = ms.load_checkpoint(path)
    except Exception as e:  # damaged or truncated files raise several types
        raise ValueError(f"{path} is not a readable checkpoint: {e}") from e
    names = names or [p.name for p in params]
    missing = [n for n in names if n not in saved]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} {what} parameter(s), e.g. {missing[0]}")
    for p, n in zip(params, names):
        value = saved[n]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{path}: {n} is {tuple(value.shape)}, the model has {tuple(p.shape)}")
        p.set_data(Tensor(value.asnumpy(), p.dtype))


def resume_folder(output_dir: str, resume: bool | str) -> str | None:
    """The checkpoint folder to resume from: the last one of `output_dir` (resume=True), or the folder given."""
    if resume is False or resume is None:
        return None
    if isinstance(resume, str) and resume.lower() not in ("true", "1", "yes"):
        if not os.path.isfile(os.path.join(resume, "state.json")):
            raise ValueError(f"--train.resume={resume} is not a checkpoint folder (no state.json)")
        return resume
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def restore(trainer: Trainer, engine: nn.Cell, folder: str) -> dict:
    """Load a checkpoint folder into the trainer (weights, optimizer, loss scale, EMA); returns its state.json."""
    with open(os.path.join(folder, "state.json")) as f:
        meta = json.load(f)
    model = trainer.params if meta.get("trainable_only") else list(engine.get_parameters())
    load_into(model, os.path.join(folder, "model.ckpt"), "model")
    load_into(trainer.state_parameters(), os.path.join(folder, "train_state.ckpt"), "optimizer-state")
    if trainer.updater.use_ema:
        ema_path = os.path.join(folder, "ema.ckpt")
        if os.path.isfile(ema_path):
            load_into(list(trainer.updater.ema), ema_path, "EMA", [p.name for p in trainer.params])
        else:
            logger.warning("%s has no EMA weights; the EMA starts from the current weights", folder)
            for e, p in zip(trainer.updater.ema, trainer.params):
                e.set_data(Tensor(p.asnumpy(), e.dtype))
    return meta


def export_full(engine: nn.Cell, path: str, override: dict[str, Tensor] | None = None) -> str:
    """All engine weights as one MindSpore checkpoint (loadable with build_engine / image_to_video), atomically;
    `override` replaces some (e.g. EMA weights)."""
    override = override or {}
    with atomic_path(path) as tmp:
        _save_ckpt([(p.name, override.get(p.name, p)) for p in engine.get_parameters()], tmp)
    return path


# ----------------------------------------------------------------------------------------------------------------
# step log and loss plot


class StepLog:
    """Per-step CSV (`train_log.csv`) and loss plot (`loss.png`) in the output folder."""

    COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "loss_scale", "skipped", "step_time_s")

    def __init__(self, output_dir: str, resume_step: int = 0):
        self.path = os.path.join(output_dir, "train_log.csv")
        self.plot_path = os.path.join(output_dir, "loss.png")
        rows = []
        if os.path.isfile(self.path):
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        # rewrite: steps after the checkpoint a run resumes from are dropped (they are trained again)
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        self.steps = [int(r["step"]) for r in rows]
        self.losses = [float(r["loss"]) for r in rows]
        self._file = open(self.path, "a", newline="")
        self._writer = csv.writer(self._file)

    def add(self, step: int, epoch: int, r: StepResult, seconds: float) -> None:
        row = (step, epoch, f"{r.loss:.6g}", f"{r.lr:.6g}", f"{r.grad_norm:.6g}", f"{r.loss_scale:g}", int(r.skipped))
        self._writer.writerow(row + (f"{seconds:.4f}",))
        self._file.flush()
        self.steps.append(step)
        self.losses.append(r.loss)

    def plot(self) -> None:
        if self.steps:
            plot_loss(self.steps, self.losses, self.plot_path)

    def close(self) -> None:
        self._file.close()


def plot_loss(steps: list[int], losses: list[float], path: str, size: tuple[int, int] = (800, 400)) -> None:
    """A line plot of the loss (grey) and its running mean (blue) with Pillow, written atomically."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 70, 20, 20, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    y = np.asarray(losses, np.float64)
    x = np.asarray(steps, np.float64)
    finite = np.isfinite(y)
    if not finite.any():
        return
    lo, hi = float(y[finite].min()), float(y[finite].max())
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = float(x.min()), float(max(x.max(), x.min() + 1))

    def to_px(xv, yv):
        px = left + (xv - x0) / (x1 - x0) * (w - left - right)
        py = top + (hi - yv) / (hi - lo) * (h - top - bottom)
        return float(px), float(py)

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for frac in (0.0, 0.5, 1.0):
        yv = lo + frac * (hi - lo)
        draw.text((5, to_px(x0, yv)[1] - 6), f"{yv:.4g}", fill="black")
    draw.text((left, h - bottom + 5), f"step {int(x0)}", fill="black")
    draw.text((w - right - 90, h - bottom + 5), f"step {int(x1)}", fill="black")
    draw.text((left + 10, top + 5), "loss (grey), running mean (blue)", fill="black")
    pts = [to_px(a, b) for a, b in zip(x[finite], y[finite])]
    if len(pts) > 1:
        draw.line(pts, fill=(170, 170, 170), width=1)
        k = max(1, len(pts) // 20)
        mean = np.convolve(y[finite], np.ones(k) / k, mode="valid")
        draw.line([to_px(a, b) for a, b in zip(x[finite][k - 1 :], mean)], fill=(30, 80, 200), width=2)
    with atomic_path(path) as tmp:
        img.save(tmp)


# ----------------------------------------------------------------------------------------------------------------
# validation video


class Validator:
    """Makes a video from a fixed image with the current weights (the same seed every time)."""

    def __init__(self, engine: nn.Cell, image: np.ndarray, settings: ValidationSettings, num_frames: int, out: str):
        from modules.pipeline import SVDPipeline

        self.engine = engine
        self.pipe = SVDPipeline(engine, num_frames, verbose=False)
        self.image = image
        self.settings = settings
        self.out = out

    def __call__(self, step: int) -> str:
        from data.video_io import write_video

        s = self.settings
        start = time.perf_counter()
        video = self.pipe(
            self.image,
            num_inference_steps=s.sampling_steps,
            fps=s.fps,
            motion_bucket_id=s.motion_bucket_id,
            noise_aug_strength=s.noise_aug_strength,
            seed=s.seed,
        ).frames[0]
        path = write_video(video, os.path.join(self.out, f"step_{step:08d}.mp4"), s.fps)
        self.engine.set_train(False)
        self.engine.unet.set_train(True)
        logger.info("validation video %s (%.1f s)", path, time.perf_counter() - start)
        return path


def first_frame_uint8(sample: dict[str, np.ndarray]) -> np.ndarray:
    """(H, W, 3) uint8 of a sample's conditioning frame."""
    x = sample["cond_frames_without_noise"].transpose(1, 2, 0)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


__all__ = [
    "ApplyAccumulated",
    "DataLoaderSettings",
    "DiffusionLoss",
    "LossScaleSettings",
    "OptimizerSettings",
    "SchedulerSettings",
    "StepLog",
    "StepResult",
    "StepSettings",
    "TrainStep",
    "Trainer",
    "Updater",
    "ValidationSettings",
    "export_full",
    "list_checkpoints",
    "load_into",
    "lr_schedule",
    "no_decay_names",
    "param_count",
    "plot_loss",
    "save_checkpoint",
    "select_trainable",
    "weights_digest",
]

# jsonargparse reads these annotations at runtime
_ = (List, Optional, Union)
