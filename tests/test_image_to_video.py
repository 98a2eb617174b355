"""image_to_video.py end to end on the tiny config, and every bad input the CLI must refuse cleanly."""

import json
import os
import subprocess
import sys

import mindspore as ms  # noqa: F401  (before decord)
import numpy as np
import pytest
from PIL import Image

from data.video_io import VideoReader
from image_to_video import main
from modules.build import build_engine
from modules.pipeline import SVDPipeline

TINY = "configs/tiny/svd_tiny.yaml"
FAST = ["--SVD.config", TINY, "--SVD.sampling_steps", "2"]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_generates_a_playable_mp4_with_sidecar(image, tmp_path):
    out = tmp_path / "out"
    code = main(["--image", image, "--output_dir", str(out), "--SVD.num_frames", "5", "--SVD.fps", "9", *FAST])
    assert code == 0
    video = out / "in_42.mp4"
    reader = VideoReader(str(video))
    assert len(reader) == 5 and reader.fps == pytest.approx(9.0)
    assert reader.get([0]).shape == (1, 64, 128, 3)
    side = json.loads((out / "in_42.json").read_text())
    assert side["seed"] == 42 and side["args"]["SVD"]["num_frames"] == 5 and side["num_frames"] == 5
    assert set(side["timings_s"]) == {"conditioning", "sampling", "decoding"}
    assert sorted(os.listdir(out)) == ["in_42.json", "in_42.mp4"]

    # the sidecar reproduces the video exactly
    again = tmp_path / "again"
    assert main(["--reproduce", str(out / "in_42.json"), "--output_dir", str(again)]) == 0
    a = VideoReader(str(video)).get(range(5))
    b = VideoReader(str(again / "in_42.mp4")).get(range(5))
    np.testing.assert_array_equal(a, b)


def test_gif_frames_and_several_videos(image, tmp_path):
    out = tmp_path / "out"
    args = ["--image", image, "--output_dir", str(out), "--SVD.num_frames", "3", *FAST]
    assert main(args + ["--output_format", "gif", "--SVD.num_videos", "2"]) == 0
    assert sorted(os.listdir(out)) == ["in_42.gif", "in_42.json", "in_43.gif", "in_43.json"]
    with Image.open(out / "in_42.gif") as g:
        assert g.n_frames == 3
    assert main(args + ["--output_format", "frames", "--seed", "7"]) == 0
    assert sorted(os.listdir(out / "in_7")) == ["000000.png", "000001.png", "000002.png"]


@pytest.fixture(scope="module")
def pipe():
    return SVDPipeline(build_engine(TINY), verbose=False)


def test_same_seed_same_frames_and_uneven_decode_chunks(pipe):
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    kwargs = dict(num_frames=5, num_inference_steps=2, seed=3, output_type="np")
    a = pipe(img, **kwargs).frames
    b = pipe(img, **kwargs).frames
    np.testing.assert_array_equal(a, b)
    for chunk in (1, 2, 3, 5):  # 2 and 3 do not divide 5: the last chunk is shorter
        c = pipe(img, decode_chunk_size=chunk, **kwargs).frames
        assert c.shape == (1, 5, 64, 64, 3)
    # the temporal decoder mixes the frames of a chunk, so chunking changes the result (a little)
    assert not np.array_equal(a, pipe(img, decode_chunk_size=2, **kwargs).frames)
    assert not np.array_equal(a, pipe(img, **{**kwargs, "seed": 4}).frames)


def test_o0_and_o2_both_run(image, tmp_path):
    img = np.asarray(Image.open(image))
    ref = SVDPipeline(build_engine(TINY), verbose=False)(img, num_frames=3, num_inference_steps=2, seed=1)
    o2 = SVDPipeline(build_engine(TINY), amp_level="O2", verbose=False)
    assert o2.engine.unet.input_blocks[0][0].weight.dtype == ms.float16
    out = o2(img, num_frames=3, num_inference_steps=2, seed=1)
    assert out.frames.shape == ref.frames.shape and out.frames.dtype == np.uint8
    assert main(["--image", image, "--output_dir", str(tmp_path), "--SVD.amp_level", "O2", *FAST]) == 0


def test_forward_chunking_and_crop_to_size(image, tmp_path):
    args = ["--image", image, "--output_dir", str(tmp_path), "--SVD.num_frames", "2", *FAST]
    assert main(args + ["--SVD.forward_chunk_size", "7", "--SVD.width", "64", "--SVD.height", "64"]) == 0
    assert VideoReader(str(tmp_path / "in_42.mp4")).get([0]).shape == (1, 64, 64, 3)


def test_model_offload_holds_one_part_and_changes_nothing(image, tmp_path):
    ms.set_context(mode=1)
    img = np.asarray(Image.open(image))[:, :64]
    kwargs = dict(num_frames=3, num_inference_steps=2, seed=5, output_type="np")
    pipe = SVDPipeline(build_engine(TINY), verbose=False)
    engine = pipe.engine
    shapes = {p.name: p.shape for p in engine.get_parameters()}
    big = {name for name, shape in shapes.items() if np.prod(shape) > 1}  # a freed weight is one float

    def held(cell):
        return {p.name for p in cell.get_parameters() if p.shape == shapes[p.name]} & big

    ref = pipe(img, **kwargs).frames

    folder = tmp_path / "offload"
    pipe.enable_model_offload(str(folder))
    assert not held(engine)  # right after enabling, every weight is in the folder only
    for _ in range(2):
        np.testing.assert_array_equal(pipe(img, **kwargs).frames, ref)
        assert held(engine) == held(engine.first_stage_model) != set()  # only the last stage's part
    assert {d.name for d in folder.iterdir()} == {"conditioner", "unet", "vae"}

    pipe.disable_model_offload()
    assert {p.name: p.shape for p in engine.get_parameters()} == shapes
    np.testing.assert_array_equal(pipe(img, **kwargs).frames, ref)
    # and from the command line
    assert main(["--image", image, "--output_dir", str(tmp_path / "cli"), "--SVD.model_offload", "true", *FAST]) == 0


def test_a_checkpoint_with_two_equal_image_encoders_builds_one(image, tmp_path):
    """The official checkpoints hold the VAE encoder twice (first stage, conditioning-frame embedder): an engine built
    from a checkpoint where the two are equal keeps one, and generates the same frames as with both, with and
    without model offload; a checkpoint whose two encoders differ keeps both."""
    from modules.engine import count_params

    ms.set_context(mode=1)
    img = np.asarray(Image.open(image))[:, :64]
    kwargs = dict(num_frames=3, num_inference_steps=2, seed=5, output_type="np")
    engine = build_engine(TINY)
    differing = tmp_path / "differing.ckpt"
    ms.save_checkpoint([{"name": p.name, "data": p} for p in engine.get_parameters()], str(differing))
    first = dict(engine.first_stage_model.encoder.parameters_and_names())
    embedder = next(e for e in engine.conditioner.embedders if hasattr(e, "encoder"))
    for name, p in embedder.encoder.encoder.parameters_and_names():
        p.set_data(first[name].value().copy())
    equal = tmp_path / "equal.ckpt"
    ms.save_checkpoint([{"name": p.name, "data": p} for p in engine.get_parameters()], str(equal))
    ref = SVDPipeline(engine, verbose=False)(img, **kwargs).frames

    shared = build_engine(TINY, checkpoint=str(equal))
    encoder = shared.first_stage_model.encoder
    assert next(e for e in shared.conditioner.embedders if hasattr(e, "encoder")).encoder.encoder is encoder
    assert count_params(shared) == count_params(engine) - count_params(encoder)
    assert not shared.image_encoder_copies() and not any(p.has_init for p in shared.get_parameters())
    names = {p.name for p in engine.get_parameters()}
    assert {p.name for p in shared.get_parameters()} == {n for n in names if ".encoder.encoder." not in n}
    pipe = SVDPipeline(shared, verbose=False)
    np.testing.assert_array_equal(pipe(img, **kwargs).frames, ref)
    pipe.enable_model_offload(str(tmp_path / "offload"))
    for _ in range(2):
        np.testing.assert_array_equal(pipe(img, **kwargs).frames, ref)

    both = build_engine(TINY, checkpoint=str(differing))
    assert count_params(both) == count_params(engine) and len(both.image_encoder_copies()) == 1


def test_offload_keeps_a_shared_weight_while_a_part_that_uses_it_is_resident(tmp_path):
    """Two parts holding one cell (as the conditioner and the VAE share the image encoder): releasing one part
    leaves the shared weights to the other while that one is in memory, and frees them once neither is."""
    from mindspore import nn

    from modules.offload import ModelOffload

    ms.set_context(mode=1)
    shared = nn.Dense(4, 3)
    a, b = nn.SequentialCell([shared, nn.Dense(3, 2)]), nn.SequentialCell([shared])
    weight = shared.weight.asnumpy().copy()
    offload = ModelOffload({"a": a, "b": b}, str(tmp_path), release=False)
    offload.use("a")  # releases b; a stays resident and keeps the shared weight
    np.testing.assert_array_equal(shared.weight.asnumpy(), weight)
    offload.release("a")
    assert shared.weight.shape == (1,)
    offload.use("b")
    np.testing.assert_array_equal(shared.weight.asnumpy(), weight)


def bad_inputs(tmp_path, image):
    """(name, extra argv, expected message part) for each bad input of the issue."""
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    small = tmp_path / "small.png"
    Image.new("RGB", (32, 40)).save(small)
    good_ckpt = tmp_path / "w.safetensors"
    from safetensors.numpy import save_file

    save_file({"model.diffusion_model.bogus.weight": np.zeros(2, np.float32)}, str(good_ckpt))
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(good_ckpt.read_bytes()[:-4])
    return [
        ("missing", ["--image", str(tmp_path / "nope.png")], "image not found"),
        ("not an image", ["--image", str(text)], "not a readable image"),
        ("too small", ["--image", str(small)], "at least 64x64"),
        ("wrong checkpoint", ["--image", image, "--SVD.checkpoint", str(good_ckpt)], "does not match the model"),
        ("truncated", ["--image", image, "--SVD.checkpoint", str(truncated)], "truncated"),
        ("no frames", ["--image", image, "--SVD.num_frames", "0"], "num_frames must be at least 1"),
        ("chunk 0", ["--image", image, "--SVD.decode_chunk_size", "0"], "decode_chunk_size must be between"),
        ("chunk > frames", ["--image", image, "--SVD.decode_chunk_size", "9"], "decode_chunk_size must be between"),
        ("offload in graph mode", ["--image", image, "--SVD.model_offload", "true", "--mode", "0"], "PyNative mode"),
    ]


def test_bad_inputs_fail_cleanly_and_write_nothing(tmp_path, image, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.mp4").write_bytes(b"x")
    for name, argv, message in bad_inputs(tmp_path, image):
        code = main(argv + ["--output_dir", str(out), *FAST])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0, name
        assert err and err[-1].startswith("error: ") and message in err[-1], (name, err[-3:])
        assert os.listdir(out) == ["earlier.mp4"], name
    # the wrong checkpoint names the first missing and unexpected keys
    _, argv, _ = bad_inputs(tmp_path, image)[3]
    main(argv + ["--output_dir", str(out), *FAST])
    err = capsys.readouterr().err
    assert "bogus" in err and "missing parameter" in err


def test_cli_exit_code_and_single_line_error(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "image_to_video.py", "--image", str(tmp_path / "nope.png"), "--output_dir", str(out), *FAST],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: image not found: {tmp_path / 'nope.png'}"
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not os.listdir(out)


def test_unusual_values_warn_and_proceed(image, tmp_path, caplog):
    args = ["--image", image, "--output_dir", str(tmp_path), "--SVD.num_frames", "2", *FAST]
    assert main(args + ["--SVD.fps", "40", "--SVD.motion_bucket_id", "300"]) == 0
    assert "fps 40 is outside 5-30" in caplog.text and "motion_bucket_id 300" in caplog.text
    assert (tmp_path / "in_42.mp4").is_file()
