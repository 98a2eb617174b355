"""The committed toy-world weights (assets/toy/, made by svd_tools/train_toy.py) have learnt the toy world: on
first frames of clips that were never in the training set, generated videos keep the image, move the shapes as
whole blobs, and move them faster at higher motion_bucket_id."""

import os

import numpy as np
import pytest

from modules.env import init_env
from modules.pipeline import SVDPipeline
from svd_tools.make_toy_dataset import HELDOUT_SEED
from svd_tools.toy_eval import blobs, evaluate
from svd_tools.toy_world import render_clip

CONFIG = "configs/toy/svd_toy.yaml"
WEIGHTS = "assets/toy/svd_toy.ckpt"
BUCKETS = [10, 120, 230]
FPS = 8  # the toy clips' frame rate (svd_tools/make_toy_dataset.py), so fps_id is the one trained on

pytestmark = pytest.mark.skipif(
    not os.path.isfile(WEIGHTS), reason=f"{WEIGHTS} is not trained yet (python svd_tools/train_toy.py makes it)"
)


def unseen_images(n: int) -> list[np.ndarray]:
    """First frames of clips that were never trained on (seeds far from the training ones, 0..videos-1, and from
    the shipped held-out images) with a single shape, so that the right video keeps exactly one blob in every
    frame (two shapes may truly meet)."""
    images, seed = [], HELDOUT_SEED + 100
    while len(images) < n:
        frame = render_clip(seed, 1, 64)[0][0]
        if blobs(frame)[0] == 1:
            images.append(frame)
        seed += 1
    return images


@pytest.fixture(scope="module")
def report():
    init_env(mode=0, seed=0)  # graph mode: a toy video in about 3 s after the first compiles (conftest restores it)
    pipe = SVDPipeline.from_config(CONFIG, WEIGHTS, verbose=False)
    return evaluate(pipe, unseen_images(3), BUCKETS, seeds=[0, 1], fps=FPS)


# The committed run does not meet these two yet (issue #6 stays open): at bucket 230 (2-3 px a frame) the shapes
# break up and reappear, and one of those videos has its first frame at 19.2 dB. strict: a pass fails the suite, so
# the markers go as soon as better weights are committed.
NOT_YET = pytest.mark.xfail(strict=True, reason="the committed toy weights break shapes up at bucket 230")


@NOT_YET
def test_first_frame_keeps_the_conditioning_image(report):
    assert report["min_first_frame_psnr"] >= 20.0


@NOT_YET
def test_shapes_stay_whole_blobs_of_about_the_same_area(report):
    assert report["blobs_kept"], [(r["blobs_expected"], r["blobs_per_frame"]) for r in report["videos"]]
    lo, hi = report["area_ratio_range"]
    assert 0.6 <= lo and hi <= 1.5, report["area_ratio_range"]


def test_motion_grows_with_the_motion_bucket(report):
    flow = report["flow_by_bucket"]
    assert report["flow_increases"], flow
    assert flow[BUCKETS[-1]] > 1.5 * flow[BUCKETS[0]], flow  # a clear difference, not noise
    assert np.isfinite(list(flow.values())).all()
