"""Evaluation runs: sharding, resume after an interruption, manifest, CLIP+/CLIP- and the zero-shot judge
(with a tiny random CLIP written by the test, through the real loading and scoring code)."""
import json
import os
import string

import numpy as np
import pytest

from nasa_video.errors import UserError
from nasa_video.eval.jobs import finished, plan, read_prompts, run_jobs, shard, video_stem, write_manifest
from nasa_video.eval.removal import judge_removal, plan_removal
from nasa_video.video_io import read_video

PROMPTS = ["a red circle", "a blue square: at night?", "x" * 400]
METHODS = [("none", 0.0), ("nasa", 0.5)]


def make_tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,'-!?")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
               "pad_token_id": vocab["<|endoftext|>"]}
    config = CLIPConfig(text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, **special},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_two_ranks_cover_every_job_exactly_once():
    jobs = plan(PROMPTS, METHODS, samples=3, negative="blurry")
    assert len(jobs) == 2 * 3 * 3
    parts = [shard(jobs, r, 2) for r in range(2)]
    assert sorted(map(repr, parts[0] + parts[1])) == sorted(map(repr, jobs))
    assert not set(parts[0]) & set(parts[1])
    # every method starts from the same noise for the same prompt and sample
    seeds = {(j.prompt, j.sample): set() for j in jobs}
    for j in jobs:
        seeds[(j.prompt, j.sample)].add(j.seed)
    assert all(len(s) == 1 for s in seeds.values())
    with pytest.raises(UserError):
        shard(jobs, 2, 2)


def test_file_names_are_vbench_style_and_safe():
    assert video_stem("a red circle") == "a red circle"
    assert "/" not in video_stem("a/b") and "?" not in video_stem("why?")
    long_a, long_b = video_stem("x" * 400), video_stem("x" * 399 + "y")
    assert long_a != long_b and len(long_a.encode()) <= 180


@pytest.mark.slow
def test_interrupted_run_resumes_with_exactly_the_missing_videos(tiny_generator, tmp_path):
    jobs = plan(PROMPTS[:2], METHODS, samples=2, negative="blurry")
    write_manifest(tmp_path / "a", jobs, {"model": "tiny"})

    made = []

    def stop_after_three(job):
        made.append(job)
        if len(made) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_jobs(tiny_generator, jobs, tmp_path / "a", progress=False, on_done=stop_after_three)
    assert sum(finished(j, tmp_path / "a") for j in jobs) == 3
    again = run_jobs(tiny_generator, jobs, tmp_path / "a", progress=False)
    assert again == {"planned": 8, "skipped": 3, "made": 5}
    assert run_jobs(tiny_generator, jobs, tmp_path / "a", progress=False)["made"] == 0
    run_jobs(tiny_generator, jobs, tmp_path / "b", progress=False)  # uninterrupted
    for job in jobs:
        np.testing.assert_array_equal(read_video(job.path(tmp_path / "a")), read_video(job.path(tmp_path / "b")))
    # a different plan in the same folder is refused rather than mixed in
    with pytest.raises(UserError, match="different evaluation"):
        write_manifest(tmp_path / "a", plan(PROMPTS[:1], METHODS, 2, "blurry"), {"model": "tiny"})


def test_a_partial_video_from_an_interrupt_is_not_kept(tiny_generator, tmp_path, monkeypatch):
    from nasa_video.pipeline import GenerationResult

    jobs = plan(PROMPTS[:1], METHODS[:1], samples=1, negative="")

    def interrupted(prompt, out, *args, **kwargs):
        open(out, "wb").write(b"partial")
        return GenerationResult(str(out), 5, 1, 0.1, 0.1, interrupted=True)

    monkeypatch.setattr(tiny_generator, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_jobs(tiny_generator, jobs, tmp_path, progress=False)
    assert not jobs[0].path(tmp_path).exists()


def test_read_prompts_text_and_vbench_json(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na cat\n\na dog\na cat\n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.json").write_text(json.dumps([{"prompt_en": "a fox", "dimension": ["aesthetic_quality"]}]))
    assert read_prompts(tmp_path / "p.json") == ["a fox"]
    with pytest.raises(UserError, match="not found"):
        read_prompts(tmp_path / "none.txt")


def test_missing_clip_weights_name_the_file_and_the_place(tmp_path):
    from nasa_video.eval.clip import ClipScorer

    with pytest.raises(UserError, match=r"config\.json.*model\.safetensors.*--clip"):
        ClipScorer(tmp_path / "empty")


def reference_clip(scorer, frames, texts):
    """Cosine similarities and logit scale computed straight from the CLIP model (not through ClipScorer)."""
    import torch

    pixels = scorer.processor(images=list(frames), return_tensors="pt")["pixel_values"]
    tokens = scorer.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    # CLIPModel's own forward: logits_per_image = logit_scale * cos(image, text)
    scale = float(scorer.model.logit_scale.detach().exp())
    return out.logits_per_image.double().numpy() / scale, out.logits_per_image.double()


def test_clip_scores_and_judge_end_to_end(tiny_generator, tmp_path):
    from nasa_video.eval.clip import ClipScorer, calibrate
    from nasa_video.eval.removal import negative_removed, subject_present

    scorer = ClipScorer(make_tiny_clip(tmp_path / "clip"))
    pairs = [("a photo of a pet", "cat", "dog"), ("a photo of a person", "old", "young")]
    contrast = {(pos, neg): c for pos, neg, c in pairs}
    subject = {"a photo of a pet": "a pet", "a photo of a person": "a person"}  # the prompt less "a photo of"
    jobs = plan_removal(pairs, METHODS, samples=1)
    assert len({j.path(tmp_path) for j in jobs}) == len(jobs)
    run_jobs(tiny_generator, jobs, tmp_path / "r", progress=False)
    result = judge_removal(scorer, jobs, pairs, tmp_path / "r", progress=False)
    # every number of the judge recomputed from CLIPModel's forward (cosine x 100, zero-shot softmax)
    expected = {}
    for job in jobs:
        frames = read_video(job.path(tmp_path / "r"))
        cos, _ = reference_clip(scorer, frames, [job.prompt, job.negative])
        _, logits = reference_clip(scorer, frames, [f"a photo of {job.negative}",
                                                    f"a photo of {contrast[(job.prompt, job.negative)]}"])
        p = logits.softmax(-1)[:, 0].numpy()
        np.testing.assert_allclose(scorer.negative_probability(frames, job.negative, contrast[(job.prompt, job.negative)]),
                                   p, rtol=1e-5, atol=1e-6)
        _, logits = reference_clip(scorer, frames, [f"a photo of {subject[job.prompt]}", "a photo of an empty scene"])
        q = logits.softmax(-1)[:, 0].numpy()
        np.testing.assert_allclose(scorer.subject_probability(frames, subject[job.prompt]), q, rtol=1e-5, atol=1e-6)
        row = expected.setdefault(job.label, {"clip_plus": [], "clip_minus": [], "removed": [], "subject_present": [],
                                              "success": [], "per_pair": {}})
        row["clip_plus"].append(100 * cos[:, 0].mean())
        row["clip_minus"].append(100 * cos[:, 1].mean())
        row["removed"].append(float((p > 0.5).mean() <= 0.1))
        row["subject_present"].append(float((q <= 0.5).mean() <= 0.1))
        row["success"].append(row["removed"][-1] * row["subject_present"][-1])  # both, since issue 14
        row["per_pair"][f"{job.prompt} / -{job.negative}"] = row["success"][-1]
    assert set(result["methods"]) == set(expected) and len(expected) == 2
    for label, row in result["methods"].items():
        want = expected[label]
        assert row["videos"] == 2
        assert row["clip_plus"] == pytest.approx(np.mean(want["clip_plus"]), rel=1e-5, abs=1e-4)
        assert row["clip_minus"] == pytest.approx(np.mean(want["clip_minus"]), rel=1e-5, abs=1e-4)
        assert row["clip_plus"] != pytest.approx(row["clip_minus"])  # the two prompts are told apart
        for key in ("success", "removed", "subject_present"):
            assert row[key] == np.mean(want[key]), key
        assert row["per_pair"] == want["per_pair"]
        assert set(row["per_pair"]) == {"a photo of a pet / -cat", "a photo of a person / -old"}
    frames = read_video(jobs[0].path(tmp_path / "r"))
    p = scorer.negative_probability(frames, "cat", "dog")
    assert p.shape == (len(frames),) and ((0 <= p) & (p <= 1)).all()
    # a two-way softmax: swapping the concepts gives the complement, frame by frame
    np.testing.assert_allclose(scorer.negative_probability(frames, "dog", "cat"), 1 - p, rtol=1e-5, atol=1e-6)
    assert p.std() > 0 or len(frames) == 1  # frames are scored one by one, not one score broadcast
    # one pass of the image encoder gives what the separate calls give
    both = scorer.video_scores(frames, "a photo of a pet", "cat", "dog", "a pet")
    np.testing.assert_allclose(both["negative"], p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both["subject"], scorer.subject_probability(frames, "a pet"), rtol=1e-5, atol=1e-6)
    assert both["clip_plus"] == pytest.approx(scorer.clip_plus_minus(frames, "a photo of a pet", "cat")["clip_plus"])
    # the rules: removed when at most 10% of the frames show the negative, present when at most 10% lack the subject
    assert negative_removed(np.array([0.9] + [0.1] * 9)) and not negative_removed(np.array([0.9] * 2 + [0.1] * 8))
    assert subject_present(np.array([0.1] + [0.9] * 9)) and not subject_present(np.array([0.1] * 2 + [0.9] * 8))
    cal = calibrate(np.array([0.1, 0.2, 0.7, 0.9]), np.array([False, False, True, True]))
    assert cal["agreement"] == 1.0 and 0.2 <= cal["threshold"] < 0.7
    # the judge's aggregation on scores known in advance
    known = judge_removal(KnownScorer(), jobs, pairs, tmp_path / "r", progress=False)
    assert set(known["methods"]) == set(expected)
    for label, row in known["methods"].items():
        brightness = np.mean([read_video(j.path(tmp_path / "r")).mean() for j in jobs if j.label == label])
        assert row["videos"] == 2 and row["success"] == 0.5
        assert row["removed"] == 0.5 and row["subject_present"] == 1.0
        assert row["per_pair"] == {"a photo of a pet / -cat": 0.0, "a photo of a person / -old": 1.0}
        assert row["clip_plus"] == pytest.approx(brightness) and row["clip_minus"] == pytest.approx(-brightness)


class KnownScorer:
    """A judge whose scores are known: every frame shows 'cat' (p = 1) and nothing else (p = 0), and always the
    subject; CLIP+ is the frames' mean brightness and CLIP- its negative."""

    folder = "known"

    def video_scores(self, frames, positive, negative, contrast, subject):
        return {"negative": np.full(len(frames), 1.0 if negative == "cat" else 0.0),
                "subject": np.ones(len(frames)),
                "clip_plus": float(frames.mean()), "clip_minus": -float(frames.mean())}


# A CLIP whose judgements are known: each text names one concept (an axis), a frame's colour says what it shows.
AXES = {"cat": 0, "dog": 1, "a pet": 2, "an empty scene": 3}
SHOWS = {"cat": {"cat": 1.0, "a pet": 1.0},  # a pet, and it is the negative
         "dog": {"dog": 1.0, "a pet": 1.0},  # a pet without the negative
         "empty": {"an empty scene": 1.0, "dog": 0.3}}  # no pet at all, and nothing cat-like either
COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "empty": (0, 0, 255)}


def controlled_clip(monkeypatch, folder):
    """The tiny CLIP with its two encoders replaced by those unit vectors; the zero-shot softmax (with the
    model's logit scale), the thresholds and the judge's rules run unchanged."""
    import torch

    from nasa_video.eval.clip import ClipScorer

    def unit(weights):
        v = torch.zeros(len(AXES))
        for concept, w in weights.items():
            v[AXES[concept]] = w
        return v / v.norm()

    def images(self, frames, batch=32):
        kinds = list(COLOURS)  # red, green, blue: the frame's brightest channel (the codec shifts exact values)
        return torch.stack([unit(SHOWS[kinds[int(np.argmax(f.reshape(-1, 3).mean(0)))]]) for f in frames])

    def texts(self, texts):  # an unexpected text is a KeyError, not a silent zero vector
        return torch.stack([unit({t.removeprefix("a photo of "): 1.0}) for t in texts])

    monkeypatch.setattr(ClipScorer, "image_embeddings", images)
    monkeypatch.setattr(ClipScorer, "text_embeddings", texts)
    return ClipScorer(make_tiny_clip(folder))


# (frames of each kind, success, negative removed, subject present) of the videos the judge sees
SUBJECT_CASES = [
    (["dog"] * 10, True, True, True),
    (["empty"] * 10, False, True, False),  # no cat, but no pet either: not a removal
    (["cat"] * 10, False, False, True),
    (["dog"] * 9 + ["empty"], True, True, True),  # the subject may miss 10% of the frames, as the negative may show
    (["dog"] * 8 + ["empty"] * 2, False, True, False),
]


def write_colour_videos(jobs, out):
    from nasa_video.video_io import write_mp4

    for job, (kinds, *_) in zip(jobs, SUBJECT_CASES):
        job.path(out).parent.mkdir(parents=True, exist_ok=True)
        write_mp4(job.path(out), np.stack([np.full((32, 32, 3), COLOURS[k], np.uint8) for k in kinds]))
        job.path(out).with_suffix(".json").write_text("{}")


def test_a_video_without_the_subject_is_not_a_removal(tmp_path, monkeypatch):
    """Issue 14: frames that lack the prompt's subject show no negative either; success must need the subject."""
    scorer = controlled_clip(monkeypatch, tmp_path / "clip")
    pairs = [("a photo of a pet", "cat", "dog")]
    jobs = plan_removal(pairs, [("none", 0.0)], samples=len(SUBJECT_CASES))
    write_colour_videos(jobs, tmp_path / "r")
    empty, dog = (np.full((1, 32, 32, 3), COLOURS[k], np.uint8) for k in ("empty", "dog"))
    assert scorer.negative_probability(empty, "cat", "dog")[0] < 0.05  # the negative is clearly absent ...
    assert scorer.subject_probability(empty, "a pet")[0] < 0.05  # ... and so is the subject
    assert scorer.subject_probability(dog, "a pet")[0] > 0.95

    result = judge_removal(scorer, jobs, pairs, tmp_path / "r", progress=False)
    row = result["methods"]["none"]
    for video, (kinds, success, removed, present) in zip(row["per_video"], SUBJECT_CASES):
        assert (video["success"], video["removed"], video["subject_present"]) == (success, removed, present), kinds
        assert video["subject"] == "a pet" and video["subject_frames"] == 1 - kinds.count("empty") / len(kinds)
    assert row["videos"] == 5 and row["success"] == 2 / 5
    assert row["removed"] == 4 / 5 and row["subject_present"] == 3 / 5
    assert row["per_pair"] == {"a photo of a pet / -cat": 2 / 5}
    assert result["judge"]["subject_threshold"] == 0.5


def test_the_cli_takes_and_calibrates_the_subject_threshold(tmp_path, monkeypatch, capsys):
    """`eval removal --subject-threshold` reaches the judge (a finished run is judged without loading a model)
    and `eval calibrate --subject` finds a threshold that tells frames with the subject from frames without."""
    from PIL import Image

    from nasa_video.cli import main

    controlled_clip(monkeypatch, tmp_path / "clip")
    pairs = [("a photo of a pet", "cat", "dog", "a pet")]
    monkeypatch.setattr("nasa_video.eval.removal.REMOVAL_PAIRS", pairs)
    write_colour_videos(plan_removal(pairs, [("none", 0.0)], samples=len(SUBJECT_CASES)), tmp_path / "r")
    args = ["eval", "removal", "--model", "causvid", "--out", str(tmp_path / "r"), "--clip", str(tmp_path / "clip"),
            "--methods", "none", "--samples", str(len(SUBJECT_CASES)), "--json"]
    assert main(args + [str(tmp_path / "a.json")]) == 0
    assert "removal success 40.0% (removed 80.0%, subject present 60.0%)" in capsys.readouterr().out
    # a subject threshold no frame passes: nothing is present, so nothing succeeds; removal alone is unchanged
    assert main(args + [str(tmp_path / "b.json"), "--subject-threshold", "1"]) == 0
    row = json.loads((tmp_path / "b.json").read_text())["methods"]["none"]
    assert (row["success"], row["removed"], row["subject_present"]) == (0.0, 0.8, 0.0)
    assert main(args + [str(tmp_path / "c.json"), "--subject-threshold", "1.5"]) == 2
    assert "1.5 is not a probability" in capsys.readouterr().err

    labels = []
    for i, kind in enumerate(["dog", "empty", "cat", "empty"]):
        Image.fromarray(np.full((32, 32, 3), COLOURS[kind], np.uint8)).save(tmp_path / f"{i}.png")
        labels.append({"image": str(tmp_path / f"{i}.png"), "subject": "a pet", "present": kind != "empty"})
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    calibrate = ["eval", "calibrate", "--labels", str(tmp_path / "labels.json"), "--clip", str(tmp_path / "clip")]
    assert main(calibrate + ["--subject"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["option"] == "--subject-threshold" and found["agreement"] == 1.0 and found["frames"] == 4
    # subject labels read as negative labels are refused in one line, naming what is missing
    assert main(calibrate) == 2
    assert "item 0 lacks one of image, negative, contrast, shows" in capsys.readouterr().err


def test_metrics_share_one_interface_and_the_cli_writes_what_they_score(tiny_generator, tmp_path, capsys):
    """CLIP+ / CLIP-, the removal judge and VBench-Long are Metrics (score(run folder) -> dict); `eval clip` and
    `eval calibrate` on a run made here, with the tiny random CLIP."""
    from PIL import Image

    from nasa_video.cli import main
    from nasa_video.eval.clip import ClipMetric, ClipScorer
    from nasa_video.eval.metric import Metric
    from nasa_video.eval.removal import RemovalJudge
    from nasa_video.eval.vbench import VBenchLong

    scorer = ClipScorer(make_tiny_clip(tmp_path / "clip"))
    pairs = [("a photo of a pet", "cat", "dog")]
    jobs = plan_removal(pairs, METHODS, samples=1)
    run_jobs(tiny_generator, jobs, tmp_path / "r", progress=False)
    judge, clip = RemovalJudge(scorer, jobs, pairs, progress=False), ClipMetric(scorer)
    assert all(isinstance(m, Metric) for m in (judge, clip, VBenchLong(["aesthetic_quality"])))
    assert judge.score(tmp_path / "r") == judge_removal(scorer, jobs, pairs, tmp_path / "r", progress=False)
    scores = clip.score(tmp_path / "r")
    assert set(scores["methods"]) == {"none", "nasa@0.5"} and all(r["videos"] == 1 for r in scores["methods"].values())

    assert main(["eval", "clip", "--out", str(tmp_path / "r"), "--clip", str(tmp_path / "clip"),
                 "--json", str(tmp_path / "clip.json")]) == 0
    assert json.loads((tmp_path / "clip.json").read_text())["methods"] == scores["methods"]
    assert "nasa@0.5: CLIP+" in capsys.readouterr().out
    frames = read_video(jobs[0].path(tmp_path / "r"))
    labels = []
    for i, shows in enumerate([True, False, True, False]):
        Image.fromarray(frames[i]).save(tmp_path / f"{i}.png")
        labels.append({"image": str(tmp_path / f"{i}.png"), "negative": "cat", "contrast": "dog", "shows": shows})
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    assert main(["eval", "calibrate", "--labels", str(tmp_path / "labels.json"), "--clip", str(tmp_path / "clip")]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 4
    assert main(["eval", "clip", "--out", str(tmp_path / "empty"), "--clip", str(tmp_path / "clip"),
                 "--json", str(tmp_path / "x.json")]) == 2
    assert "no finished videos" in capsys.readouterr().err


FAKE_VBENCH = r'''#!/usr/bin/env bash
# stands in for the vbench environment's python running vbench_runner.py: one score per method folder
while [ $# -gt 0 ]; do case "$1" in --videos) videos="$2"; shift;; --out) out="$2"; shift;; esac; shift; done
n=$(ls "$videos"/*.mp4 | wc -l)
echo "{\"scores\": {\"aesthetic_quality\": 0.$n, \"imaging_quality\": 0.5}}" > "$out"
'''


def test_vbench_long_flow_generates_scores_and_tabulates(tmp_path, capsys):
    """The whole command on the bundled-size tiny model with a stand-in vbench environment (the real one is
    checked by scripts/vbench_check.sh: it needs the vbench install and its weights)."""
    from nasa_video.cli import main

    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text(FAKE_VBENCH)
    (env / "bin" / "python").chmod(0o755)
    (env / ".nasa-video-vbench").write_text("fake")
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    args = ["eval", "vbench-long", "--model", "tiny", "--prompts", str(tmp_path / "p.txt"), "--methods", "none",
            "nasa", "--scales", "0.5", "--samples", "2", "--out", str(tmp_path / "run"), "--vbench-env", str(env),
            "--score-device", "cpu", "--device", "cpu", "--negative", "blurry"]
    assert main(args) == 0
    table = (tmp_path / "run" / "vbench_long.md").read_text()
    assert "| none | 40.00 | 50.00 |" in table and "| nasa@0.5 | 40.00 | 50.00 |" in table
    assert "| CausVid + NASA (paper) | 63.33 | 67.36 |" in table
    result = json.loads((tmp_path / "run" / "vbench_long.json").read_text())
    assert set(result["methods"]) == {"none", "nasa@0.5"}
    assert len(list((tmp_path / "run" / "videos").glob("*/*.mp4"))) == 8


@pytest.mark.skipif(not os.environ.get("NASA_VIDEO_VBENCH_ENV"),
                    reason="needs the vbench environment (several GB; not built in CI): run scripts/vbench_check.sh")
def test_real_vbench_engine_scores_the_bundled_model(tmp_path, capsys):
    """The real vbench 0.1.5 engine (VBenchLong, long_custom_input) on bundled-model videos, with random
    stand-in weights in a temporary VBENCH_CACHE_DIR: generation, scoring and the table run end to end."""
    import subprocess
    from pathlib import Path

    from nasa_video.cli import main

    env = Path(os.environ["NASA_VIDEO_VBENCH_ENV"])
    cache = tmp_path / "vbench-cache"
    script = Path(__file__).parents[1] / "scripts" / "vbench_fake_weights.py"
    subprocess.run([str(env / "bin" / "python"), str(script), str(cache)], check=True, capture_output=True)
    os.environ["VBENCH_CACHE_DIR"] = str(cache)
    try:
        (tmp_path / "p.txt").write_text("a red circle and a blue square\n")
        assert main(["eval", "vbench-long", "--model", "toy", "--prompts", str(tmp_path / "p.txt"), "--methods",
                     "none", "nasa", "--scales", "1", "--samples", "1", "--negative", "red circle", "--out",
                     str(tmp_path / "run"), "--vbench-env", str(env), "--score-device", "cpu"]) == 0
    finally:
        del os.environ["VBENCH_CACHE_DIR"]
    result = json.loads((tmp_path / "run" / "vbench_long.json").read_text())
    for scores in result["methods"].values():
        assert set(scores) == {"aesthetic_quality", "imaging_quality"}
    print(capsys.readouterr().out)
