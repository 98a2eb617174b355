"""Where one denoiser evaluation spends its time, by kind of operator, on either side: ours under mindspore.Profiler
(graph mode by default), the diffusers reference under torch.profiler (self time of each aten operator).

    python benchmarks/profile_unet.py --preset svd --side ours
    python benchmarks/profile_unet.py --preset svd --side ref
    python benchmarks/profile_unet.py --preset small --side ours --train     # a training step (bench_train.py's)

Prints one line per kind (convolution, fully connected, attention, normalisation, elementwise, permutation and
copies, other): milliseconds, share of the profiled evaluation and number of operator calls; then the twelve most
expensive layers (ours: by the scope of the cell that launched them, where a graph that reuses one compiled block
for several layers names them all after the first; the reference: by operator and input shapes); then the sixteen
most expensive operator types (ours: a compiled kernel by the class of the cell that launched it).
The inputs and models are those of benchmarks/bench_unet.py; one warm-up evaluation runs before the profiled one.
"""

from __future__ import annotations

import collections
import csv
import glob
import sys
import tempfile

from benchmarks import harness
from benchmarks.bench_unet import inputs
from benchmarks.harness import Case

KINDS = (
    "convolution", "fully connected", "attention", "normalisation", "elementwise", "permutation and copies",
    "optimizer",
)  # fmt: skip


def _our_kind(op_type: str, scope: list[str], train: bool = False) -> str:
    """The kind of one of our operators, from its type and (for compiled kernels) the cells above it. GEGLU's
    kernel is its gating pass in training, and outside training its two matmuls with the gating in their epilogues."""
    if any(s.startswith("updater-") for s in scope):
        return "optimizer"
    if op_type == "Custom":  # a compiled kernel: the class of the cell that launched it (a gradient's: above it)
        at = -3 if len(scope) > 2 and scope[-2].startswith("Grad_") else -2
        owner = scope[at].split("-")[-1] if len(scope) >= -at else ""
        return {
            "_Conv": "convolution",
            "Linear": "fully connected",
            "_PermuteKernel": "permutation and copies",
            "GroupNorm": "normalisation",
            "LayerNorm": "normalisation",
            "GEGLU": "elementwise" if train else "fully connected",
            "GELU": "elementwise",
            "Attention": "attention",  # the fused attention kernel (or the softmax kernel without it)
            "CrossAttention": "elementwise",  # the add-rows kernel of a one-token cross-attention's residual
            "SpatialVideoTransformer": "elementwise",  # the add-rows kernel of the frame-index embedding
            "AlphaBlender": "elementwise",  # the blend of the spatial and temporal paths
            "Upsample": "permutation and copies",  # the nearest 2x upsampling kernel
            "MultiheadSelfAttention": "attention",
        }.get(owner, "other")
    if op_type in ("MatMul", "BiasAdd"):
        return "fully connected"
    if op_type in ("BatchMatMul", "Softmax"):
        return "attention"
    if op_type in ("LayerNorm", "GroupNorm"):
        return "normalisation"
    if op_type in ("Transpose", "Tile", "Concat", "StridedSlice", "Reshape"):
        return "permutation and copies"
    if op_type in ("Add", "Mul", "Sub", "Div", "Sigmoid", "Erf", "Exp", "Neg", "Sqrt", "Cos", "Sin", "Cast"):
        return "elementwise"
    return "other"


def _ref_kind(name: str) -> str:
    name = name.removeprefix("aten::")
    if name.removeprefix("_foreach_") in ("lerp_", "addcmul_", "addcdiv_", "linalg_vector_norm", "norm"):
        return "optimizer"  # AdamW's moment updates and clip_grad_norm_'s norms (its scaling is a plain mul_)
    if "convolution" in name:
        return "convolution"
    if name in ("addmm", "mm", "linear"):
        return "fully connected"
    if name in ("bmm", "baddbmm", "softmax", "_softmax") or "scaled_dot_product" in name:
        return "attention"
    if "norm" in name:
        return "normalisation"
    if name in ("copy_", "cat", "clone", "contiguous", "permute", "transpose"):
        return "permutation and copies"
    if name in ("add", "add_", "mul", "mul_", "div", "sub", "gelu", "silu", "sigmoid", "exp", "neg", "sqrt", "cos",
                "sin", "rsub"):  # fmt: skip
        return "elementwise"
    return "other"


def ours(case: Case) -> tuple[dict[str, list[float]], list[tuple[str, float]], list[tuple[str, float]]]:
    from mindspore import Profiler, Tensor

    if case.extra["train"]:
        from benchmarks.bench_train import our_step

        run, _ = our_step(case)
        run()  # compiles
    else:
        from benchmarks.models import our_denoiser

        harness.mindspore_setup(case)
        cell = our_denoiser(case.config)
        a = {k: Tensor(v) for k, v in inputs(case).items() if k != "time_ids"}

        def run():
            return cell(a["x"], a["sigma"], a["concat"], a["context"], a["y"], case.frames).asnumpy()

    run()
    with tempfile.TemporaryDirectory() as out:
        profiler = Profiler(output_path=out)
        run()
        profiler.stop()
        profiler.analyse()
        files = glob.glob(f"{out}/**/cpu_op_detail_info_*.csv", recursive=True)
        if not files:
            raise RuntimeError("mindspore.Profiler wrote no cpu_op_detail_info file")
        rows = list(csv.DictReader(open(files[0])))
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    layers: collections.Counter = collections.Counter()
    ops: collections.Counter = collections.Counter()
    for r in rows:
        ms_ = float(r["op_total_time(ms)"])
        scope = r["full_op_name"].split("/")
        kind = kinds[_our_kind(r["op_type"], scope, case.extra["train"])]
        kind[0] += ms_
        kind[1] += int(r["op_occurrences"])
        layers[".".join(s.split("-")[0] for s in scope[2:-1]) + f" ({r['op_type']})"] += ms_
        owner = scope[-2].split("-")[-1] if r["op_type"] == "Custom" and len(scope) > 1 else ""
        ops[r["op_type"] + (f" in {owner}" if owner else "")] += ms_
    return kinds, layers.most_common(12), ops.most_common(16)


def ref(case: Case) -> tuple[dict[str, list[float]], list[tuple[str, float]], list[tuple[str, float]]]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    if case.extra["train"]:
        from benchmarks.bench_train import ref_step

        run, _ = ref_step(case)
    else:
        from benchmarks.models import diffusers_unet

        harness.torch_setup(case)
        unet = diffusers_unet(case.config)
        a = inputs(case)
        b, t = 2, case.frames
        x = torch.from_numpy(a["x"]).reshape(b, t, *a["x"].shape[1:])
        concat = torch.from_numpy(a["concat"]).reshape(b, t, *a["concat"].shape[1:])
        context = torch.from_numpy(a["context"]).reshape(b, t, 1, -1)[:, 0]
        time_ids = torch.from_numpy(a["time_ids"])

        def run():
            with torch.inference_mode():
                return unet(torch.cat([x, concat], 2), 0.5, context, time_ids, return_dict=False)[0]

    run()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.key_averages():
        kind = kinds[_ref_kind(e.key)]
        kind[0] += e.self_cpu_time_total / 1e3
        kind[1] += e.count
    layers = [
        (f"{e.key} {e.input_shapes}", e.self_cpu_time_total / 1e3) for e in prof.key_averages(group_by_input_shape=True)
    ]
    ops = [(e.key, e.self_cpu_time_total / 1e3) for e in prof.key_averages()]
    return kinds, sorted(layers, key=lambda kv: -kv[1])[:12], sorted(ops, key=lambda kv: -kv[1])[:16]


def main() -> int:
    parser = harness.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="store_true", help="one temporal-only training step of bench_train.py")
    args = parser.parse_args()
    if args.side == "both":
        parser.error("--side ours or --side ref: each side profiles in its own process")
    args.full_unet = args.recompute = False  # bench_train.py's defaults
    case = harness.case_from_args(args, ("train", "full_unet", "recompute"))
    harness.set_threads(case.threads)
    kinds, layers, ops = (ours if args.side == "ours" else ref)(case)
    total = sum(v[0] for v in kinds.values())
    what = f"a training step on {case.frames}" if args.train else f"2 x {case.frames}"
    print(f"{args.side}: {case.config}, {what} frames of {case.height}x{case.width}; operator time "
          f"{total / 1e3:.3f} s")  # fmt: skip
    for kind in (*KINDS, "other"):
        ms_, calls = kinds.get(kind, (0.0, 0))
        print(f"  {kind:24s} {ms_:9.1f} ms {100 * ms_ / max(total, 1e-9):5.1f} %  {int(calls):5d} calls")
    print("most expensive:")
    for name, ms_ in layers:
        print(f"  {ms_:9.1f} ms  {name}")
    print("by operator:")
    for name, ms_ in ops:
        print(f"  {ms_:9.1f} ms  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
