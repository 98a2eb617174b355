"""Name map from the diffusers `UNetSpatioTemporalConditionModel` (SVD `unet/`) to our `VideoUNet` (sgm names).

Every tensor keeps its shape; only names change. The block numbering of sgm is rebuilt from the diffusers block
structure found in the keys (how many resnets each block has, whether it has attentions and a down/upsampler), so the
map does not depend on a particular config. Layout of sgm's flat block lists:

- `input_blocks.0.0` is `conv_in`; then, per down block, one input block per resnet `[resnet, (attention)]` and one
  for its downsampler `[op]`.
- `middle_block` is `[resnets.0, attentions.0, resnets.1]`.
- per up block, one output block per resnet `[resnet, (attention)]`; the upsampler joins the last one of the block.
"""

from __future__ import annotations

import re
from collections import defaultdict

from modules.convert.rules import NameMap, Rule, rename

__all__ = ["unet_from_diffusers"]

_WB = r"(weight|bias)"

# diffusers ResnetBlock2D / TemporalResnetBlock parts -> sgm ResBlock parts
_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_RE = re.compile(rf"^(spatial_res_block|temporal_res_block)\.({'|'.join(_RESNET_PARTS)})\.{_WB}$")

# Inside a (temporal) transformer block the names are the same on both sides.
_BLOCK_INNER = (
    rf"(attn[12]\.to_[qkv]\.weight|attn[12]\.to_out\.0\.{_WB}|norm[123]\.{_WB}|ff\.net\.(0\.proj|2)\.{_WB}"
    rf"|norm_in\.{_WB}|ff_in\.net\.(0\.proj|2)\.{_WB})"
)
_SPATIAL_BLOCK_RE = re.compile(rf"^transformer_blocks\.(\d+)\.{_BLOCK_INNER}$")
_TEMPORAL_BLOCK_RE = re.compile(rf"^temporal_transformer_blocks\.(\d+)\.{_BLOCK_INNER}$")
_TRANSFORMER_SIMPLE = {f"{p}.{s}": f"{p}.{s}" for p in ("norm", "proj_in", "proj_out") for s in ("weight", "bias")}
_TRANSFORMER_SIMPLE.update(
    {
        "time_mixer.mix_factor": "time_mixer.mix_factor",
        "time_pos_embed.linear_1.weight": "time_pos_embed.0.weight",
        "time_pos_embed.linear_1.bias": "time_pos_embed.0.bias",
        "time_pos_embed.linear_2.weight": "time_pos_embed.2.weight",
        "time_pos_embed.linear_2.bias": "time_pos_embed.2.bias",
    }
)

_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

_BLOCK_KEY_RE = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$"
)
_MID_KEY_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _resnet_target(rest: str) -> str | None:
    """`spatial_res_block.conv1.weight` -> `in_layers.2.weight`; temporal parts go under `time_stack.`."""
    if rest == "time_mixer.mix_factor":
        return rest
    m = _RESNET_RE.match(rest)
    if not m:
        return None
    part = f"{_RESNET_PARTS[m.group(2)]}.{m.group(3)}"
    return part if m.group(1) == "spatial_res_block" else f"time_stack.{part}"


def _transformer_target(rest: str) -> str | None:
    """TransformerSpatioTemporalModel -> SpatialVideoTransformer: `temporal_transformer_blocks` become `time_stack`."""
    if rest in _TRANSFORMER_SIMPLE:
        return _TRANSFORMER_SIMPLE[rest]
    m = _SPATIAL_BLOCK_RE.match(rest)
    if m and not m.group(2).startswith(("norm_in", "ff_in")):  # only temporal blocks have ff_in
        return rest
    m = _TEMPORAL_BLOCK_RE.match(rest)
    if m:
        return f"time_stack.{m.group(1)}.{m.group(2)}"
    return None


def _sampler_target(rest: str, conv_name: str) -> str | None:
    m = re.match(rf"^conv\.{_WB}$", rest)
    return f"{conv_name}.{m.group(1)}" if m else None


def _structure(keys: list[str]) -> dict[tuple[str, int], dict[str, set[int]]]:
    """(`down_blocks`|`up_blocks`, block index) -> {part kind: set of indices} as found in the keys."""
    found: dict[tuple[str, int], dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for key in keys:
        m = _BLOCK_KEY_RE.match(key)
        if m:
            found[(m.group(1), int(m.group(2)))][m.group(3)].add(int(m.group(4)))
    return found


def _block_prefixes(keys: list[str]) -> dict[tuple[str, int, str, int], tuple[str, str]]:
    """(side, block, kind, index) -> (our module prefix, kind of module) for every diffusers sub-module."""
    found = _structure(keys)
    out: dict[tuple[str, int, str, int], tuple[str, str]] = {}
    n_down = 1 + max((i for side, i in found if side == "down_blocks"), default=-1)
    n_up = 1 + max((i for side, i in found if side == "up_blocks"), default=-1)

    k = 1  # input_blocks.0 is conv_in
    for blk in range(n_down):
        parts = found.get(("down_blocks", blk), {})
        for j in range(1 + max(parts.get("resnets", {-1}))):
            out[("down_blocks", blk, "resnets", j)] = (f"input_blocks.{k}.0", "resnet")
            out[("down_blocks", blk, "attentions", j)] = (f"input_blocks.{k}.1", "transformer")
            k += 1
        if parts.get("downsamplers"):
            out[("down_blocks", blk, "downsamplers", 0)] = (f"input_blocks.{k}.0", "downsampler")
            k += 1

    k = 0
    for blk in range(n_up):
        parts = found.get(("up_blocks", blk), {})
        n_res = 1 + max(parts.get("resnets", {-1}))
        has_attn = bool(parts.get("attentions"))
        for j in range(n_res):
            out[("up_blocks", blk, "resnets", j)] = (f"output_blocks.{k}.0", "resnet")
            out[("up_blocks", blk, "attentions", j)] = (f"output_blocks.{k}.1", "transformer")
            k += 1
        if parts.get("upsamplers") and n_res:
            out[("up_blocks", blk, "upsamplers", 0)] = (f"output_blocks.{k - 1}.{2 if has_attn else 1}", "upsampler")
    return out


def _inner_target(kind: str, rest: str) -> str | None:
    if kind == "resnet":
        return _resnet_target(rest)
    if kind == "transformer":
        return _transformer_target(rest)
    return _sampler_target(rest, "op" if kind == "downsampler" else "conv")


def unet_from_diffusers(source_shapes: dict[str, tuple]) -> NameMap:
    """Rules turning diffusers UNetSpatioTemporalConditionModel keys into VideoUNet parameter names (plain copies).

    Keys that match no known pattern are neither mapped nor dropped, so the caller reports them.
    """
    keys = list(source_shapes)
    prefixes = _block_prefixes(keys)
    rules: list[Rule] = []
    for key in keys:
        target = None
        m = re.match(rf"^(.+)\.{_WB}$", key)
        if m and m.group(1) in _TOP:
            target = f"{_TOP[m.group(1)]}.{m.group(2)}"
        elif m := _MID_KEY_RE.match(key):
            kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
            # resnets.0 -> middle_block.0, attentions.0 -> middle_block.1, resnets.1 -> middle_block.2
            pos = 2 * idx if kind == "resnets" else 2 * idx + 1
            inner = _inner_target("resnet" if kind == "resnets" else "transformer", rest)
            target = f"middle_block.{pos}.{inner}" if inner else None
        elif m := _BLOCK_KEY_RE.match(key):
            where = prefixes.get((m.group(1), int(m.group(2)), m.group(3), int(m.group(4))))
            inner = _inner_target(where[1], m.group(5)) if where else None
            target = f"{where[0]}.{inner}" if inner else None
        if target is not None:
            rules.append(rename(target, key))
    return NameMap(rules=rules, dropped={})
