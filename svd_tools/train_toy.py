"""Reproduce the toy-world weights in assets/toy/ from nothing, on a CPU:

    python svd_tools/train_toy.py --work output/toy [--assets assets/toy]

Stages (each skipped when its output already exists, so an interrupted run continues):
  1. the dataset: procedural clips of moving shapes, motion buckets measured by optical flow (make_toy_dataset.py);
  2. the first stage (train_toy_vae.py): the VAE encoder and temporal decoder on many 2-frame clips a step (with
     2 clips of 8 frames a step, the same cost, it stayed grey for 1000 steps), then the decoder alone on clips of
     the model's 8 frames (decoding 8 frames with a temporal decoder trained on 2 shifts the middle frames' colours);
     both with the colour part of the error weighted up (without it the backgrounds come out grey) and the posterior
     sampled with 0.1 of its learnt std;
  3. the video UNet, trained from scratch by train.py with configs/toy/svd_toy_train.yaml (resumable);
  4. the assets: the final weights in float16, the training log, the loss plot and an example image.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "configs/toy/svd_toy.yaml"
TRAIN = "configs/toy/svd_toy_train.yaml"


def run(cmd: list[str], log: str | None = None) -> None:
    """Run a script of this repository; its output goes to the console and, when given, to `log`."""
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc, open(log or os.devnull, "a") as out:  # fmt: skip
        for line in proc.stdout:
            print(line, end="", flush=True)
            out.write(line)
    if proc.returncode:
        raise SystemExit(f"error: {cmd[0]} failed with exit code {proc.returncode}")
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def unet_steps(max_steps: int | None) -> int:
    """The UNet's optimizer steps: --max_steps, or the train config's."""
    if max_steps is not None:
        return max_steps
    from omegaconf import OmegaConf

    return int(OmegaConf.load(os.path.join(ROOT, TRAIN)).train.max_steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="output/toy", help="dataset, intermediate weights and the training run")
    p.add_argument("--assets", default="assets/toy", help="where the final weights, log and plot go")
    p.add_argument("--videos", type=int, default=600)
    p.add_argument("--vae_steps", type=int, default=900, help="first stage, encoder and decoder, on 2-frame clips")
    p.add_argument("--decoder_steps", type=int, default=400, help="then the decoder alone on 8-frame clips")
    p.add_argument("--max_steps", type=int, default=None, help="UNet optimizer steps (default: the train config's)")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)

    work = os.path.abspath(args.work)
    data = os.path.join(work, "data")
    csv = os.path.join(data, "videos.csv")
    init = os.path.join(work, "engine_init.ckpt")
    first = os.path.join(work, "vae_2frames.ckpt")
    run_dir = os.path.join(work, "unet_run")
    os.makedirs(work, exist_ok=True)

    if not os.path.isfile(csv):
        run(["svd_tools/make_toy_dataset.py", "--out", data, "--videos", str(args.videos)])
    vae = ["svd_tools/train_toy_vae.py", "--config", MODEL, "--data_dir", os.path.join(data, "videos"),
           "--metadata", csv, "--crop", "32", "--lr", "5e-4", "--posterior_noise", "0.1", "--chroma_weight", "4",
           "--log_every", "25", "--eval_every", "100",
           "--seed", str(args.seed)]  # fmt: skip
    vae_log = os.path.join(work, "vae_train.log")
    if not os.path.isfile(first):
        run(vae + ["--out", first, "--steps", str(args.vae_steps), "--batch", "8", "--frames", "2"], vae_log)
    if not os.path.isfile(init):
        run(vae + ["--out", init, "--init", first, "--train", "decoder", "--steps", str(args.decoder_steps),
                   "--batch", "2", "--frames", "8"], vae_log)  # fmt: skip
    final = os.path.join(run_dir, "final.ckpt")
    if not os.path.isfile(final):
        cmd = [
            "train.py", f"--config={TRAIN}", f"--train.pretrained={init}", f"--train.output_dir={run_dir}",
            f"--environment.seed={args.seed}", f"--train.dataset.init_args.data_dir={os.path.join(data, 'videos')}",
            f"--train.dataset.init_args.metadata={csv}", "--train.resume=True",
        ]  # fmt: skip
        if args.max_steps is not None:
            cmd.append(f"--train.max_steps={args.max_steps}")
        run(cmd)

    os.makedirs(args.assets, exist_ok=True)
    from svd_tools.convert import convert

    if convert(final, MODEL, args.assets, dtype="fp16"):  # checked against the config, written as float16
        return 1
    os.replace(os.path.join(args.assets, "final.ckpt"), os.path.join(args.assets, "svd_toy.ckpt"))
    shutil.copyfile(os.path.join(work, "vae_train.log"), os.path.join(args.assets, "vae_train.log"))
    for name in ("train_log.csv", "loss.png", "config.yaml"):
        shutil.copyfile(os.path.join(run_dir, name), os.path.join(args.assets, f"unet_{name}"))
    heldout = sorted(os.listdir(os.path.join(data, "heldout")))
    shutil.copyfile(os.path.join(data, "heldout", heldout[0]), os.path.join(args.assets, "example.png"))
    with open(os.path.join(args.assets, "provenance.json"), "w") as f:
        json.dump({"command": " ".join(["python", "svd_tools/train_toy.py", *(argv or sys.argv[1:])]),
                   "seed": args.seed, "videos": args.videos, "vae_steps": args.vae_steps,
                   "decoder_steps": args.decoder_steps, "unet_steps": unet_steps(args.max_steps),
                   "example": heldout[0]}, f, indent=2)  # fmt: skip
    print(f"wrote {args.assets}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
