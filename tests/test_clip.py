"""OpenCLIP vision tower, its preprocessing, the sgm image embedders and the transformers name map."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor

from modules.clip import (
    CLIP_MEAN,
    CLIP_STD,
    FrozenOpenCLIPImageEmbedder,
    FrozenOpenCLIPImagePredictionEmbedder,
    VisionTransformer,
    resize_antialiased,
)
from modules.convert.clip import clip_vision_from_transformers
from modules.convert.rules import NameMap

MANIFESTS = Path("/work/shared/reference/manifests")
SGM_PREFIX = "conditioner.embedders.0.open_clip."
VIT_H_PARAMS = 632_076_800

TINY = dict(image_size=224, patch_size=32, width=64, layers=2, heads=4, mlp_ratio=4.0, output_dim=32)


def _resize_reference():
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

    return _resize_with_antialiasing


def _shapes(cell) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in cell.parameters_and_names()}


def _load_name_map(cell, name_map: NameMap, source: dict[str, np.ndarray]) -> None:
    """Set every rule's target parameter from its sources (same semantics as the shared loader)."""
    params = dict(cell.parameters_and_names())
    targets = [r.target for r in name_map.rules]
    assert sorted(targets) == sorted(params), "the map must produce exactly the cell's parameters"
    for rule in name_map.rules:
        value = rule.apply([source[s] for s in rule.sources]).astype(np.float32)
        assert value.shape == tuple(params[rule.target].shape), rule.target
        params[rule.target].set_data(Tensor(value))


def _tiny_transformers_clip(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        image_size=TINY["image_size"],
        patch_size=TINY["patch_size"],
        hidden_size=TINY["width"],
        intermediate_size=int(TINY["width"] * TINY["mlp_ratio"]),
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        projection_dim=TINY["output_dim"],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):  # LayerNorm gains around 1
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim >= 2 and "position_embedding" not in name:  # weights scaled by fan-in
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:  # biases, class and position embeddings
                p.copy_(0.5 * noise)
    return model


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ----------------------------------------------------------------------------------------------------------------------
# names and shapes against the official manifests
# ----------------------------------------------------------------------------------------------------------------------


def test_vit_h_matches_sgm_manifest():
    with ms.nn.utils.no_init_parameters():
        embedder = FrozenOpenCLIPImageEmbedder(arch="ViT-H-14")
    manifest = json.loads((MANIFESTS / "sgm_svd.json").read_text())
    expected = {
        k[len(SGM_PREFIX) :]: tuple(v) for k, v in manifest.items() if k.startswith(SGM_PREFIX + "model.visual.")
    }
    ours = _shapes(embedder)
    assert len(expected) == 392
    assert sorted(set(ours) ^ set(expected)) == []
    assert ours == expected
    assert sum(math.prod(s) for s in ours.values()) == VIT_H_PARAMS
    assert not any(p.requires_grad for p in embedder.get_parameters()), "freeze=True must freeze the tower"


def test_transformers_manifest_maps_completely():
    source = {k: tuple(v) for k, v in json.loads((MANIFESTS / "transformers_clip_vision_h14.json").read_text()).items()}
    # the (non-persistent) position_ids buffer appears in some older exports; it must be dropped, not lost
    source_with_buffer = {**source, "vision_model.embeddings.position_ids": (1, 257)}
    with ms.nn.utils.no_init_parameters():
        tower = VisionTransformer()
    expected = _shapes(tower)
    for src in (source, source_with_buffer):
        name_map = clip_vision_from_transformers(src)
        used = [s for r in name_map.rules for s in r.sources]
        assert len(used) == len(set(used)), "a source key is used twice"
        assert not set(used) & set(name_map.dropped)
        assert set(used) | set(name_map.dropped) == set(src), "every source key is used or dropped with a reason"
        assert all(name_map.dropped.values())
        targets = [r.target for r in name_map.rules]
        assert len(targets) == len(set(targets))
        assert set(targets) == set(expected)
        for rule in name_map.rules:
            stand_ins = [np.broadcast_to(np.zeros((), np.float32), src[s]) for s in rule.sources]
            assert rule.apply(stand_ins).shape == expected[rule.target], rule.target
    assert clip_vision_from_transformers(source_with_buffer).dropped.keys() == {"vision_model.embeddings.position_ids"}


def test_unknown_transformers_key_is_reported():
    source = {k: tuple(v) for k, v in json.loads((MANIFESTS / "transformers_clip_vision_h14.json").read_text()).items()}
    source["vision_model.something_new.weight"] = (4,)
    name_map = clip_vision_from_transformers(source)
    used = {s for r in name_map.rules for s in r.sources}
    assert "vision_model.something_new.weight" not in used | set(name_map.dropped)


# ----------------------------------------------------------------------------------------------------------------------
# numerics against diffusers / transformers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(96, 160), (320, 576), (224, 224), (576, 1024), (251, 400), (30, 31)])
def test_resize_matches_diffusers(hw):
    resize_ref = _resize_reference()
    rng = np.random.default_rng(hw[0] * 7 + hw[1])
    x = rng.uniform(-1.0, 1.0, (2, 3, *hw)).astype(np.float32)
    ref = resize_ref(torch.from_numpy(x), (224, 224)).numpy()
    ours = resize_antialiased(Tensor(x), (224, 224)).asnumpy()
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    assert _rel_err(ours, ref) <= 1e-5


def test_resize_without_antialias_is_plain_bicubic():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1.0, 1.0, (1, 3, 320, 448)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(224, 224), mode="bicubic", align_corners=True)
    ours = resize_antialiased(Tensor(x), (224, 224), antialias=False).asnumpy()
    assert _rel_err(ours, ref.numpy()) <= 1e-5


def test_clip_normalisation_constants_match_transformers():
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert tuple(OPENAI_CLIP_MEAN) == CLIP_MEAN
    assert tuple(OPENAI_CLIP_STD) == CLIP_STD


def _tiny_pair():
    ref_model = _tiny_transformers_clip(seed=0)
    source = {k: v.detach().numpy() for k, v in ref_model.state_dict().items()}
    embedder = FrozenOpenCLIPImageEmbedder(arch="ViT-H-14", **TINY)
    name_map = clip_vision_from_transformers({k: v.shape for k, v in source.items()})
    _load_name_map(embedder.model.visual, name_map, source)
    return ref_model, embedder


@pytest.mark.parametrize("hw", [(96, 160), (320, 576)])
def test_embedder_matches_diffusers_and_transformers(hw):
    resize_ref = _resize_reference()
    ref_model, embedder = _tiny_pair()
    rng = np.random.default_rng(hw[0] + hw[1])
    image = rng.uniform(-1.0, 1.0, (2, 3, *hw)).astype(np.float32)

    # the diffusers pipeline's _encode_image, with the feature extractor's normalisation written out
    with torch.no_grad():
        x = resize_ref(torch.from_numpy(image), (224, 224))
        x = (x + 1.0) / 2.0
        x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        ref = ref_model(pixel_values=x).image_embeds.numpy()

    ours = embedder(Tensor(image)).asnumpy()
    assert ours.shape == ref.shape == (2, TINY["output_dim"])
    assert np.abs(ref).max() > 0.1
    assert _rel_err(ours, ref) <= 1e-4


def test_graph_mode_equals_pynative():
    _, embedder = _tiny_pair()
    image = Tensor(np.random.default_rng(3).uniform(-1.0, 1.0, (2, 3, 96, 160)).astype(np.float32))
    eager = embedder(image).asnumpy()
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = embedder(image).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert _rel_err(graph, eager) <= 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# embedder options
# ----------------------------------------------------------------------------------------------------------------------


def test_prediction_embedder_layout():
    n_cond, n_copies, b = 2, 3, 2
    inner = FrozenOpenCLIPImageEmbedder(**{**TINY, "layers": 1})
    wrapper = FrozenOpenCLIPImagePredictionEmbedder(inner, n_cond_frames=n_cond, n_copies=n_copies)
    assert wrapper.open_clip is inner
    frames = Tensor(np.random.default_rng(4).uniform(-1.0, 1.0, (b * n_cond, 3, 64, 64)).astype(np.float32))
    z = inner(frames).asnumpy()
    out = wrapper(frames).asnumpy()
    # einops "(b t) d -> b t d" then "b t d -> (b s) t d": each item repeated n_copies times in a row
    expected = np.repeat(z.reshape(b, n_cond, -1), n_copies, axis=0)
    assert out.shape == (b * n_copies, n_cond, TINY["output_dim"])
    np.testing.assert_array_equal(out, expected)


def test_prediction_embedder_from_config():
    config = {
        "target": "sgm.modules.encoders.modules.FrozenOpenCLIPImageEmbedder",
        "params": {"freeze": True, **TINY, "layers": 1},
    }
    wrapper = FrozenOpenCLIPImagePredictionEmbedder(open_clip_embedding_config=config, n_cond_frames=1, n_copies=1)
    assert isinstance(wrapper.open_clip, FrozenOpenCLIPImageEmbedder)
    names = [n for n, _ in wrapper.parameters_and_names()]
    assert "open_clip.model.visual.transformer.resblocks.0.attn.in_proj_weight" in names
    out = wrapper(Tensor(np.zeros((2, 3, 32, 48), np.float32)))
    assert out.shape == (2, 1, TINY["output_dim"])
    with pytest.raises(ValueError):
        FrozenOpenCLIPImagePredictionEmbedder({"target": "x.FrozenOpenCLIPEmbedder", "params": {}}, 1, 1)


def test_embedder_output_options():
    base = FrozenOpenCLIPImageEmbedder(**{**TINY, "layers": 1})
    image = Tensor(np.random.default_rng(5).uniform(-1.0, 1.0, (3, 3, 40, 40)).astype(np.float32))
    z = base(image).asnumpy()

    base.unsqueeze_dim = True
    assert base(image).shape == (3, 1, TINY["output_dim"])
    base.unsqueeze_dim = False
    base.repeat_to_max_len = True
    tokens, pooled = base(image)
    assert tokens.shape == (3, base.max_length, TINY["output_dim"])
    np.testing.assert_array_equal(tokens.asnumpy()[:, 5], z)
    np.testing.assert_array_equal(pooled.asnumpy(), z)
    base.repeat_to_max_len = False

    ms.set_seed(0)
    base.ucg_rate = 0.5
    dropped = base(Tensor(np.repeat(image.asnumpy()[:1], 64, axis=0))).asnumpy()
    rows_zero = np.all(dropped == 0, axis=1)
    assert 0 < rows_zero.sum() < 64
    np.testing.assert_allclose(dropped[~rows_zero], np.repeat(z[:1], (~rows_zero).sum(), axis=0), rtol=1e-5, atol=1e-6)


def test_unsupported_options_raise():
    with pytest.raises(NotImplementedError, match="num_image_crops"):
        FrozenOpenCLIPImageEmbedder(num_image_crops=2, **TINY)
    with pytest.raises(NotImplementedError, match="output_tokens"):
        FrozenOpenCLIPImageEmbedder(output_tokens=True, **TINY)
    with pytest.raises(ValueError, match="arch"):
        FrozenOpenCLIPImageEmbedder(arch="ViT-Q-99", width=64)
