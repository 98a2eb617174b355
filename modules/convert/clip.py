"""Name map from transformers' CLIPVisionModelWithProjection (diffusers `image_encoder/`) to our VisionTransformer.

transformers splits each attention input projection into q/k/v Linear layers, while OpenCLIP (and we) keep one packed
`in_proj_weight` whose rows are [q; k; v]. The output projection is a bias-free Linear in transformers, (out, in), and a
plain matrix `proj` (in, out) in OpenCLIP, hence the transpose.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from modules.convert.rules import NameMap, Rule, rename

__all__ = ["clip_vision_from_transformers"]

_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")


def _concat_rows(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """q, k, v (each (d, d) or (d,)) -> packed (3d, d) or (3d,)."""
    return np.concatenate(list(arrays), axis=0)


def _transpose(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """(out, in) Linear weight -> (in, out) matrix."""
    return np.ascontiguousarray(arrays[0].T)


def clip_vision_from_transformers(source_shapes: Mapping[str, Sequence[int]]) -> NameMap:
    """Map CLIPVisionModelWithProjection keys to VisionTransformer parameter names (relative to the tower).

    The number of encoder layers is read from the keys. Keys outside the known layout are neither mapped nor dropped,
    so the caller reports them.
    """
    src = "vision_model."
    rules: list[Rule] = [
        rename("conv1.weight", src + "embeddings.patch_embedding.weight"),
        rename("class_embedding", src + "embeddings.class_embedding"),
        rename("positional_embedding", src + "embeddings.position_embedding.weight"),
        rename("ln_pre.weight", src + "pre_layrnorm.weight"),
        rename("ln_pre.bias", src + "pre_layrnorm.bias"),
        rename("ln_post.weight", src + "post_layernorm.weight"),
        rename("ln_post.bias", src + "post_layernorm.bias"),
        Rule("proj", ("visual_projection.weight",), _transpose),
    ]
    dropped: dict[str, str] = {}
    if src + "embeddings.position_ids" in source_shapes:
        dropped[src + "embeddings.position_ids"] = "buffer arange(num_positions); positions are implicit in our tower"

    layers = sorted({int(m.group(1)) for k in source_shapes if (m := _LAYER.match(k))})
    for i in layers:
        s = f"{src}encoder.layers.{i}."
        t = f"transformer.resblocks.{i}."
        attn = s + "self_attn."
        rules += [
            rename(t + "ln_1.weight", s + "layer_norm1.weight"),
            rename(t + "ln_1.bias", s + "layer_norm1.bias"),
            Rule(
                t + "attn.in_proj_weight",
                (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                _concat_rows,
            ),
            Rule(
                t + "attn.in_proj_bias",
                (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"),
                _concat_rows,
            ),
            rename(t + "attn.out_proj.weight", attn + "out_proj.weight"),
            rename(t + "attn.out_proj.bias", attn + "out_proj.bias"),
            rename(t + "ln_2.weight", s + "layer_norm2.weight"),
            rename(t + "ln_2.bias", s + "layer_norm2.bias"),
            rename(t + "mlp.c_fc.weight", s + "mlp.fc1.weight"),
            rename(t + "mlp.c_fc.bias", s + "mlp.fc1.bias"),
            rename(t + "mlp.c_proj.weight", s + "mlp.fc2.weight"),
            rename(t + "mlp.c_proj.bias", s + "mlp.fc2.bias"),
        ]
    return NameMap(rules=rules, dropped=dropped)
