"""The committed toy-world weights (assets/toy/, made by svd_tools/train_toy.py) have learnt the toy world: on
first frames of clips that were never in the training set, generated videos keep the image, move the shapes as
whole blobs, and move them faster at higher motion_bucket_id."""

import os

import numpy as np
import pytest

from modules.env import init_env
from modules.pipeline import SVDPipeline
from svd_tools.make_toy_dataset import HELDOUT_SEED
from svd_tools.toy_eval import evaluate
from svd_tools.toy_world import DIRECTIONS, render_clip, scene

CONFIG = "configs/toy/svd_toy.yaml"
WEIGHTS = "assets/toy/svd_toy.ckpt"
BUCKETS = [10, 120, 230]
FPS = 8  # the toy clips' frame rate (svd_tools/make_toy_dataset.py), so fps_id is the one trained on

pytestmark = pytest.mark.skipif(
    not os.path.isfile(WEIGHTS), reason=f"{WEIGHTS} is not trained yet (python svd_tools/train_toy.py makes it)"
)


def unseen_seeds(per_kind: int = 2) -> list[int]:
    """The first `per_kind` discs and squares from HELDOUT_SEED + 100 on: far from the training seeds (0..videos-1)
    and the shipped images."""
    seeds, seed = [], HELDOUT_SEED + 100
    while len(seeds) < 2 * per_kind:
        kind = scene(seed, 64)[1][0].kind
        if sum(scene(s, 64)[1][0].kind == kind for s in seeds) < per_kind:
            seeds.append(seed)
        seed += 1
    return seeds


UNSEEN = unseen_seeds()


def unseen_images() -> list[np.ndarray]:
    """First frames of clips that were never trained on."""
    return [render_clip(seed, 1, 64)[0][0] for seed in UNSEEN]


@pytest.fixture(scope="module")
def report():
    init_env(mode=0, seed=0)  # graph mode: a toy video in about 3 s after the first compiles (conftest restores it)
    pipe = SVDPipeline.from_config(CONFIG, WEIGHTS, verbose=False)
    return evaluate(pipe, unseen_images(), BUCKETS, seeds=[0, 1], fps=FPS)


def test_first_frame_keeps_the_conditioning_image(report):
    assert report["min_first_frame_psnr"] >= 20.0


def test_shapes_stay_whole_blobs_of_about_the_same_area(report):
    assert report["blobs_kept"], [(r["blobs_expected"], r["blobs_per_frame"]) for r in report["videos"]]
    lo, hi = report["area_ratio_range"]
    assert 0.6 <= lo and hi <= 1.5, report["area_ratio_range"]


def test_motion_grows_with_the_motion_bucket(report):
    flow = report["flow_by_bucket"]
    assert report["flow_increases"], flow
    assert flow[BUCKETS[-1]] > 1.5 * flow[BUCKETS[0]], flow  # a clear difference, not noise
    assert np.isfinite(list(flow.values())).all()


def test_shapes_move_further_at_higher_buckets(report):
    shift = report["shape_shift_by_bucket"]  # pixels from the first frame to the last, mean over images and seeds
    assert shift[BUCKETS[0]] < shift[BUCKETS[1]] < shift[BUCKETS[2]], shift
    assert shift[BUCKETS[-1]] > 2 * shift[BUCKETS[0]], shift


def test_shapes_move_the_worlds_way(report):
    """At the highest bucket every shape moves mostly along its kind's direction (discs right, squares down)."""
    for r in report["videos"]:
        if r["bucket"] == BUCKETS[-1]:
            direction = np.array(DIRECTIONS[scene(UNSEEN[r["image"]], 64)[1][0].kind])
            along = float(np.dot(r["shift"], direction))
            across = float(np.dot(r["shift"], direction[::-1]))
            assert along > 3 * abs(across) and along > 2, (r["image"], r["seed"], r["shift"])
