"""The shipped bundled model: it loads, it is deterministic, its codec keeps the detector exact enough, and
NASA removes the negative object where no guidance does not."""
import time
from pathlib import Path

import numpy as np
import pytest

from nasa_video.cli import main
from nasa_video.toy.removal import benchmark_rows, run_removal
from nasa_video.toy.train import codec_agreement
from nasa_video.video_io import read_video


WEIGHTS = Path(__file__).parents[1] / "nasa_video" / "toy" / "weights" / "generator.safetensors"
pytestmark = pytest.mark.skipif(not WEIGHTS.exists(), reason="the bundled toy weights are not trained yet "
                                "(issue 3: `nasa-video train toy --out nasa_video/toy/weights`)")


@pytest.fixture(scope="module")
def toy(make_generator):
    return make_generator("toy")


def test_detector_agrees_with_ground_truth_on_codec_reconstructions(toy):
    assert codec_agreement(toy.vae, np.random.default_rng(99), 30, clip_frames(toy)) >= 0.99


def test_deterministic_for_a_seed(toy):
    a = [c.frames for c in toy.stream("a red circle and a blue square", "red circle", seed=5)]
    b = [c.frames for c in toy.stream("a red circle and a blue square", "red circle", seed=5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
def test_the_model_draws_what_it_is_told_and_nasa_removes_only_the_negative(toy):
    """The benchmark's object rows (8 held-out, 4 trained compositions x 2 seeds; the full benchmark: README /
    MODEL_CARD), judged against the exact render: with no guidance every named object is kept in every frame
    (>= 90%) and the negative never removed; with NASA at the shipped alpha the joint figure over all 24 (every other object
    kept in place, no trace of the negative, nothing unprompted, clean) is >= 90%, at most one video in eight draws something unprompted, and the kept objects are no
    further from their render than without guidance by more than 2 grey levels."""
    rows = [r for r in benchmark_rows() if r.kind == "object"]
    scale = float(toy.cfg.guidance.scale)
    result = run_removal(toy, [("none", 0.0), ("nasa", scale)], rows, seeds=(0, 1), progress=False)["kinds"]
    label = f"nasa@{scale:g}"
    pooled = {"joint_success": 0.0, "unprompted": 0.0, "videos": 0}
    for split in ("held-out", "in-distribution"):
        none, nasa = result["none"][split]["object"], result[label][split]["object"]
        print(f"\n{split}: none {none}\nnasa {nasa}")
        assert none["success"] <= 0.05 and none["retention"] >= 0.90, (split, none)
        assert nasa["kept_error"] <= none["kept_error"] + 2, (split, none, nasa)
        for key in ("joint_success", "unprompted"):
            pooled[key] += nasa[key] * nasa["videos"]
        pooled["videos"] += nasa["videos"]
    # pooled over the 24 videos (8 of them trained: one miss there alone is 12%); unprompted is part of joint,
    # its own bar (one video in eight) says the failures are not all strays
    joint, unprompted = pooled["joint_success"] / pooled["videos"], pooled["unprompted"] / pooled["videos"]
    assert joint >= 0.90 and unprompted <= 0.125, (joint, unprompted, result[label])


def clip_frames(gen):
    from nasa_video.pipeline import pixel_frames
    return pixel_frames(int(gen.cfg.video.latent_frames), gen.temporal_stride)


def test_default_cli_run_is_fast_and_writes_the_clip(tmp_path, capsys, toy):
    out = tmp_path / "x.mp4"
    started = time.perf_counter()
    assert main(["generate", "--model", "toy", "--prompt", "a red circle and a blue square", "--negative", "red circle",
                 "--out", str(out), "--quiet"]) == 0
    assert time.perf_counter() - started < 30
    frames = read_video(out)
    assert frames.shape == (clip_frames(toy), 128, 192, 3)  # 48x32 frames shown 4x larger


def test_a_negative_sent_mid_stream_takes_a_drawn_object_out_of_the_next_block(toy):
    """The cached frames hold the red circle; from the block after set_negative it is gone at alpha 2 (at alpha 1
    it only shrinks: MODEL_CARD.md), and the blue square stays."""
    from nasa_video.toy.detect import regions

    stream = toy.stream("a red circle and a blue square", seed=0)
    blocks = iter(stream)
    first = next(blocks).frames
    stream.set_negative("red circle", 2.0)
    later = np.concatenate([c.frames for c in blocks])
    colours = lambda frames: [{r.color for r in f if r.shape} for f in regions(frames)]  # noqa: E731
    assert all({"red", "blue"} <= seen for seen in colours(first))
    assert all(seen == {"blue"} for seen in colours(later))
