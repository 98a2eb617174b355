"""Train the first stage (VAE encoder and temporal decoder) of a small SVD config on a video dataset.

    python svd_tools/train_toy_vae.py --config configs/toy/svd_toy.yaml --data_dir DIR --metadata FILE.csv \
        --out engine_init.ckpt

The loss is L1 + L2 reconstruction of short clips plus a small KL term on the sampled posterior. `--crop 32` trains
on random 32x32 windows of the frames, four times cheaper per step than whole 64x64 frames (the encoder and decoder
are convolutional and then run on whole frames); `--init` continues from an earlier run's checkpoint. The trained
encoder is also copied into the conditioner's frame encoder (with an identity quant conv), the UNet and the CLIP
tower keep their seeded random initialisation, and the whole engine is written as one checkpoint: the starting
point for training the UNet from scratch with train.py. Before it is written, the latent std measured on held clips
is folded into the encoder's last and the decoder's first convolution, so the latents have unit std and the
config's `scale_factor` is 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import mindspore as ms
import numpy as np
import pandas as pd
from mindspore import Tensor, nn, ops

from data.video_io import VideoReader, atomic_path
from modules.build import build_engine
from modules.env import init_env
from svd_tools.toy_eval import psnr


def load_videos(data_dir: str, metadata: str, max_videos: int | None) -> list[np.ndarray]:
    rows = pd.read_csv(metadata)
    videos = []
    for path in rows["path"][:max_videos]:
        r = VideoReader(os.path.join(data_dir, path))
        videos.append(r.get(range(len(r))))
    return videos


def sample_clips(videos, rng: np.random.Generator, batch: int, frames: int, crop: int | None = None) -> np.ndarray:
    """(batch * frames, 3, H, W) float32 in [-1, 1], `frames` consecutive frames per clip, optionally a random
    crop x crop window of each clip."""
    out = []
    for i in rng.integers(0, len(videos), batch):
        v = videos[i]
        s = rng.integers(0, len(v) - frames + 1)
        clip = v[s : s + frames]
        if crop:
            y, x = rng.integers(0, clip.shape[1] - crop + 1), rng.integers(0, clip.shape[2] - crop + 1)
            clip = clip[:, y : y + crop, x : x + crop]
        out.append(clip)
    x = np.concatenate(out).astype(np.float32) / 127.5 - 1.0
    return x.transpose(0, 3, 1, 2)


def unit_latents(encoder: nn.Cell, decoder: nn.Cell, std: float) -> None:
    """Fold 1/std into the encoder's output and std into the decoder's input, so that the latents have unit std and
    the config's scale_factor is 1: the posterior mean and its std divide by `std` (log-variance minus 2 log std),
    and the decoder's first convolution, linear in z, multiplies by it. Reconstructions are unchanged."""
    w, b = encoder.conv_out.weight, encoder.conv_out.bias
    c = w.shape[0] // 2  # [mean, logvar] channels
    scale = np.concatenate([np.full(c, 1.0 / std), np.ones(c)]).astype(np.float32)
    shift = np.concatenate([np.zeros(c), np.full(c, -2.0 * np.log(std))]).astype(np.float32)
    w.set_data(Tensor(w.asnumpy() * scale[:, None, None, None]))
    b.set_data(Tensor(b.asnumpy() * scale + shift))
    decoder.conv_in.weight.set_data(Tensor(decoder.conv_in.weight.asnumpy() * np.float32(std)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--metadata", required=True)
    p.add_argument("--out", required=True, help="engine checkpoint to write")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=4, help="clips per step")
    p.add_argument("--frames", type=int, default=4, help="frames per clip (the temporal decoder's window)")
    p.add_argument(
        "--crop",
        type=int,
        default=None,
        help="train on random crops of this size (the networks are convolutional; cheaper steps)",
    )
    p.add_argument(
        "--train",
        choices=["all", "decoder"],
        default="all",
        help="decoder: keep the encoder (and the latents) of --init, e.g. to fit the temporal decoder to longer clips",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100, help="steps of linear learning-rate warm-up")
    p.add_argument("--clip_norm", type=float, default=1.0, help="clip the gradients to this global norm")
    p.add_argument("--kl_weight", type=float, default=1e-6)
    p.add_argument(
        "--chroma_weight",
        type=float,
        default=0.0,
        help="extra weight of the reconstruction error's colour part (each pixel's error minus its mean over RGB)",
    )
    p.add_argument(
        "--posterior_noise",
        type=float,
        default=1.0,
        help="scale of the posterior sample's noise (0: decode the posterior mean, a plain autoencoder)",
    )
    p.add_argument("--max_videos", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="continue from this engine checkpoint (e.g. a first, faster phase)")
    p.add_argument("--mode", type=int, default=0, help="0 graph, 1 PyNative")
    p.add_argument("--log_every", type=int, default=50, help="print the loss every this many steps")
    p.add_argument("--eval_every", type=int, default=250, help="print the reconstruction PSNR every this many steps")
    args = p.parse_args(argv)

    init_env(mode=args.mode, seed=args.seed)
    videos = load_videos(args.data_dir, args.metadata, args.max_videos)
    engine = build_engine(args.config, args.init)
    vae = engine.first_stage_model
    for q in vae.get_parameters():
        q.requires_grad = args.train == "all" or not q.name.startswith("first_stage_model.encoder.")
    params = vae.trainable_params()
    lr = nn.cosine_decay_lr(args.lr * 0.05, args.lr, args.steps, 1, args.steps)
    warmup = min(args.warmup, args.steps)
    lr[:warmup] = [args.lr * (i + 1) / warmup for i in range(warmup)]
    opt = nn.AdamWeightDecay(params, learning_rate=lr, weight_decay=0.0)
    t = args.frames

    def forward(x, noise):
        mean, logvar = ops.split(vae.encoder(x), 4, axis=1)
        logvar = ops.clamp(logvar, -30.0, 20.0)
        z = mean + args.posterior_noise * ops.exp(0.5 * logvar) * noise
        rec = vae.decoder(z, timesteps=t)
        err = rec - x
        kl = 0.5 * (mean * mean + ops.exp(logvar) - 1.0 - logvar).sum() / x.shape[0]
        loss = ops.abs(err).mean() + (err * err).mean() + args.kl_weight * kl
        if args.chroma_weight:
            chroma = err - err.mean(axis=1, keep_dims=True)
            loss = loss + args.chroma_weight * (ops.abs(chroma).mean() + (chroma * chroma).mean())
        return loss

    grad_fn = ms.value_and_grad(forward, None, opt.parameters)

    @ms.jit
    def train_step(x, noise):
        loss, grads = grad_fn(x, noise)
        opt(ops.clip_by_global_norm(grads, args.clip_norm))
        return loss

    def reconstruction_psnr(x: np.ndarray) -> tuple[float, np.ndarray]:
        """PSNR of decoding the posterior mean of whole clips, and the (unscaled) latents."""
        vae.set_train(False)
        z = ops.split(vae.encoder(Tensor(x)), 4, axis=1)[0]
        rec = vae.decoder(z, timesteps=t).asnumpy()
        vae.set_train(True)
        return psnr(rec, x, peak=2.0), z.asnumpy()

    held = sample_clips(videos, np.random.default_rng(args.seed + 1), 8, t)
    rng = np.random.default_rng(args.seed)
    latent_hw = None
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = sample_clips(videos, rng, args.batch, t, args.crop)
        if latent_hw is None:
            f = engine.latent_factor
            latent_hw = (x.shape[2] // f, x.shape[3] // f)
        noise = rng.standard_normal((x.shape[0], 4) + latent_hw).astype(np.float32)
        loss = train_step(Tensor(x), Tensor(noise))
        if step % args.log_every == 0 or step == 1:
            elapsed = time.perf_counter() - start
            print(f"step {step} loss {float(loss.asnumpy()):.4f} {elapsed:.0f} s", flush=True)
        if step % args.eval_every == 0 and step < args.steps:  # the last step's is printed below
            print(f"step {step} fixed clips PSNR {reconstruction_psnr(held)[0]:.2f} dB", flush=True)

    value, z = reconstruction_psnr(held)
    std = float(z.std())
    unit_latents(vae.encoder, vae.decoder, std)
    check, z = reconstruction_psnr(held)
    print(f"reconstruction PSNR {value:.2f} dB; latent std {std:.4f}, rescaled to {z.std():.4f} ({check:.2f} dB)")

    # the conditioner encodes the conditioning frame with the same encoder (mode, identity quant conv)
    cond = next(e for e in engine.conditioner.embedders if hasattr(e, "encoder")).encoder
    src = {q.name.split("first_stage_model.encoder.", 1)[1]: q for q in vae.encoder.get_parameters()}
    for q in cond.encoder.get_parameters():
        q.set_data(src[q.name.split(".encoder.encoder.", 1)[1]].data.copy())
    c = cond.quant_conv.weight.shape[0]
    cond.quant_conv.weight.set_data(Tensor(np.eye(c, dtype=np.float32).reshape(c, c, 1, 1)))
    cond.quant_conv.bias.set_data(Tensor(np.zeros(c, np.float32)))

    with atomic_path(args.out) as tmp:
        ms.save_checkpoint([{"name": q.name, "data": q} for q in engine.get_parameters()], tmp)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
