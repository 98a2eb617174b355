"""The one place that maps checkpoints onto the engine: checking, loading, converting and saving.

Sources: a MindSpore checkpoint of this project (names as ours), the official sgm single-file checkpoint (names as ours
by design, plus keys dropped on purpose), and a diffusers folder (explicit name maps per component).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from modules.convert.rules import NameMap, rename
from modules.convert.sources import CheckpointError, State, read_diffusers_folder, read_file

# Keys of the official sgm single file that have no counterpart in the model, each with the reason.
SGM_DROPPED_PREFIXES = {
    "conditioner.embedders.0.open_clip.model.token_embedding.": "OpenCLIP text tower leftover; SVD embeds images only",
    "conditioner.embedders.0.open_clip.model.positional_embedding": "OpenCLIP text tower leftover",
    "conditioner.embedders.0.open_clip.model.text_projection": "OpenCLIP text tower leftover",
    "conditioner.embedders.0.open_clip.model.ln_final.": "OpenCLIP text tower leftover",
    "conditioner.embedders.0.open_clip.model.logit_scale": "OpenCLIP contrastive temperature, unused for embedding",
    "conditioner.embedders.3.encoder.decoder.": "the conditioning-frame VAE only encodes; its decoder is never run",
    "conditioner.embedders.3.encoder.post_quant_conv.": "belongs to the conditioning VAE's unused decoder",
}

DTYPES = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}


def param_shapes(cell: nn.Cell) -> dict[str, tuple[int, ...]]:
    return {p.name: tuple(p.shape) for p in cell.get_parameters()}


def sgm_name_map(source_keys: Iterable[str], model_names: Iterable[str]) -> NameMap:
    """The sgm layout maps by identity; keys of unused parts are dropped by the prefixes above."""
    model = set(model_names)
    rules, dropped = [], {}
    for key in source_keys:
        reason = next((r for p, r in SGM_DROPPED_PREFIXES.items() if key.startswith(p)), None)
        if reason is not None and key not in model:
            dropped[key] = reason
        elif key in model:
            rules.append(rename(key))
    return NameMap(rules, dropped)


def _embedder_index(engine: nn.Cell, class_name: str) -> int:
    for i, emb in enumerate(engine.conditioner.embedders):
        if type(emb).__name__ == class_name:
            return i
    raise CheckpointError(f"the model config has no {class_name} embedder to receive these weights")


def component_prefixes(engine: nn.Cell) -> dict[str, tuple[str, ...]]:
    """Where each diffusers component's weights live in the engine (the vae fills two places)."""
    enc = _embedder_index(engine, "VideoPredictionEmbedderWithEncoder")
    clip = _embedder_index(engine, "FrozenOpenCLIPImagePredictionEmbedder")
    return {
        "unet": ("model.diffusion_model.",),
        "vae": ("first_stage_model.", f"conditioner.embedders.{enc}.encoder."),
        "image_encoder": (f"conditioner.embedders.{clip}.open_clip.model.visual.",),
    }


def diffusers_name_maps(engine: nn.Cell, parts: Mapping[str, Mapping[str, tuple]]) -> dict[str, NameMap]:
    """Name maps from diffusers components (`unet`, `vae`, `image_encoder`) to engine parameter names."""
    from modules.convert.clip import clip_vision_from_transformers
    from modules.convert.unet import unet_from_diffusers
    from modules.convert.vae import cond_encoder_from_diffusers, first_stage_from_diffusers

    prefixes = component_prefixes(engine)
    maps = {}
    if "unet" in parts:
        maps["unet"] = unet_from_diffusers(parts["unet"]).prefixed(prefixes["unet"][0])
    if "vae" in parts:
        first = first_stage_from_diffusers(parts["vae"]).prefixed(prefixes["vae"][0])
        cond = cond_encoder_from_diffusers(parts["vae"]).prefixed(prefixes["vae"][1])
        # a key one map drops may be used by the other
        used = {s for r in first.rules + cond.rules for s in r.sources}
        dropped = {k: v for k, v in {**first.dropped, **cond.dropped}.items() if k not in used}
        maps["vae"] = NameMap(first.rules + cond.rules, dropped)
    if "image_encoder" in parts:
        maps["image_encoder"] = clip_vision_from_transformers(parts["image_encoder"]).prefixed(
            prefixes["image_encoder"][0]
        )
    return maps


@dataclass
class Plan:
    """What a source gives to the model: the rules to run on each source, and every problem found on the way."""

    sources: dict[str, Mapping]  # source name -> State (or shapes only for a dry run)
    maps: dict[str, NameMap]  # source name -> its name map
    problems: list[str]

    def rules(self):
        for part, name_map in self.maps.items():
            for rule in name_map.rules:
                yield part, rule


def check(
    sources: Mapping[str, Mapping[str, tuple]],
    maps: Mapping[str, NameMap],
    model_shapes: Mapping[str, tuple],
    scope: Iterable[str] | None = None,
) -> list[str]:
    """Problems of a mapping: unknown source keys, model parameters left unfilled, and wrong shapes.

    `scope` limits the parameters that must be filled to those under the given prefixes (default: all).
    Shapes are checked by running each rule on zero-filled stand-ins, so no weights are needed.
    """
    problems = []
    targets: dict[str, str] = {}
    for part, name_map in maps.items():
        shapes = sources[part]
        used = set()
        for rule in name_map.rules:
            missing_src = [s for s in rule.sources if s not in shapes]
            if missing_src:
                problems.append(f"missing source key: {part}:{missing_src[0]} (needed for {rule.target})")
                targets[rule.target] = part  # reported once, here, not again as an unfilled parameter
                continue
            used.update(rule.sources)
            if rule.target in targets:
                problems.append(f"duplicate target: {rule.target} (from {targets[rule.target]} and {part})")
            targets[rule.target] = part
            if rule.target not in model_shapes:
                problems.append(
                    f"unexpected key: {rule.target} (from {part}:{rule.sources[0]}) is not a model parameter"
                )
                continue
            stand_ins = [np.broadcast_to(np.zeros((), np.float32), shapes[s]) for s in rule.sources]
            got = tuple(rule.apply(stand_ins).shape)
            want = tuple(model_shapes[rule.target])
            if got != want:
                problems.append(f"shape mismatch: {rule.target} is {list(want)} in the model, {list(got)} from {part}")
        for key in shapes:
            if key not in used and key not in name_map.dropped:
                problems.append(f"unknown source key: {part}:{key} {list(shapes[key])}")
    prefixes = tuple(scope) if scope is not None else ("",)
    for name in model_shapes:
        if name.startswith(prefixes) and name not in targets:
            problems.append(f"missing parameter: {name} {list(model_shapes[name])} is not filled")
    return problems


def plan_for(path: str, engine: nn.Cell) -> Plan:
    """Read a checkpoint (file or diffusers folder) and map it onto the engine, collecting the problems."""
    model_shapes = param_shapes(engine)
    if os.path.isdir(path):
        sources = read_diffusers_folder(path)
        maps = diffusers_name_maps(engine, {k: v.shapes for k, v in sources.items()})
    else:
        state = read_file(path)
        sources = {"checkpoint": state}
        maps = {"checkpoint": sgm_name_map(state.shapes, model_shapes)}
    problems = check({k: v.shapes for k, v in sources.items()}, maps, model_shapes)
    return Plan(sources, maps, problems)


def summarize(problems: list[str], limit: int = 3) -> str:
    """A one-line account of mapping problems, naming the first few."""
    kinds = {}
    for p in problems:
        kinds.setdefault(p.split(":")[0], []).append(p.split(": ", 1)[1].split(" ")[0])
    parts = []
    for kind, names in kinds.items():
        shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
        parts.append(f"{len(names)} {kind} ({shown})")
    return "; ".join(parts)


def iter_mapped(plan: Plan, dtype: str | None = None):
    """Yield (parameter name, numpy array) for every rule, converting to `dtype` ("fp32", "fp16", "bf16") if given."""
    for part, rule in plan.rules():
        state = plan.sources[part]
        arr = rule.apply([np.asarray(state[s]) for s in rule.sources])
        if isinstance(arr, Tensor):
            arr = arr.asnumpy() if arr.dtype != ms.bfloat16 else arr.float().asnumpy()
        yield rule.target, arr


def load_checkpoint(engine: nn.Cell, path: str, strict: bool = True) -> list[str]:
    """Fill the engine's parameters from `path`; with `strict`, any mapping problem raises CheckpointError.

    Returns the problems found (empty when everything matched). Parameter dtypes are kept as built.
    """
    plan = plan_for(path, engine)
    if plan.problems and strict:
        raise CheckpointError(f"checkpoint {path} does not match the model config: {summarize(plan.problems)}")
    shared = share_equal_encoders(engine, plan)
    params = {p.name: p for p in engine.get_parameters()}
    for name, arr in iter_mapped(plan):
        if name.startswith(shared):
            continue  # the first stage's encoder, loaded under its own names
        p = params[name]
        p.set_data(Tensor(np.ascontiguousarray(arr), p.dtype))
    return plan.problems


def share_equal_encoders(engine: nn.Cell, plan: Plan) -> tuple[str, ...]:
    """Before any weight is loaded, give the conditioning-frame embedder the first stage's VAE encoder wherever the
    checkpoint holds the same values for both (see VideoDiffusionEngine.image_encoder_copies), so the second copy
    is never allocated. Returns the parameter-name prefixes that now load nothing."""
    copies = engine.image_encoder_copies() if hasattr(engine, "image_encoder_copies") else {}
    if not copies:
        return ()
    first = "first_stage_model.encoder."
    rules = {rule.target: (part, rule) for part, rule in plan.rules()}

    def mapped(name):
        part, rule = rules[name]
        return np.asarray(rule.apply([np.asarray(plan.sources[part][s]) for s in rule.sources]))

    ours = {n[len(first) :] for n in rules if n.startswith(first)}
    shared = []
    for prefix in copies:
        names = [n[len(prefix) :] for n in rules if n.startswith(prefix)]
        if names and set(names) == ours and all(np.array_equal(mapped(prefix + n), mapped(first + n)) for n in names):
            engine.share_image_encoder(prefix)
            shared.append(prefix)
    return tuple(shared)


def save_mapped(plan: Plan, out_path: str, dtype: str = "fp32") -> int:
    """Write the mapped parameters as a MindSpore checkpoint, atomically (temporary name, then rename)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    target = DTYPES[dtype]
    items = []
    for name, arr in iter_mapped(plan):
        if np.issubdtype(arr.dtype, np.floating):
            items.append({"name": name, "data": Tensor(np.ascontiguousarray(arr, np.float32), target)})
        else:
            items.append({"name": name, "data": Tensor(np.ascontiguousarray(arr))})
    # MindSpore appends ".ckpt" to names without it, so the temporary name keeps the suffix
    tmp = os.path.splitext(out_path)[0] + ".partial.ckpt"
    try:
        ms.save_checkpoint(items, tmp)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(items)


__all__ = [
    "CheckpointError",
    "State",
    "Plan",
    "check",
    "diffusers_name_maps",
    "load_checkpoint",
    "param_shapes",
    "plan_for",
    "save_mapped",
    "share_equal_encoders",
    "sgm_name_map",
    "summarize",
]
