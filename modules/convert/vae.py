"""Name maps from diffusers VAE layouts to our sgm-named autoencoders.

Sources (keys relative to the diffusers `vae/` component root):
- `AutoencoderKLTemporalDecoder` (the SVD `vae/`): 2D `encoder.*`, temporal `decoder.*`, and `quant_conv.*`.
- `AutoencoderKL` (plain 2D VAE): `encoder.*`, 2D `decoder.*`, `quant_conv.*` and `post_quant_conv.*`.

Targets (relative to our component roots):
- `first_stage_from_diffusers`: `AutoencodingEngine(Encoder, VideoDecoder)`, which has no quant convs. diffusers
  applies `quant_conv` (1x1, 2z -> 2z) right after `encoder.conv_out`; two convolutions in a row with nothing in
  between compose exactly, so it is folded into `encoder.conv_out`: W'[o] = sum_m Q[o, m] W[m], b' = Q b + q.
- `cond_encoder_from_diffusers`: `AutoencoderKLModeOnly` (encoder + quant_conv); decoder keys are dropped.
- `first_stage_from_diffusers_kl`: `AutoencoderKL` (the image-decoder variant's first stage), one to one.

Layout differences handled here:
- diffusers `down_blocks.i.resnets.j` / `up_blocks.i.resnets.j` are sgm `down.i.block.j` / `up.(L-1-i).block.j`:
  diffusers lists decoder levels from the lowest resolution up, sgm indexes them by resolution level.
- `mid_block.resnets.0/1` and `mid_block.attentions.0` are `mid.block_1/block_2` and `mid.attn_1`.
- attention projections are Linear (C, C) in diffusers and 1x1 convs (C, C, 1, 1) in sgm.
- temporal blocks: `spatial_res_block.*` is the ResnetBlock itself, `temporal_res_block.{norm1,conv1,norm2,conv2}` is
  `time_stack.{in_layers.0,in_layers.2,out_layers.0,out_layers.3}`, `time_mixer.mix_factor` is `mix_factor` (diffusers
  sets `switch_spatial_to_temporal_mix=True`, which makes its alpha weight the temporal branch, as in sgm), and
  `time_conv_out` is `conv_out.time_mix_conv`.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import numpy as np

from modules.convert.rules import NameMap, Rule, rename

__all__ = ["first_stage_from_diffusers", "cond_encoder_from_diffusers", "first_stage_from_diffusers_kl"]

# diffusers' conv_shortcut of a VAE resnet is the 1x1 projection that sgm calls nin_shortcut.
_RESNET_PARTS = dict(norm1="norm1", conv1="conv1", norm2="norm2", conv2="conv2", conv_shortcut="nin_shortcut")
_TEMPORAL_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
# Current diffusers names, and the deprecated ones still found in old VAE files.
_ATTN_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}

_P = r"(weight|bias)"
_RESNET_RE = r"(norm1|conv1|norm2|conv2|conv_shortcut)\." + _P
_ATTN_RE = r"(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\." + _P

Translate = Callable[[str], "Rule | None"]


def _linear_to_conv1x1(arrays: Sequence[np.ndarray]) -> np.ndarray:
    w = arrays[0]
    return w.reshape(w.shape[0], w.shape[1], 1, 1)


def _fold_quant_weight(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """conv_out weight W (m, i, kh, kw) and quant_conv weight Q (o, m, 1, 1) -> Q @ W (o, i, kh, kw)."""
    w, q = arrays
    q2 = q.reshape(q.shape[0], q.shape[1]).astype(np.float64)
    return np.einsum("om,mihw->oihw", q2, w.astype(np.float64)).astype(w.dtype)


def _fold_quant_bias(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """conv_out bias b (m,), quant_conv weight Q (o, m, 1, 1) and bias q (o,) -> Q b + q."""
    b, q, qb = arrays
    q2 = q.reshape(q.shape[0], q.shape[1]).astype(np.float64)
    return (q2 @ b.astype(np.float64) + qb.astype(np.float64)).astype(b.dtype)


def _attn_rule(target_prefix: str, source: str, part: str, kind: str) -> Rule:
    target = f"{target_prefix}.{_ATTN_PARTS[part]}.{kind}"
    if kind == "weight" and part != "group_norm":
        return Rule(target, (source,), _linear_to_conv1x1)
    return rename(target, source)


def _mid_block(k: str) -> str | None:
    return {"0": "block_1", "1": "block_2"}.get(k)


def _encoder_rule(key: str, source_shapes: Mapping[str, Sequence[int]], fold_quant: bool) -> Rule | None:
    """diffusers `encoder.*` -> sgm `encoder.*` (None if the key is not an encoder key we know)."""
    m = re.fullmatch(r"encoder\.(conv_in|conv_norm_out|conv_out)\." + _P, key)
    if m:
        name = {"conv_in": "conv_in", "conv_norm_out": "norm_out", "conv_out": "conv_out"}[m[1]]
        target = f"encoder.{name}.{m[2]}"
        if name == "conv_out" and fold_quant and "quant_conv.weight" in source_shapes:
            if m[2] == "weight":
                return Rule(target, (key, "quant_conv.weight"), _fold_quant_weight)
            if "quant_conv.bias" in source_shapes:
                return Rule(target, (key, "quant_conv.weight", "quant_conv.bias"), _fold_quant_bias)
        return rename(target, key)
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\." + _RESNET_RE, key)
    if m:
        return rename(f"encoder.down.{m[1]}.block.{m[2]}.{_RESNET_PARTS[m[3]]}.{m[4]}", key)
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\." + _P, key)
    if m:
        return rename(f"encoder.down.{m[1]}.downsample.conv.{m[2]}", key)
    m = re.fullmatch(r"encoder\.mid_block\.resnets\.(\d+)\." + _RESNET_RE, key)
    if m and _mid_block(m[1]):
        return rename(f"encoder.mid.{_mid_block(m[1])}.{_RESNET_PARTS[m[2]]}.{m[3]}", key)
    m = re.fullmatch(r"encoder\.mid_block\.attentions\.0\." + _ATTN_RE, key)
    if m:
        return _attn_rule("encoder.mid.attn_1", key, m[1], m[2])
    return None


def _num_up_levels(source_shapes: Mapping[str, Sequence[int]]) -> int:
    levels = [int(m[1]) for k in source_shapes if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))]
    return max(levels) + 1 if levels else 0


def _decoder_rule(key: str, num_levels: int, temporal: bool) -> Rule | None:
    """diffusers `decoder.*` (TemporalDecoder if `temporal`, else the 2D Decoder) -> sgm `decoder.*`."""
    m = re.fullmatch(r"decoder\.(conv_in|conv_norm_out|conv_out)\." + _P, key)
    if m:
        name = {"conv_in": "conv_in", "conv_norm_out": "norm_out", "conv_out": "conv_out"}[m[1]]
        return rename(f"decoder.{name}.{m[2]}", key)
    if temporal:
        m = re.fullmatch(r"decoder\.time_conv_out\." + _P, key)
        if m:
            return rename(f"decoder.conv_out.time_mix_conv.{m[1]}", key)
    m = re.fullmatch(r"decoder\.mid_block\.attentions\.0\." + _ATTN_RE, key)
    if m:
        return _attn_rule("decoder.mid.attn_1", key, m[1], m[2])
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\." + _P, key)
    if m:
        return rename(f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}", key)

    # Resnets: find which sgm block the key belongs to, then map the part inside the block.
    m = re.fullmatch(r"decoder\.mid_block\.resnets\.(\d+)\.(.+)", key)
    if m and _mid_block(m[1]):
        block, rest = f"decoder.mid.{_mid_block(m[1])}", m[2]
    else:
        m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
        if not m:
            return None
        block, rest = f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}", m[3]
    if not temporal:
        m = re.fullmatch(_RESNET_RE, rest)
        return rename(f"{block}.{_RESNET_PARTS[m[1]]}.{m[2]}", key) if m else None
    m = re.fullmatch(r"spatial_res_block\." + _RESNET_RE, rest)
    if m:
        return rename(f"{block}.{_RESNET_PARTS[m[1]]}.{m[2]}", key)
    m = re.fullmatch(r"temporal_res_block\.(norm1|conv1|norm2|conv2)\." + _P, rest)
    if m:
        return rename(f"{block}.time_stack.{_TEMPORAL_PARTS[m[1]]}.{m[2]}", key)
    if rest == "time_mixer.mix_factor":
        return rename(f"{block}.mix_factor", key)
    return None


def _collect(
    source_shapes: Mapping[str, Sequence[int]],
    translate: Translate,
    drop: Callable[[str], str | None],
) -> NameMap:
    """One rule per translated key, a reason per dropped key; keys that are neither are left for the caller to report.

    Keys consumed by a multi-source rule (quant_conv when folded) translate to None and are not dropped either: they
    are accounted for as rule sources.
    """
    rules: list[Rule] = []
    dropped: dict[str, str] = {}
    for key in source_shapes:
        rule = translate(key)
        if rule is not None:
            rules.append(rule)
            continue
        reason = drop(key)
        if reason is not None:
            dropped[key] = reason
    return NameMap(rules, dropped)


def _no_drop(key: str) -> None:
    return None


def first_stage_from_diffusers(source_shapes: Mapping[str, Sequence[int]]) -> NameMap:
    """diffusers AutoencoderKLTemporalDecoder -> AutoencodingEngine(Encoder, VideoDecoder), quant_conv folded."""
    num_levels = _num_up_levels(source_shapes)

    def translate(key: str) -> Rule | None:
        if key.startswith("encoder."):
            return _encoder_rule(key, source_shapes, fold_quant=True)
        if key.startswith("decoder."):
            return _decoder_rule(key, num_levels, temporal=True)
        return None

    return _collect(source_shapes, translate, _no_drop)


def cond_encoder_from_diffusers(source_shapes: Mapping[str, Sequence[int]]) -> NameMap:
    """diffusers AutoencoderKLTemporalDecoder or AutoencoderKL -> AutoencoderKLModeOnly (encoder + quant_conv)."""

    def translate(key: str) -> Rule | None:
        if key.startswith("encoder."):
            return _encoder_rule(key, source_shapes, fold_quant=False)
        if key in ("quant_conv.weight", "quant_conv.bias"):
            return rename(key)
        return None

    def drop(key: str) -> str | None:
        if key.startswith(("decoder.", "post_quant_conv.")):
            return "the conditioning encoder never decodes"
        return None

    return _collect(source_shapes, translate, drop)


def first_stage_from_diffusers_kl(source_shapes: Mapping[str, Sequence[int]]) -> NameMap:
    """diffusers AutoencoderKL (2D decoder) -> AutoencoderKL with quant_conv and post_quant_conv kept."""
    num_levels = _num_up_levels(source_shapes)

    def translate(key: str) -> Rule | None:
        if key.startswith("encoder."):
            return _encoder_rule(key, source_shapes, fold_quant=False)
        if key.startswith("decoder."):
            return _decoder_rule(key, num_levels, temporal=False)
        if key in ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias"):
            return rename(key)
        return None

    return _collect(source_shapes, translate, _no_drop)
