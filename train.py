"""Fine-tune Stable Video Diffusion on videos listed in a CSV file.

    python train.py --config=configs/svd_train.yaml --svd_config=configs/svd.yaml --train.pretrained=svd.safetensors \
        --train.output_dir=output/run1 --environment.mode=0 --train.temporal_only=True --train.epochs=10 \
        --train.dataset.init_args.frames=14 --train.dataset.init_args.step=2 \
        --train.dataset.init_args.data_dir=videos --train.dataset.init_args.metadata=videos.csv

Data parallel: `msrun --worker_num=N --local_worker_num=N train.py ... --environment.distributed=True`.
The output folder gets checkpoints/, train_log.csv, loss.png, train.log, config.yaml and validation/ videos;
`--train.resume=True` continues from its last checkpoint exactly where the run stopped.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time

import mindspore as ms  # before anything that may import decord
import numpy as np
from tqdm.auto import tqdm

from data.video_dataset import ClipLoader
from modules.convert.sources import CheckpointError
from modules.env import init_env
from modules.training import (
    LossScaleSettings,
    StepLog,
    Trainer,
    Validator,
    build_parser,
    build_training_engine,
    check_args,
    configure_logging,
    describe,
    export_full,
    first_frame_uint8,
    lr_schedule,
    make_dataset,
    restore,
    resume_folder,
    save_checkpoint,
    select_trainable,
    weights_digest,
    write_text,
)

logger = logging.getLogger("train")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    t = args.train
    seed = args.environment.seed if args.environment.seed is not None else int(time.time()) % 2**31
    try:
        # Check everything cheap first: a bad input stops the run before anything is built or written.
        check_args(args)
        dataset = make_dataset(t.dataset)  # reads and checks the CSV
        rank, world = init_env(**{**vars(args.environment), "seed": seed})
        configure_logging(None, rank)
        resume = resume_folder(t.output_dir, t.resume)
        half = t.amp_level == "O2"
        if half and t.amp_dtype == "bf16" and ms.get_context("device_target") == "CPU":
            raise ValueError("bf16 compute is not available on CPU in MindSpore 2.8: use --train.amp_dtype=fp16")

        # Model: frozen VAE and conditioner; the UNet (or its temporal layers) trains.
        engine = build_training_engine(args.svd_config, t.pretrained, t.recompute, t.ucg_rate)
        if half:
            engine.compute_dtype = ms.float16 if t.amp_dtype == "fp16" else ms.bfloat16
        params = select_trainable(engine, t.temporal_only)
        f = engine.size_multiple
        if dataset.height % f or dataset.width % f:
            raise ValueError(f"clip height and width must be multiples of {f} for this model, "
                             f"got {dataset.height}x{dataset.width}")  # fmt: skip

        # Data: each rank reads its own shard, in an order fixed by (seed, epoch).
        loader = ClipLoader(dataset, **vars(t.dataloader), seed=seed, rank=rank, world=world)
        accum = t.settings.gradient_accumulation_steps
        total_steps = t.epochs * len(loader) // accum
        if total_steps < 1:
            raise ValueError(f"{len(loader)} batches per epoch do not fill one accumulation of {accum}")
        stop = min(total_steps, t.max_steps or total_steps)
        loss_scale = LossScaleSettings(**vars(args.LossScale)) if half and t.amp_dtype == "fp16" else None
        trainer = Trainer(
            engine, params, dataset.frames, lr_schedule(t.scheduler, stop), t.optimizer, t.settings,
            loss_scale, t.ema_decay, seed, rank, world,
        )  # fmt: skip
        step, epoch, batch_idx = 0, 0, 0
        if resume is not None:
            meta = restore(trainer, engine, resume)
            step, epoch, batch_idx = meta["step"], meta["epoch"], meta["batch"]
            if (meta.get("world"), meta.get("seed"), meta.get("batch_size")) != (world, seed, loader.batch_size):
                logger.warning("resuming with a different world size, seed or batch size: the data order changes")
    except (ValueError, CheckpointError, NotImplementedError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    # Output folder (rank 0 only): the exact configuration, the model config, logs.
    if rank == 0:
        os.makedirs(t.output_dir, exist_ok=True)
        write_text(os.path.join(t.output_dir, "config.yaml"), parser.dump(args))
        shutil.copyfile(args.svd_config, os.path.join(t.output_dir, "svd.yaml"))
        configure_logging(t.output_dir, rank)
    log = StepLog(t.output_dir, step) if rank == 0 else None
    validate = None
    if rank == 0 and t.validation.interval:
        image = first_frame_uint8(dataset.get(0, np.random.default_rng(seed)))
        if t.validation.image:
            from data.image_io import load_image, resize_center_crop

            image = resize_center_crop(load_image(t.validation.image), dataset.width, dataset.height)
        frames = t.validation.num_frames or dataset.frames
        validate = Validator(engine, image, t.validation, frames, os.path.join(t.output_dir, "validation"))

    for line in describe(engine, params):
        logger.info(line)
    logger.info(
        "%d videos (%d rows skipped), %d rank(s), %d batches of %d clips x %d frames %dx%d per epoch; "
        "%d optimizer steps (accumulation %d), mode %s, %s",
        len(dataset), dataset.num_skipped, world, len(loader), loader.batch_size, dataset.frames, dataset.width,
        dataset.height, stop, accum, args.environment.mode, f"{t.amp_level} {t.amp_dtype}" if half else "fp32",
    )  # fmt: skip
    if resume is not None:
        logger.info("resumed from %s: step %d, epoch %d, batch %d", resume, step, epoch, batch_idx)

    def checkpoint() -> None:
        position = (epoch, batch_idx) if batch_idx < len(loader) else (epoch + 1, 0)
        meta = {
            "epoch": position[0],
            "batch": position[1],
            "seed": seed,
            "world": world,
            "batch_size": loader.batch_size,
            "trainable_only": t.save_trainable_only,
            "temporal_only": t.temporal_only,
            "pretrained": t.pretrained,
        }
        model = params if t.save_trainable_only else list(engine.get_parameters())
        path = save_checkpoint(
            t.output_dir, step, model, trainer.state_parameters(), meta, trainer.ema_weights(), t.keep_checkpoints
        )
        logger.info("saved %s", path)

    bar = tqdm(total=stop, initial=step, desc="training", disable=rank != 0, dynamic_ncols=True)
    tic = time.perf_counter()
    while step < stop and epoch < t.epochs:
        for batch in loader.epoch(epoch, start=batch_idx):
            batch_idx += 1
            result = trainer.train_batch(batch, step)
            if result is None:  # accumulating
                continue
            step += 1
            seconds, tic = time.perf_counter() - tic, time.perf_counter()
            if rank == 0:
                log.add(step, epoch, result, seconds)
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}")
                if result.skipped:
                    logger.warning("step %d: gradients not finite, update skipped (loss scale %g)", step,
                                   result.loss_scale)  # fmt: skip
                if step % t.save_interval == 0 or step == stop:
                    checkpoint()
                    log.plot()
                if validate is not None and step % t.validation.interval == 0:
                    validate(step)
                tic = time.perf_counter()  # step times leave out checkpoints and validation
            if step >= stop:
                break
        else:
            epoch, batch_idx = epoch + 1, 0
            if dataset.num_skipped:
                logger.info("epoch %d done; %d rows skipped so far", epoch, dataset.num_skipped)
    bar.close()

    # Every rank reports a digest of its weights: data-parallel ranks must agree.
    logger.info("rank %d: trained weights sha256 %s", rank, weights_digest(params))
    if rank == 0:
        log.plot()
        log.close()
        if t.export_final:
            logger.info("saved %s", export_full(engine, os.path.join(t.output_dir, "final.ckpt")))
            if trainer.ema_weights() is not None:
                path = export_full(engine, os.path.join(t.output_dir, "final_ema.ckpt"), trainer.ema_weights())
                logger.info("saved %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
