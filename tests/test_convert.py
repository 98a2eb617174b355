"""The converter: official manifests account for every key, and real files round-trip exactly."""

import json
import os
import struct

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import save_file

from modules.build import build_engine
from modules.convert.load import SGM_DROPPED_PREFIXES, load_checkpoint, param_shapes
from modules.convert.sources import CheckpointError
from modules.engine import count_params
from svd_tools.convert import main as convert_main

MANIFESTS = os.path.join(os.path.dirname(__file__), "data", "manifests")
TINY = "configs/tiny/svd_tiny.yaml"


@pytest.mark.parametrize(
    "manifest, config",
    [
        ("sgm_svd.json", "configs/svd.yaml"),
        ("sgm_svd_xt.json", "configs/svd_xt.yaml"),
        ("sgm_svd_image_decoder.json", "configs/svd_image_decoder.yaml"),
        ("diffusers_unet_svd.json", "configs/svd.yaml"),
        ("diffusers_unet_svd_xt.json", "configs/svd_xt.yaml"),
        ("diffusers_vae_temporal.json", "configs/svd.yaml"),
        ("transformers_clip_vision_h14.json", "configs/svd.yaml"),
    ],
)
def test_dry_run_accounts_for_every_manifest_key(manifest, config, capsys):
    code = convert_main(["--config", config, "--dry_run", "true", "--manifest", os.path.join(MANIFESTS, manifest)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0, "\n".join(out[-20:])
    assert out[-1].endswith("0 problems") and len(out) == 1


def test_full_size_parameter_counts():
    engine = build_engine("configs/svd.yaml", lazy=True)
    assert count_params(engine.unet) == 1_524_623_082
    assert count_params(engine.first_stage_model) == 97_742_775
    visual = engine.conditioner.embedders[0].open_clip.model.visual
    assert count_params(visual) == 632_076_800
    with open(os.path.join(MANIFESTS, "sgm_svd.json")) as f:
        sgm = json.load(f)
    dropped = [k for k in sgm if any(k.startswith(p) for p in SGM_DROPPED_PREFIXES)]
    assert len(param_shapes(engine)) == len(sgm) - len(dropped)


def test_dry_run_reports_problems(tmp_path, capsys):
    with open(os.path.join(MANIFESTS, "transformers_clip_vision_h14.json")) as f:
        shapes = json.load(f)
    shapes["vision_model.extra.weight"] = [3]
    shapes["vision_model.post_layernorm.weight"] = [7]
    del shapes["vision_model.pre_layrnorm.bias"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(shapes))
    code = convert_main(["--config", "configs/svd.yaml", "--dry_run", "true", "--manifest", str(bad)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert any(line.startswith("unknown source key: image_encoder:vision_model.extra.weight") for line in out)
    assert any(line.startswith("shape mismatch:") and "ln_post.weight" in line for line in out)
    assert any(line.startswith("missing") and "pre_layrnorm.bias" in line for line in out)
    assert out[-1].endswith("3 problems")


def sgm_state(engine) -> dict[str, np.ndarray]:
    """The engine's weights under the official names, plus the extra keys the official file carries."""
    state = {p.name: p.asnumpy() for p in engine.get_parameters()}
    state["conditioner.embedders.0.open_clip.model.logit_scale"] = np.array(4.6, np.float32)
    state["conditioner.embedders.0.open_clip.model.token_embedding.weight"] = np.ones((10, 32), np.float32)
    state["conditioner.embedders.3.encoder.decoder.conv_in.weight"] = np.ones((8, 4, 3, 3), np.float32)
    return state


@pytest.fixture(scope="module")
def tiny_engine():
    ms.set_seed(1)
    return build_engine(TINY)


def test_sgm_safetensors_round_trip(tiny_engine, tmp_path, capsys):
    src = tmp_path / "svd_tiny.safetensors"
    save_file(sgm_state(tiny_engine), str(src))
    code = convert_main(["--pt_weights_file", str(src), "--config", TINY, "--out_dir", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr()
    out = tmp_path / "out" / "svd_tiny.ckpt"
    assert out.is_file() and not list((tmp_path / "out").glob("*partial*"))
    fresh = build_engine(TINY, checkpoint=str(out))
    for p, q in zip(tiny_engine.get_parameters(), fresh.get_parameters()):
        assert p.name == q.name
        np.testing.assert_array_equal(p.asnumpy(), q.asnumpy())
    # the official file can also be loaded directly, converted in memory
    direct = build_engine(TINY, checkpoint=str(src))
    first = next(iter(direct.get_parameters()))
    np.testing.assert_array_equal(first.asnumpy(), next(iter(tiny_engine.get_parameters())).asnumpy())


def test_torch_pickle_and_fp16(tiny_engine, tmp_path, capsys):
    import torch

    src = tmp_path / "svd_tiny.pt"
    torch.save({"state_dict": {k: torch.tensor(v) for k, v in sgm_state(tiny_engine).items()}}, src)
    code = convert_main(
        ["--pt_weights_file", str(src), "--config", TINY, "--out_dir", str(tmp_path), "--dtype", "fp16"]
    )
    assert code == 0, capsys.readouterr()
    params = ms.load_checkpoint(str(tmp_path / "svd_tiny.ckpt"))
    assert all(v.dtype == ms.float16 for v in params.values())
    name, p = next((p.name, p) for p in tiny_engine.get_parameters() if p.name.endswith("conv_in.weight"))
    np.testing.assert_allclose(params[name].asnumpy().astype(np.float32), p.asnumpy(), rtol=1e-3, atol=1e-3)


def test_unknown_and_wrong_shaped_keys_are_listed(tiny_engine, tmp_path, capsys):
    state = sgm_state(tiny_engine)
    state["model.diffusion_model.not_a_layer.weight"] = np.zeros(3, np.float32)
    key = "model.diffusion_model.out.2.weight"
    state[key] = np.zeros((1, 2, 3), np.float32)
    del state["first_stage_model.decoder.conv_in.bias"]
    src = tmp_path / "bad.safetensors"
    save_file(state, str(src))
    code = convert_main(["--pt_weights_file", str(src), "--config", TINY, "--out_dir", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 1
    assert "not_a_layer" in out and key in out and "first_stage_model.decoder.conv_in.bias" in out
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")
    with pytest.raises(CheckpointError, match="does not match the model config"):
        load_checkpoint(build_engine(TINY, lazy=True), str(src))


def test_truncated_files_are_clear_errors(tiny_engine, tmp_path):
    src = tmp_path / "t.safetensors"
    save_file({"a": np.zeros((100, 100), np.float32)}, str(src))
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        build_engine(TINY, checkpoint=str(src))
    ck = tmp_path / "t.ckpt"
    ms.save_checkpoint([{"name": "x", "data": ms.Tensor(np.zeros((300, 300), np.float32))}], str(ck))
    ck.write_bytes(ck.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        build_engine(TINY, checkpoint=str(ck))
    bad = tmp_path / "h.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(CheckpointError, match="header"):
        build_engine(TINY, checkpoint=str(bad))
