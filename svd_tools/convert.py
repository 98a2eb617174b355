"""Import official PyTorch SVD weights into a MindSpore checkpoint.

    python svd_tools/convert.py --pt_weights_file svd_xt.safetensors --config configs/svd_xt.yaml --out_dir DIR

Sources: the official sgm single file (`.safetensors`, or a torch `.ckpt`/`.pt`) or a diffusers folder
(`unet/`, `vae/`, `image_encoder/`). With `--dry_run --manifest FILE.json` a key-to-shape manifest is checked against
a lazily built model instead (no weights needed); without `--manifest`, `--dry_run` checks the source's headers and
writes nothing. Problems are printed one per line, then a summary line; the exit code is 1 if there were any.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mindspore  # noqa: F401  (imported before anything that may load decord)
from jsonargparse import ArgumentParser

from modules.build import build_engine
from modules.convert.load import (
    DTYPES,
    Plan,
    check,
    component_prefixes,
    diffusers_name_maps,
    param_shapes,
    plan_for,
    save_mapped,
    sgm_name_map,
)
from modules.convert.sources import CheckpointError


def manifest_layout(keys: set[str]) -> str:
    """Which checkpoint layout a key set comes from: sgm, unet, vae or image_encoder."""
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "sgm"
    if any(k.startswith("vision_model.") for k in keys):
        return "image_encoder"
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys):
        return "vae"
    if "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys):
        return "unet"
    raise CheckpointError("the manifest matches no known layout (sgm single file, diffusers unet/vae, CLIP vision)")


def check_manifest(manifest: str, engine) -> tuple[list[str], str]:
    """Check a {key: shape} manifest against the engine; returns the problems and a summary line."""
    try:
        with open(manifest) as f:
            shapes = {k: tuple(v) for k, v in json.load(f).items()}
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read manifest {manifest}: {e}") from e
    model_shapes = param_shapes(engine)
    layout = manifest_layout(set(shapes))
    if layout == "sgm":
        maps = {layout: sgm_name_map(shapes, model_shapes)}
        scope = None
    else:
        maps = diffusers_name_maps(engine, {layout: shapes})
        scope = component_prefixes(engine)[layout]
    problems = check({layout: shapes}, maps, model_shapes, scope)
    name_map = maps[layout]
    in_scope = [n for n in model_shapes if scope is None or n.startswith(tuple(scope))]
    summary = (
        f"{os.path.basename(manifest)} ({layout}): {len(shapes)} keys, {len(name_map.rules)} mapped, "
        f"{len(name_map.dropped)} dropped on purpose; {len(in_scope)} model parameters in scope; "
        f"{len(problems)} problems"
    )
    return problems, summary


def plan_summary(plan: Plan, source: str) -> str:
    mapped = sum(len(m.rules) for m in plan.maps.values())
    dropped = sum(len(m.dropped) for m in plan.maps.values())
    keys = sum(len(s) for s in plan.sources.values())
    return f"{source}: {keys} keys, {mapped} mapped, {dropped} dropped on purpose; {len(plan.problems)} problems"


def convert(
    pt_weights_file: str,
    config: str,
    out_dir: str | None = None,
    dtype: str = "fp32",
    dry_run: bool = False,
    manifest: str | None = None,
) -> int:
    """Convert and write `<out_dir>/<name>.ckpt`; returns the process exit code."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    engine = build_engine(config, lazy=True, drop=("sampler_config",))
    if dry_run and manifest:
        problems, summary = check_manifest(manifest, engine)
    else:
        if not os.path.exists(pt_weights_file):
            raise CheckpointError(f"weights not found: {pt_weights_file}")
        plan = plan_for(pt_weights_file, engine)
        problems, summary = plan.problems, plan_summary(plan, pt_weights_file)
    for p in problems:
        print(p)
    if problems or dry_run:
        print(summary)
        return 1 if problems else 0
    src = Path(pt_weights_file)
    out_dir = out_dir or str(src.parent / "ms_models")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, (src.name if src.is_dir() else src.stem) + ".ckpt")
    n = save_mapped(plan, out, dtype)
    print(summary)
    print(f"wrote {n} parameters ({dtype}) to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pt_weights_file", type=str, default="", help="sgm .safetensors/.ckpt/.pt or a diffusers folder"
    )
    parser.add_argument("--config", type=str, required=True, help="model config, e.g. configs/svd_xt.yaml")
    parser.add_argument("--out_dir", type=str, default=None, help="output folder (default: <weights dir>/ms_models)")
    parser.add_argument("--dtype", type=str, default="fp32", help="stored dtype: fp32, fp16 or bf16")
    parser.add_argument("--dry_run", type=bool, default=False, help="check only, write nothing")
    parser.add_argument("--manifest", type=str, default=None, help="with --dry_run: a {key: shape} JSON to check")
    args = parser.parse_args(argv)
    if not args.pt_weights_file and not (args.dry_run and args.manifest):
        parser.error("--pt_weights_file is required (or --dry_run with --manifest)")
    try:
        return convert(args.pt_weights_file, args.config, args.out_dir, args.dtype, args.dry_run, args.manifest)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
