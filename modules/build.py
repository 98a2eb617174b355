"""Building the engine from a config file, with or without a checkpoint."""

from __future__ import annotations

from typing import Any

from mindspore import nn
from mindspore.nn.utils import no_init_parameters
from omegaconf import DictConfig

from modules.config import instantiate, load_config, to_container
from modules.layers import norm_groups


def build_engine(
    config: str | DictConfig | dict,
    checkpoint: str | None = None,
    lazy: bool = False,
    strict: bool = True,
    drop: tuple[str, ...] = (),
) -> nn.Cell:
    """The engine of a model config, optionally filled from a checkpoint (any format `modules.convert` reads).

    With a checkpoint or `lazy`, parameters are created without random initialisation; a lazy engine without a
    checkpoint only describes names and shapes. A checkpoint's engine has one VAE encoder for the first stage and
    the conditioning-frame embedder when the checkpoint holds the same weights for both. `drop` removes config
    sections (for example "sampler_config").
    """
    cfg: Any = to_container(load_config(config) if isinstance(config, str) else config)
    model_cfg = dict(cfg["model"]) if "model" in cfg else dict(cfg)
    params = dict(model_cfg.get("params") or {})
    for key in drop:
        params.pop(key, None)
    groups = int(params.pop("norm_num_groups", 32))  # GroupNorm groups of every network (32 in SVD)
    node = {"target": model_cfg["target"], "params": params}
    if checkpoint is None and not lazy:
        with norm_groups(groups):
            return instantiate(node)
    with no_init_parameters(), norm_groups(groups):
        engine = instantiate(node)
    if checkpoint is not None:
        from modules.convert.load import load_checkpoint

        load_checkpoint(engine, checkpoint, strict=strict)
        for p in engine.get_parameters():
            if p.has_init:  # not in the checkpoint (only possible with strict=False): random initialisation
                p.init_data()
    return engine
