"""The SVD conditioner: embedders whose outputs are routed by rank into the UNet's three inputs.

(N, D) outputs are concatenated into `vector` (the UNet's `y`), (N, L, D) into `crossattn` (the cross-attention
context) and (N, C, H, W) into `concat` (channels appended to the noisy latent). Embedders run in config order.
"""

from __future__ import annotations

from typing import Iterable

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from modules.config import instantiate
from modules.layers import timestep_embedding

OUTPUT_KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
CONCAT_AXIS = {"vector": 1, "crossattn": 2, "concat": 1}


class ConcatTimestepEmbedderND(nn.Cell):
    """Embeds each scalar column of an (N,) or (N, K) input sinusoidally to `outdim` and concatenates: (N, K*outdim)."""

    def __init__(self, outdim: int):
        super().__init__()
        self.outdim = outdim

    def construct(self, x: Tensor) -> Tensor:
        if x.ndim == 1:
            x = x.reshape(-1, 1)
        n, k = x.shape
        emb = timestep_embedding(x.reshape(-1), self.outdim)
        return emb.reshape(n, k * self.outdim)


class VideoPredictionEmbedderWithEncoder(nn.Cell):
    """VAE-encodes the conditioning frame(s): (b n_cond) 3 H W -> b (n_cond 4) H/8 W/8, repeated n_copies times.

    The latent is the posterior mode and is not multiplied by the first stage's scale factor (scale_factor 1.0).
    """

    def __init__(
        self,
        n_cond_frames: int,
        n_copies: int,
        encoder_config: dict,
        sigma_sampler_config: dict | None = None,
        sigma_cond_config: dict | None = None,
        is_ae: bool = False,
        scale_factor: float = 1.0,
        disable_encoder_amp: bool = False,
        en_and_decode_n_samples_a_time: int | None = None,
    ):
        super().__init__()
        if sigma_sampler_config is not None or sigma_cond_config is not None:
            raise NotImplementedError("noising the conditioning frame inside the embedder is not supported")
        self.n_cond_frames = n_cond_frames
        self.n_copies = n_copies
        self.encoder = instantiate(encoder_config)
        self.is_ae = is_ae
        self.scale_factor = scale_factor
        # keeps the encoder in float32 under mixed precision (read by the amp helper)
        self.disable_encoder_amp = disable_encoder_amp
        self.chunk = en_and_decode_n_samples_a_time

    def construct(self, vid: Tensor) -> Tensor:
        n = vid.shape[0]
        chunk = self.chunk or n
        latents = [self.encoder.encode(vid[i : i + chunk]) for i in range(0, n, chunk)]
        z = (ops.cat(latents, axis=0) if len(latents) > 1 else latents[0]) * self.scale_factor
        _, c, h, w = z.shape
        z = z.reshape(n // self.n_cond_frames, self.n_cond_frames * c, h, w)
        if self.n_copies > 1:
            z = ops.repeat_interleave(z, self.n_copies, 0)
        return z


class GeneralConditioner(nn.Cell):
    """Runs the embedders of `emb_models` in order and routes their outputs by rank.

    Each embedder config may set `input_key` (or `input_keys`), `is_trainable` (default False: frozen, no gradient),
    `ucg_rate` (probability of dropping the embedding per sample during training, for classifier-free guidance) and
    `legacy_ucg_value` (not supported).
    """

    def __init__(self, emb_models: list[dict]):
        super().__init__()
        embedders = []
        self.input_keys: list[tuple[str, ...]] = []
        self.ucg_rates: list[float] = []
        self.trainable: list[bool] = []
        for i, cfg in enumerate(emb_models):
            cfg = dict(cfg)
            if cfg.get("legacy_ucg_value") is not None:
                raise NotImplementedError(f"embedder {i}: legacy_ucg_value is not supported")
            embedder = instantiate(cfg)
            if "input_key" in cfg:
                keys = (cfg["input_key"],)
            elif "input_keys" in cfg:
                keys = tuple(cfg["input_keys"])
            else:
                raise ValueError(f"embedder {i} ({cfg['target']}) needs an input_key or input_keys")
            trainable = bool(cfg.get("is_trainable", False))
            if not trainable:
                embedder.set_train(False)
                for p in embedder.get_parameters():
                    p.requires_grad = False
            embedders.append(embedder)
            self.input_keys.append(keys)
            self.ucg_rates.append(float(cfg.get("ucg_rate", 0.0)))
            self.trainable.append(trainable)
        self.embedders = nn.CellList(embedders)

    def embed_one(self, i: int, batch: dict) -> Tensor:
        out = self.embedders[i](*[batch[k] for k in self.input_keys[i]])
        if not self.trainable[i]:
            out = ops.stop_gradient(out)
        return out

    def embeddings(self, batch: dict, ucg_rng: np.random.Generator | None = None) -> list[Tensor]:
        """One output per embedder. With `ucg_rng`, each is zeroed per sample with probability `ucg_rate`."""
        outs = []
        for i in range(len(self.embedders)):
            emb = self.embed_one(i, batch)
            if ucg_rng is not None and self.ucg_rates[i] > 0:
                keep = (ucg_rng.random(emb.shape[0]) >= self.ucg_rates[i]).astype(np.float32)
                emb = emb * Tensor(keep.reshape((-1,) + (1,) * (emb.ndim - 1)), emb.dtype)
            outs.append(emb)
        return outs

    def route(self, embs: list[Tensor], force_zero_embeddings: Iterable[str] = ()) -> dict[str, Tensor]:
        """Zero the embeddings of the named input keys and merge the rest by rank into vector/crossattn/concat."""
        force_zero = set(force_zero_embeddings)
        outputs: dict[str, list[Tensor]] = {}
        for keys, emb in zip(self.input_keys, embs):
            if any(k in force_zero for k in keys):
                emb = ops.zeros_like(emb)
            outputs.setdefault(OUTPUT_KEYS[emb.ndim], []).append(emb)
        return {k: self._merge(k, v) for k, v in outputs.items()}

    @staticmethod
    def _merge(key: str, embs: list[Tensor]) -> Tensor:
        if len(embs) == 1:
            return embs[0]
        if key == "crossattn" and len({e.shape[1] for e in embs}) > 1:
            return ops.cat(embs, axis=1)
        return ops.cat(embs, axis=CONCAT_AXIS[key])

    def construct_dict(
        self,
        batch: dict,
        force_zero_embeddings: Iterable[str] = (),
        ucg_rng: np.random.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Embed a batch dict into {vector, crossattn, concat}."""
        return self.route(self.embeddings(batch, ucg_rng), force_zero_embeddings)

    def get_unconditional_conditioning(
        self,
        batch_c: dict,
        batch_uc: dict | None = None,
        force_uc_zero_embeddings: Iterable[str] = (),
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Conditional and unconditional embeddings, without conditioning dropout.

        When both use the same batch the embedders run once: the unconditional side reuses the conditional outputs
        and zeroes the forced ones.
        """
        embs = self.embeddings(batch_c)
        uc_embs = embs if batch_uc is None else self.embeddings(batch_uc)
        return self.route(embs), self.route(uc_embs, force_uc_zero_embeddings)


def scalar_batch(values: dict[str, float], n: int) -> dict[str, Tensor]:
    """Per-frame float32 tensors (n,) for scalar conditionings such as fps_id, motion_bucket_id and cond_aug."""
    return {k: Tensor(np.full((n,), v, np.float32), ms.float32) for k, v in values.items()}
