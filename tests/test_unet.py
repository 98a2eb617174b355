"""VideoUNet: names and shapes against the official SVD checkpoint, the diffusers name map, and numerical parity with
diffusers' UNetSpatioTemporalConditionModel on a tiny random configuration."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from mindspore import Tensor
from mindspore.nn.utils import no_init_parameters

from modules import kernels
from modules.attention import (
    AlphaBlender,
    BasicTransformerBlock,
    CrossAttention,
    SpatialVideoTransformer,
    VideoTransformerBlock,
)
from modules.convert.rules import NameMap
from modules.convert.unet import unet_from_diffusers
from modules.layers import attention, permuter
from modules.unet import VideoResBlock, VideoUNet

MANIFESTS = Path(__file__).parent / "data" / "manifests"  # copies of /work/shared/reference/manifests
PREFIX = "model.diffusion_model."

SVD_UNET = dict(
    adm_in_channels=768,
    num_classes="sequential",
    use_checkpoint=True,
    in_channels=8,
    out_channels=4,
    model_channels=320,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 4, 4],
    num_head_channels=64,
    use_linear_in_transformer=True,
    transformer_depth=1,
    context_dim=1024,
    spatial_transformer_attn_type="softmax-xformers",
    extra_ff_mix_layer=True,
    use_spatial_context=True,
    merge_strategy="learned_with_images",
    video_kernel_size=[3, 1, 1],
)

# Tiny pair: level 0 with attention (2 heads of 16), level 1 without; the middle block has 4 heads of 16.
TINY_DIFFUSERS = dict(
    in_channels=8,
    out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    block_out_channels=(32, 64),
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24,
    layers_per_block=1,
    cross_attention_dim=32,
    num_attention_heads=(2, 4),
    num_frames=3,
)
TINY_SGM = dict(
    SVD_UNET,
    num_res_blocks=1,
    use_checkpoint=False,
    adm_in_channels=24,
    model_channels=32,
    attention_resolutions=[1],
    channel_mult=[1, 2],
    num_head_channels=16,
    context_dim=32,
    spatial_transformer_attn_type="softmax",
)
B, T, H, W = 2, 3, 8, 8


def _manifest(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((MANIFESTS / name).read_text()).items()}


def _sgm_unet_manifest() -> dict[str, tuple[int, ...]]:
    return {k[len(PREFIX) :]: v for k, v in _manifest("sgm_svd.json").items() if k.startswith(PREFIX)}


def _shapes(cell) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in cell.parameters_and_names()}


def _load(cell, name_map: NameMap, source: dict[str, np.ndarray]) -> None:
    params = dict(cell.parameters_and_names())
    assert {r.target for r in name_map.rules} == set(params)
    for rule in name_map.rules:
        value = rule.apply([source[s] for s in rule.sources])
        assert value.shape == tuple(params[rule.target].shape), rule.target
        params[rule.target].set_data(Tensor(np.ascontiguousarray(value), ms.float32))


def _rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------------------------------------------------------------
# Names and shapes


def test_full_size_names_shapes_and_count_match_sgm_checkpoint():
    start = time.time()
    with no_init_parameters():
        net = VideoUNet(**SVD_UNET)
    ours = _shapes(net)
    ref = _sgm_unet_manifest()
    assert len(ref) == 1428
    assert set(ours) == set(ref), (sorted(set(ours) - set(ref))[:5], sorted(set(ref) - set(ours))[:5])
    assert ours == ref
    assert sum(math.prod(s) for s in ours.values()) == 1_524_623_082
    temporal = net.get_temporal_param_names(prefix=PREFIX)
    assert len(temporal) == 738
    assert sum(math.prod(ref[n[len(PREFIX) :]]) for n in temporal) == 656_076_838
    assert all(n.startswith(PREFIX) for n in temporal)
    # use_checkpoint: recompute on every VideoResBlock and SpatialVideoTransformer
    blocks = [layer for seq in (*net.input_blocks, net.middle_block, *net.output_blocks) for layer in seq.cell_list]
    recomputed = [type(b).__name__ for b in blocks if getattr(b, "_recompute_cell", None) is not None]
    assert recomputed.count("VideoResBlock") == 22 and recomputed.count("SpatialVideoTransformer") == 16
    assert time.time() - start < 30


def test_diffusers_name_map_covers_both_manifests():
    source = _manifest("diffusers_unet_svd.json")
    ref = _sgm_unet_manifest()
    name_map = unet_from_diffusers(source)
    assert name_map.dropped == {}
    used = [s for r in name_map.rules for s in r.sources]
    assert len(used) == len(set(used)) == len(source) == 1428
    produced = {r.target: source[r.sources[0]] for r in name_map.rules}
    assert len(produced) == len(name_map.rules)
    assert produced == ref
    # the combine-free rules also work on zero-stride stand-ins
    for rule in name_map.rules[:20]:
        stand_in = np.broadcast_to(np.zeros((), np.float32), source[rule.sources[0]])
        assert rule.apply([stand_in]).shape == ref[rule.target]


def test_diffusers_name_map_leaves_unknown_keys_unmapped():
    source = dict(_manifest("diffusers_unet_svd.json"))
    source["down_blocks.0.attentions.0.mystery.weight"] = (3,)
    source["something_else.weight"] = (3,)
    name_map = unet_from_diffusers(source)
    seen = {s for r in name_map.rules for s in r.sources} | set(name_map.dropped)
    assert "down_blocks.0.attentions.0.mystery.weight" not in seen
    assert "something_else.weight" not in seen
    assert len(name_map.rules) == 1428


# ---------------------------------------------------------------------------------------------------------------------
# AlphaBlender


@pytest.mark.parametrize("shape", [(B, 5, T, 2, 2), (B * T, 5, 2, 2), (B * T, 4, 5)])
def test_alpha_blender_strategies(shape):
    rng = np.random.default_rng(0)
    xs, xt = (Tensor(rng.standard_normal(shape).astype(np.float32)) for _ in range(2))
    learned, with_images, fixed = AlphaBlender(0.3, "learned"), AlphaBlender(0.3), AlphaBlender(0.3, "fixed")
    for blender in (learned, with_images):
        blender.mix_factor.set_data(Tensor([0.8], ms.float32))
    a = 1 / (1 + math.exp(-0.8))
    expected = a * xs.asnumpy() + (1 - a) * xt.asnumpy()
    zeros = Tensor(np.zeros((B, T), np.float32))
    np.testing.assert_allclose(learned(xs, xt).asnumpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(with_images(xs, xt, zeros).asnumpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(with_images(xs, xt).asnumpy(), expected, rtol=1e-6, atol=1e-6)  # None = zeros
    np.testing.assert_allclose(fixed(xs, xt).asnumpy(), 0.3 * xs.asnumpy() + 0.7 * xt.asnumpy(), rtol=1e-6, atol=1e-6)
    ones = Tensor(np.ones((B, T), np.float32))
    np.testing.assert_array_equal(with_images(xs, xt, ones).asnumpy(), xs.asnumpy())
    # one image-only frame (clip 1, frame 2): that frame is spatial only, the others are blended
    ind = np.zeros((B, T), np.float32)
    ind[1, 2] = 1
    out = with_images(xs, xt, Tensor(ind)).asnumpy()
    frame = (slice(1, 2), slice(None), slice(2, 3)) if len(shape) == 5 else (slice(1 * T + 2, 1 * T + 3),)
    np.testing.assert_array_equal(out[frame], xs.asnumpy()[frame])
    mask = np.ones(shape, bool)
    mask[frame] = False
    np.testing.assert_allclose(out[mask], expected[mask], rtol=1e-6, atol=1e-6)
    assert not fixed.mix_factor.requires_grad and learned.mix_factor.requires_grad


class _Blend(ms.nn.Cell):
    def __init__(self, blender, indicator):
        super().__init__()
        self.blender, self.indicator = blender, indicator

    def construct(self, xs, xt):
        return self.blender(xs, xt, self.indicator)


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("shape", [(B, 5, T, 2, 2), (B * T, 5, 2, 2), (B * T, 4, 5), (B * T, 40, 32, 32)])
def test_alpha_blender_kernel_and_its_gradients_match_torch(mode, shape):
    """The blend with and without image-only frames (one alpha, or one per frame) against torch in float64, with the
    gradients of both inputs and of mix_factor; the compiled kernel takes all but the per-frame 5-D blend, and the
    largest shape splits between threads."""
    ms.set_context(mode=mode)
    rng = np.random.default_rng(1)
    xs, xt, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    ind = np.zeros((B, T), np.float32)
    ind[1, 2] = 1
    for indicator in (None, ind):
        blender = AlphaBlender(0.3)
        assert (blender.blend is not None) == kernels.enabled()
        blender.mix_factor.set_data(Tensor([0.8], ms.float32))
        xst, xtt, mix = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (xs, xt, [0.8]))
        alpha = torch.sigmoid(mix).expand(B, T)
        if indicator is not None:
            alpha = torch.where(torch.from_numpy(indicator).bool(), torch.ones(B, T, dtype=torch.float64), alpha)
        alpha = alpha.reshape(B, 1, T, 1, 1) if len(shape) == 5 else alpha.reshape(B * T, *[1] * (len(shape) - 1))
        yt = alpha * xst + (1 - alpha) * xtt
        (yt * torch.from_numpy(dy).double()).sum().backward()
        cell = _Blend(blender, None if indicator is None else Tensor(indicator))
        np.testing.assert_allclose(cell(Tensor(xs), Tensor(xt)).asnumpy(), yt.detach(), rtol=1e-6, atol=1e-6)
        grads = ms.grad(_Weighted(cell, Tensor(dy)), (0, 1), blender.trainable_params())(Tensor(xs), Tensor(xt))
        (dxs, dxt), (dmix,) = grads
        np.testing.assert_allclose(dxs.asnumpy(), xst.grad, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dxt.asnumpy(), xtt.grad, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dmix.asnumpy(), mix.grad, rtol=1e-4, atol=1e-4)


class _Weighted(ms.nn.Cell):
    def __init__(self, cell, w):
        super().__init__()
        self.cell, self.w = cell, w

    def construct(self, xs, xt):
        return (self.cell(xs, xt) * self.w).sum()


# ---------------------------------------------------------------------------------------------------------------------
# Attention blocks


def _randn(rng, *shape) -> Tensor:
    return Tensor(rng.standard_normal(shape).astype(np.float32))


def test_cross_attention_shared_and_single_token_context():
    rng = np.random.default_rng(6)
    attn = CrossAttention(16, context_dim=8, heads=2, dim_head=8)
    x = _randn(rng, 6, 5, 16)  # 6 rows: 2 contexts, each shared by 3 consecutive rows
    for tokens in (3, 1):  # 1 token takes the shortcut
        context = _randn(rng, 2, tokens, 8)
        repeated = Tensor(np.repeat(context.asnumpy(), 3, axis=0))
        q, k, v = attn.to_q(x), attn.to_k(repeated), attn.to_v(repeated)
        full = attn.to_out(attention(q, k, v, 2, permuter((0, 2, 1, 3)))).asnumpy()  # without the fused kernel
        np.testing.assert_allclose(attn(x, context).asnumpy(), full, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(attn(x, repeated).asnumpy(), full, rtol=1e-5, atol=1e-6)


def test_chunked_blocks_match_in_pynative_and_graph_mode():
    rng = np.random.default_rng(7)
    spatial = BasicTransformerBlock(16, 2, 8, context_dim=8)
    temporal = VideoTransformerBlock(16, 2, 8, context_dim=8, ff_in=True, inner_dim=16)
    x, context, clip_context = _randn(rng, 2 * T, 4, 16), _randn(rng, 2 * T, 2, 8), _randn(rng, 2, 2, 8)

    def run(x, context, clip_context):
        return spatial(x, context), temporal(x, clip_context, T)

    plain = [o.asnumpy() for o in run(x, context, clip_context)]
    # sgm repeats the clip context over the tokens, (b s) L C; sharing it per clip is the same
    token_context = Tensor(np.repeat(clip_context.asnumpy(), 4, axis=0))
    np.testing.assert_allclose(temporal(x, token_context, T).asnumpy(), plain[1], rtol=1e-5, atol=1e-6)
    spatial.set_chunk_feed_forward(3, 1)  # 4 tokens: chunks of 3 and 1
    temporal.set_chunk_feed_forward(2, 0)  # always along frames: 3 frames in chunks of 2 and 1
    for out, ref in zip(run(x, context, clip_context), plain):
        np.testing.assert_allclose(out.asnumpy(), ref, rtol=1e-5, atol=1e-6)

    # graph mode (one compiled function per block: parameter names must be unique within a graph)
    @ms.jit
    def graph_spatial(x, c):
        return spatial(x, c)

    @ms.jit
    def graph_temporal(x, c):
        return temporal(x, c, T)

    np.testing.assert_allclose(graph_spatial(x, context).asnumpy(), plain[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(graph_temporal(x, clip_context).asnumpy(), plain[1], rtol=1e-5, atol=1e-6)


class _BlockLoss(ms.nn.Cell):
    def __init__(self, block, w, *args):
        super().__init__()
        self.block, self.w, self.args = block, w, args

    def construct(self, x, context):
        return (self.block(x, context, *self.args) * self.w).sum()


@pytest.mark.parametrize("mode", [0, 1])
def test_transformer_blocks_on_the_kernels_match_mindspores_operators(monkeypatch, mode):
    """The spatial and temporal transformer blocks with the fully connected layers on oneDNN 3's matmul (GEGLU fused
    outside training, the residuals in the projections' epilogues) against the same blocks, same weights, on
    MindSpore's MatMul: outputs outside training, and in training the gradients of the input and every parameter."""
    if not kernels.enabled() or kernels.matmul_library() is None:
        pytest.skip("needs the CPU kernels and oneDNN 3")
    ms.set_context(mode=mode)
    rng = np.random.default_rng(12)

    def build(kernel):
        monkeypatch.setenv("SVD_LINEAR_KERNEL", kernel)
        temporal = VideoTransformerBlock(64, 2, 32, context_dim=8, ff_in=True, inner_dim=64)
        return [BasicTransformerBlock(64, 2, 32, context_dim=8), temporal]

    fused, plain = build("1"), build("0")
    assert fused[0].attn1.to_out[0].kernel_residual is not None and fused[1].ff.net[0].fused is not None
    assert plain[0].attn1.to_out[0].kernel_residual is None
    x, dy = _randn(rng, 2 * T, 24, 64), _randn(rng, 2 * T, 24, 64)
    contexts = (_randn(rng, 2 * T, 2, 8), _randn(rng, 2, 1, 8))
    for ours, ref, context, args in zip(fused, plain, contexts, ((), (T,))):
        for p, q in zip(ours.get_parameters(), ref.get_parameters()):
            q.set_data(Tensor(rng.standard_normal(q.shape).astype(np.float32) * 0.2))
            p.set_data(q.data.copy())
        for block in (ours, ref):
            block.set_train(False)
        np.testing.assert_allclose(
            ours(x, context, *args).asnumpy(), ref(x, context, *args).asnumpy(), rtol=1e-4, atol=1e-4
        )
        grads = []
        for block in (ours, ref):
            loss = _BlockLoss(block, dy, *args)
            loss.set_train(True)
            grads.append(ms.grad(loss, 0, block.trainable_params())(x, context))
        (dx, dparams), (dx_ref, dparams_ref) = grads
        np.testing.assert_allclose(dx.asnumpy(), dx_ref.asnumpy(), rtol=1e-4, atol=1e-4)
        for g, g_ref in zip(dparams, dparams_ref):
            np.testing.assert_allclose(g.asnumpy(), g_ref.asnumpy(), rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Parity with diffusers


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every tensor (zero-initialised ones and mix factors too) a random, well-scaled value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("mix_factor"):
                p.copy_(noise)
            elif p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    ref = UNetSpatioTemporalConditionModel(**TINY_DIFFUSERS).eval()
    _randomize(ref, seed=1)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    ours = VideoUNet(**TINY_SGM)
    ours.set_train(False)
    _load(ours, unet_from_diffusers({k: v.shape for k, v in state.items()}), state)

    rng = np.random.default_rng(2)
    sigma = np.exp(rng.normal(0.7, 1.6, size=B))
    inputs = dict(
        sample=rng.standard_normal((B, T, 8, H, W)).astype(np.float32),
        c_noise=(0.25 * np.log(sigma)).astype(np.float32),  # one noise level per clip, as diffusers takes it
        context=rng.standard_normal((B, 1, 32)).astype(np.float32),
        added_time_ids=np.stack([rng.uniform(3, 30, B), rng.uniform(1, 255, B), rng.uniform(0, 0.1, B)], 1),
    )
    inputs["added_time_ids"] = inputs["added_time_ids"].astype(np.float32)
    with torch.no_grad():
        expected = ref(
            torch.from_numpy(inputs["sample"]),
            torch.from_numpy(inputs["c_noise"]),
            torch.from_numpy(inputs["context"]),
            torch.from_numpy(inputs["added_time_ids"]),
        ).sample.numpy()
        # y as diffusers builds it: each of the 3 ids -> 8-dim [cos, sin] embedding, concatenated per clip
        y = ref.add_time_proj(torch.from_numpy(inputs["added_time_ids"]).flatten()).reshape(B, -1).numpy()
    plain = ours(*_our_args(inputs, y), num_frames=T).asnumpy()
    return dict(ref=ref, ours=ours, inputs=inputs, y=y, expected=expected.reshape(B * T, 4, H, W), plain=plain)


def _our_args(inputs: dict, y: np.ndarray) -> tuple:
    """diffusers' per-clip conditioning repeated per frame: (b t) rows."""
    return (
        Tensor(inputs["sample"].reshape(B * T, 8, H, W)),
        Tensor(np.repeat(inputs["c_noise"], T)),
        Tensor(np.repeat(inputs["context"], T, axis=0)),
        Tensor(np.repeat(y, T, axis=0)),
    )


def _y_like_sgm(added_time_ids: np.ndarray, dim: int = 8) -> np.ndarray:
    """The sgm conditioner's vector: each scalar -> [cos(t f), sin(t f)], f_i = 10000^(-i / (dim/2)), concatenated."""
    freqs = np.exp(-math.log(10000) * np.arange(dim // 2) / (dim // 2))
    args = added_time_ids[:, :, None].astype(np.float64) * freqs
    return np.concatenate([np.cos(args), np.sin(args)], -1).reshape(len(added_time_ids), -1).astype(np.float32)


def test_parity_with_diffusers(tiny_pair):
    inputs, y, out, expected = tiny_pair["inputs"], tiny_pair["y"], tiny_pair["plain"], tiny_pair["expected"]
    np.testing.assert_allclose(_y_like_sgm(inputs["added_time_ids"]), y, rtol=1e-5, atol=1e-5)
    assert out.shape == (B * T, 4, H, W)
    assert np.abs(expected).max() > 0.1
    assert _rel_err(out, expected) <= 1e-4


def test_parity_with_diffusers_multi_token_context(tiny_pair):
    """SVD's context is one token (which takes a shortcut); check the general attention path with 3 tokens too."""
    inputs = dict(tiny_pair["inputs"])
    inputs["context"] = np.random.default_rng(5).standard_normal((B, 3, 32)).astype(np.float32)
    with torch.no_grad():
        expected = tiny_pair["ref"](
            *(torch.from_numpy(inputs[k]) for k in ("sample", "c_noise", "context", "added_time_ids"))
        ).sample.numpy()
    out = tiny_pair["ours"](*_our_args(inputs, tiny_pair["y"]), num_frames=T).asnumpy()
    assert _rel_err(out, expected.reshape(out.shape)) <= 1e-4


def test_forward_chunking_gives_same_output(tiny_pair):
    ours, args = tiny_pair["ours"], _our_args(tiny_pair["inputs"], tiny_pair["y"])
    try:
        # default: chunks of 1 along the batch (spatial) and frames (temporal); then 5 tokens at a time, uneven
        for chunk_size, dim in ((None, 0), (5, 1)):
            ours.enable_forward_chunking(chunk_size, dim)
            np.testing.assert_allclose(ours(*args, num_frames=T).asnumpy(), tiny_pair["plain"], rtol=1e-5, atol=1e-5)
    finally:
        ours.disable_forward_chunking()
    with pytest.raises(ValueError):
        ours.enable_forward_chunking(1, dim=2)


def test_learned_equals_learned_with_images_with_zero_indicator(tiny_pair):
    ours, args, plain = tiny_pair["ours"], _our_args(tiny_pair["inputs"], tiny_pair["y"]), tiny_pair["plain"]
    zeros = Tensor(np.zeros((B, T), np.float32))
    np.testing.assert_allclose(ours(*args, num_frames=T, image_only_indicator=zeros).asnumpy(), plain, atol=1e-6)
    learned = VideoUNet(**dict(TINY_SGM, merge_strategy="learned"))
    learned.set_train(False)
    source = dict(ours.parameters_and_names())
    for name, param in learned.parameters_and_names():
        param.set_data(source[name].value())
    np.testing.assert_allclose(learned(*args, num_frames=T).asnumpy(), plain, rtol=1e-6, atol=1e-6)


def test_image_only_frames_do_not_see_other_frames(tiny_pair):
    """With every frame image-only, each frame is processed alone: same output as a batch of single frames."""
    ours, (x, c_noise, context, y) = tiny_pair["ours"], _our_args(tiny_pair["inputs"], tiny_pair["y"])
    ones = Tensor(np.ones((B, T), np.float32))
    video = ours(x, c_noise, context, y, num_frames=T, image_only_indicator=ones).asnumpy()
    frames = ours(x, c_noise, context, y, num_frames=1, image_only_indicator=Tensor(np.ones((B * T, 1), np.float32)))
    np.testing.assert_allclose(video, frames.asnumpy(), rtol=1e-5, atol=1e-5)
    assert _rel_err(video, tiny_pair["plain"]) > 1e-2  # the temporal layers do matter otherwise


def test_graph_mode_matches_pynative(tiny_pair):
    ours, args = tiny_pair["ours"], _our_args(tiny_pair["inputs"], tiny_pair["y"])

    @ms.jit
    def graph_fn(x, c_noise, context, y):
        return ours(x, c_noise, context, y, num_frames=T)

    start = time.time()
    out = graph_fn(*args).asnumpy()
    compile_s = time.time() - start
    np.testing.assert_allclose(out, tiny_pair["plain"], rtol=1e-5, atol=1e-5)
    assert compile_s < 120, f"graph compile took {compile_s:.0f} s"


def test_recompute_keeps_gradients():
    """use_checkpoint turns on recompute; the gradients of every parameter (temporal ones included) must not change."""
    rng = np.random.default_rng(3)
    x = Tensor(rng.standard_normal((B * T, 32, 4, 4)).astype(np.float32))
    emb = Tensor(rng.standard_normal((B * T, 64)).astype(np.float32))
    context = Tensor(rng.standard_normal((B * T, 1, 16)).astype(np.float32))
    grads = []
    for use_checkpoint in (False, True):
        res = VideoResBlock(32, 64, 0.0, [3, 1, 1], "learned_with_images", use_checkpoint=use_checkpoint)
        attn = SpatialVideoTransformer(
            32, 2, 16, use_linear=True, context_dim=16, use_spatial_context=True,
            merge_strategy="learned_with_images", ff_in=True, checkpoint=use_checkpoint,
        )  # fmt: skip
        params = list(res.get_parameters()) + list(attn.get_parameters())
        values = np.random.default_rng(4)  # identical, non-zero values in both runs
        for p in params:
            p.set_data(Tensor(values.standard_normal(p.shape).astype(np.float32) * 0.1))

        def loss(x, res=res, attn=attn):
            return (attn(res(x, emb, T), context, None, T) ** 2).sum()

        grads.append(ms.grad(loss, grad_position=0, weights=params)(x))
    assert res._recompute_cell is not None and attn._recompute_cell is not None
    np.testing.assert_allclose(grads[1][0].asnumpy(), grads[0][0].asnumpy(), rtol=1e-5, atol=1e-5)
    names = [n for n, _ in res.parameters_and_names()] + [n for n, _ in attn.parameters_and_names()]
    assert len(names) == len(grads[0][1]) == len(grads[1][1])
    for name, g0, g1 in zip(names, grads[0][1], grads[1][1]):
        # one context token: softmax is 1 whatever q and k, so attn2's query side (norm2, to_q, to_k) gets no gradient
        if not any(k in name for k in ("norm2", "attn2.to_q", "attn2.to_k")):
            assert np.abs(g0.asnumpy()).max() > 0, name
        np.testing.assert_allclose(g1.asnumpy(), g0.asnumpy(), rtol=1e-5, atol=1e-5, err_msg=name)


def test_norm_num_groups_reaches_every_group_norm():
    """`norm_num_groups` in a model config sets the groups of every GroupNorm it builds; SVD's configs keep 32."""
    from modules.build import build_engine
    from modules.config import load_config, to_container
    from modules.layers import GroupNorm, default_norm_groups

    def groups(engine):
        return {c.num_groups for _, c in engine.cells_and_names() if isinstance(c, GroupNorm)}

    cfg = to_container(load_config("configs/tiny/svd_tiny.yaml"))
    assert groups(build_engine(cfg, lazy=True)) == {32}
    cfg["model"]["params"]["norm_num_groups"] = 8
    assert groups(build_engine(cfg, lazy=True)) == {8}
    assert default_norm_groups() == 32  # the setting does not leak out of the build


@pytest.mark.parametrize("mode", [0, 1])
def test_single_token_cross_attention_residual_and_gradients(mode):
    """With one context token, attention output plus residual is one row per context added to its rows (the
    add-rows kernel where the kernels build): value and the gradients of x, the context, the residual and to_v's
    weight against the plain sum, in both modes."""
    ms.set_context(mode=mode)
    rng = np.random.default_rng(11)
    attn = CrossAttention(16, context_dim=8, heads=2, dim_head=8)
    x, residual, context = _randn(rng, 6, 5, 16), _randn(rng, 6, 5, 16), _randn(rng, 2, 1, 8)
    w = _randn(rng, 6, 5, 16)

    def fused(x_, c_, r_):
        return (attn(x_, c_, r_) * w).sum()

    def plain(x_, c_, r_):
        return ((attn(x_, c_) + r_) * w).sum()

    params = [attn.to_v.weight]
    (value, grads), (value_ref, grads_ref) = (
        ms.value_and_grad(f, (0, 1, 2), params)(x, context, residual) for f in (fused, plain)
    )
    np.testing.assert_allclose(value.asnumpy(), value_ref.asnumpy(), rtol=1e-5)
    for ours, ref in zip([*grads[0], *grads[1]], [*grads_ref[0], *grads_ref[1]]):
        np.testing.assert_allclose(ours.asnumpy(), ref.asnumpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(grads[0][1].asnumpy()).sum() > 0 and np.abs(grads[1][0].asnumpy()).sum() > 0
