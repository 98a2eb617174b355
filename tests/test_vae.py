"""The SVD autoencoders: checkpoint manifests, diffusers name maps, and numerical parity with diffusers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor
from mindspore.nn.utils import no_init_parameters

from modules.autoencoder import AutoencoderKL, AutoencoderKLModeOnly, AutoencodingEngine, Decoder, Encoder
from modules.convert.rules import NameMap
from modules.convert.vae import cond_encoder_from_diffusers, first_stage_from_diffusers, first_stage_from_diffusers_kl
from modules.temporal_ae import VideoDecoder

MANIFESTS = Path("/work/shared/reference/manifests")

SVD_DDCONFIG = dict(
    attn_type="vanilla",
    double_z=True,
    z_channels=4,
    resolution=256,
    in_channels=3,
    out_ch=3,
    ch=128,
    ch_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_resolutions=[],
    dropout=0.0,
)
# The diffusers tiny VAE below: block_out_channels (32, 64), layers_per_block 2, latent_channels 4.
TINY_DDCONFIG = dict(SVD_DDCONFIG, ch=32, ch_mult=[1, 2], resolution=32)


def _manifest(name: str, prefix: str, exclude: tuple[str, ...] = ()) -> dict[str, list[int]]:
    full = json.loads((MANIFESTS / name).read_text())
    out = {}
    for key, shape in full.items():
        if key.startswith(prefix) and not key[len(prefix) :].startswith(exclude):
            out[key[len(prefix) :]] = list(shape)
    return out


def _shapes(cell) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in cell.parameters_and_names()}


def _svd_first_stage(ddconfig: dict) -> AutoencodingEngine:
    return AutoencodingEngine(Encoder(**ddconfig), VideoDecoder(**ddconfig, video_kernel_size=[3, 1, 1]))


# ---------------------------------------------------------------- manifests


def test_first_stage_matches_sgm_manifest():
    with no_init_parameters():
        model = _svd_first_stage(SVD_DDCONFIG)
    ours = _shapes(model)
    ref = _manifest("sgm_svd.json", "first_stage_model.")
    assert len(ref) == 372
    assert ours == ref
    assert sum(math.prod(s) for s in ours.values()) == 97_742_775


def test_first_stage_and_cond_encoder_from_svd_yaml_match_sgm_manifest():
    from modules.config import instantiate, load_config

    cfg = load_config("configs/svd.yaml").model.params
    embedders = [e for e in cfg.conditioner_config.params.emb_models if "encoder_config" in e.get("params", {})]
    with no_init_parameters():
        first_stage = instantiate(cfg.first_stage_config)
        cond = instantiate(embedders[0].params.encoder_config)
    assert type(first_stage.decoder) is VideoDecoder
    assert _shapes(first_stage) == _manifest("sgm_svd.json", "first_stage_model.")
    excl = ("decoder.", "post_quant_conv.")
    assert _shapes(cond) == _manifest("sgm_svd.json", "conditioner.embedders.3.encoder.", exclude=excl)


def test_image_decoder_first_stage_matches_sgm_manifest():
    with no_init_parameters():
        model = AutoencoderKL(embed_dim=4, ddconfig=SVD_DDCONFIG, lossconfig={"target": "torch.nn.Identity"})
    ref = _manifest("sgm_svd_image_decoder.json", "first_stage_model.")
    assert len(ref) == 248
    assert _shapes(model) == ref


def test_cond_encoder_matches_sgm_manifest():
    with no_init_parameters():
        model = AutoencoderKLModeOnly(embed_dim=4, ddconfig=SVD_DDCONFIG, monitor="val/rec_loss")
    ref = _manifest("sgm_svd.json", "conditioner.embedders.3.encoder.", exclude=("decoder.", "post_quant_conv."))
    assert len(ref) == 108
    assert _shapes(model) == ref


def test_unknown_engine_kwargs_and_time_modes_are_rejected():
    with pytest.raises(TypeError):
        AutoencoderKLModeOnly(embed_dim=4, ddconfig=TINY_DDCONFIG, embed_dimm=4)
    with pytest.raises(NotImplementedError):
        VideoDecoder(**TINY_DDCONFIG, time_mode="attn-only")
    with pytest.raises(NotImplementedError):
        VideoDecoder(**TINY_DDCONFIG, video_kernel_size=3)  # sgm would build a 3x3x3 kernel


def test_first_stage_without_normalization_drops_the_spatial_groupnorms_only():
    plain = _svd_first_stage(dict(TINY_DDCONFIG, norm=False))
    with no_init_parameters():
        default = _svd_first_stage(TINY_DDCONFIG)
    norms = {k for k in _shapes(default) if ".norm" in k and ".time_stack." not in k}
    assert "decoder.norm_out.weight" in norms and "encoder.mid.block_1.norm1.bias" in norms
    assert "decoder.mid.attn_1.norm.weight" in norms
    assert set(_shapes(plain)) == set(_shapes(default)) - norms
    assert "decoder.up.0.block.0.time_stack.in_layers.0.weight" in _shapes(plain)  # temporal blocks keep theirs
    x = Tensor(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    assert plain.decode(plain.encode(x), timesteps=2).shape == (2, 3, 32, 32)


# ---------------------------------------------------------------- name maps on the real key layout


def _check_map(name_map: NameMap, source: dict, target: dict) -> None:
    used = {s for rule in name_map.rules for s in rule.sources}
    assert not used & set(name_map.dropped)
    assert used | set(name_map.dropped) == set(source), "every source key is used or dropped"
    targets = [rule.target for rule in name_map.rules]
    assert len(targets) == len(set(targets))
    assert set(targets) == set(target)
    for rule in name_map.rules:
        stand_ins = [np.broadcast_to(np.zeros((), np.float32), source[s]) for s in rule.sources]
        assert list(rule.apply(stand_ins).shape) == target[rule.target], rule.target


def test_first_stage_map_covers_diffusers_manifest():
    source = json.loads((MANIFESTS / "diffusers_vae_temporal.json").read_text())
    name_map = first_stage_from_diffusers(source)
    _check_map(name_map, source, _manifest("sgm_svd.json", "first_stage_model."))
    assert name_map.dropped == {}
    folded = {r.target: r.sources for r in name_map.rules}
    assert folded["encoder.conv_out.weight"] == ("encoder.conv_out.weight", "quant_conv.weight")
    assert folded["decoder.up.0.block.0.time_stack.in_layers.2.weight"] == (
        "decoder.up_blocks.3.resnets.0.temporal_res_block.conv1.weight",
    )


def test_cond_encoder_map_covers_diffusers_manifest():
    source = json.loads((MANIFESTS / "diffusers_vae_temporal.json").read_text())
    name_map = cond_encoder_from_diffusers(source)
    target = _manifest("sgm_svd.json", "conditioner.embedders.3.encoder.", exclude=("decoder.", "post_quant_conv."))
    _check_map(name_map, source, target)
    assert set(name_map.dropped) == {k for k in source if k.startswith("decoder.")}
    assert set(name_map.dropped.values()) == {"the conditioning encoder never decodes"}


def test_unknown_keys_are_left_unmapped():
    source = {"encoder.conv_in.weight": [128, 3, 3, 3], "decoder.some_new_layer.weight": [3], "extra.bias": [1]}
    name_map = first_stage_from_diffusers(source)
    accounted = {s for rule in name_map.rules for s in rule.sources} | set(name_map.dropped)
    assert accounted == {"encoder.conv_in.weight"}


# ---------------------------------------------------------------- parity with diffusers (tiny, random weights)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def _randomise(module, seed: int) -> None:
    """Every parameter random (zero-initialised convs, norms and mix factors included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else 4
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def _load(cell, name_map: NameMap, state: dict) -> None:
    params = dict(cell.parameters_and_names())
    targets = {rule.target for rule in name_map.rules}
    assert targets == set(params)
    for rule in name_map.rules:
        value = rule.apply([state[s] for s in rule.sources])
        assert value.shape == params[rule.target].shape, rule.target
        params[rule.target].set_data(Tensor(np.ascontiguousarray(value)))


def _state(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _rel_err(ours, ref) -> float:
    ours = ours.asnumpy() if isinstance(ours, Tensor) else ours
    ref = ref.detach().numpy() if hasattr(ref, "detach") else ref
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def temporal_vae():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=2,
        latent_channels=4,
    ).eval()
    _randomise(vae, seed=1)
    return vae


@pytest.fixture(scope="module")
def first_stage(temporal_vae):
    state = _state(temporal_vae)
    model = _svd_first_stage(TINY_DDCONFIG)
    model.set_train(False)
    _load(model, first_stage_from_diffusers({k: v.shape for k, v in state.items()}), state)
    return model


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 3, 16, 16)).astype(np.float32)


def test_encode_mode_matches_diffusers(temporal_vae, first_stage):
    x = _images(3, seed=2)
    with torch.no_grad():
        ref = temporal_vae.encode(torch.from_numpy(x)).latent_dist.mode()
    assert _rel_err(first_stage.encode(Tensor(x)), ref) <= 1e-4  # the mode by default

    state = _state(temporal_vae)
    cond = AutoencoderKLModeOnly(embed_dim=4, ddconfig=TINY_DDCONFIG)
    cond.set_train(False)
    _load(cond, cond_encoder_from_diffusers({k: v.shape for k, v in state.items()}), state)
    assert _rel_err(cond.encode(Tensor(x)), ref) <= 1e-4


def test_encode_sample_with_given_noise_matches_diffusers(temporal_vae, first_stage):
    x = _images(2, seed=3)
    noise = np.random.default_rng(4).standard_normal((2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        dist = temporal_vae.encode(torch.from_numpy(x)).latent_dist
        ref = dist.mean + dist.std * torch.from_numpy(noise)
    assert _rel_err(first_stage.encode(Tensor(x), noise=Tensor(noise)), ref) <= 1e-4  # noise given: a sample
    drawn = first_stage.encode(Tensor(x), sample=True).asnumpy()
    assert drawn.shape == (2, 4, 8, 8) and not np.allclose(drawn, dist.mean.numpy(), atol=1e-3)


def test_temporal_decode_matches_diffusers(temporal_vae, first_stage):
    clips, frames = 2, 3
    z = np.random.default_rng(5).standard_normal((clips * frames, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = temporal_vae.decode(torch.from_numpy(z), num_frames=frames).sample
    out = first_stage.decode(Tensor(z), timesteps=frames)
    assert out.shape == (6, 3, 16, 16)
    assert _rel_err(out, ref) <= 1e-4
    # The temporal layers really mix frames: decoding the clips as 6 single frames gives something else.
    assert _rel_err(first_stage.decode(Tensor(z), timesteps=1), ref) > 1e-2


def test_graph_mode_matches_pynative(first_stage):
    z = Tensor(np.random.default_rng(6).standard_normal((6, 4, 8, 8)).astype(np.float32))
    x = Tensor(_images(2, seed=10))
    cond = AutoencoderKLModeOnly(embed_dim=4, ddconfig=TINY_DDCONFIG)
    cond.set_train(False)
    eager_dec, eager_enc = first_stage.decoder(z, 3).asnumpy(), cond(x).asnumpy()
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph_dec, graph_enc = first_stage.decoder(z, 3).asnumpy(), cond(x).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert _rel_err(graph_dec, eager_dec) <= 1e-5
    assert _rel_err(graph_enc, eager_enc) <= 1e-5


def test_kl_autoencoder_matches_diffusers():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=2,
        latent_channels=4,
    ).eval()
    _randomise(vae, seed=7)
    state = _state(vae)
    model = AutoencoderKL(embed_dim=4, ddconfig=TINY_DDCONFIG)
    model.set_train(False)
    _load(model, first_stage_from_diffusers_kl({k: v.shape for k, v in state.items()}), state)

    x = _images(2, seed=8)
    z = np.random.default_rng(9).standard_normal((3, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref_mode = vae.encode(torch.from_numpy(x)).latent_dist.mode()
        ref_dec = vae.decode(torch.from_numpy(z)).sample
    assert _rel_err(model.encode(Tensor(x)), ref_mode) <= 1e-4
    assert _rel_err(model.decode(Tensor(z)), ref_dec) <= 1e-4
    assert isinstance(model.decoder, Decoder) and not isinstance(model.decoder, VideoDecoder)
