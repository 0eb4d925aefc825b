"""The bundled world: scenes, the detector, the toy text encoder, the removal scoring, the training smoke run."""
import warnings

import numpy as np
import pytest
import torch

from nasa_video.toy.detect import agreement, corruption, detect
from nasa_video.toy.judge import judge_caption
from nasa_video.toy.removal import benchmark_rows
from nasa_video.toy.text import VOCAB, WordTokenizer
from nasa_video.toy.world import OBJECTS, caption_objects, render, sample_scene, visibility


def test_scenes_are_captioned_and_share_colours_and_overlap_only_as_the_world_says():
    from nasa_video.toy.world import DEPTH, HOME_X, MAX_OBJECTS, RADIUS, compatible, shape_mask

    rng = np.random.default_rng(0)
    shared = overlapping = 0
    for _ in range(80):
        scene = sample_scene(rng)
        video, labels = render(scene, 33)  # longer than a clip: moving shapes bounce and stay in the frame
        assert video.shape == (33, 32, 48, 3) and video.dtype == np.uint8
        assert 1 <= len(scene.things) <= MAX_OBJECTS and compatible(scene.names)
        shared += len({t.color for t in scene.things}) < len(scene.things)
        for name in scene.names:
            assert name in scene.caption
        vis = visibility(scene, labels)
        assert all(vis[n].all() for n in scene.names)
        assert not any(vis[n].any() for n in OBJECTS if n not in scene.names)
        for i, a in enumerate(scene.things):  # an overlap shows the object placed further right
            for j, b in enumerate(scene.things):
                both = shape_mask(a.shape, HOME_X[a.name], 16) & shape_mask(b.shape, HOME_X[b.name], 16)
                if i != j and both.any() and DEPTH[a.name] > DEPTH[b.name]:
                    overlapping += 1
                    assert both.sum() <= 3 * 2 * RADIUS, (a, b, both.sum())
                    assert (labels[0][both] == i + 1).all() if a.motion is None else True
    assert shared and overlapping  # the world asks both questions
    assert not compatible(["red circle", "green square"])  # neighbours on the line never share a scene


def test_a_scene_moves_as_one_and_its_caption_says_so_once():
    from nasa_video.toy.world import Thing, caption_for, scene_from_caption

    rng = np.random.default_rng(3)
    moving = [s for s in (sample_scene(rng) for _ in range(60)) if s.things[0].motion]
    assert moving and all(len({t.motion for t in s.things}) == 1 for s in moving)
    assert all(s.caption.count(" moving ") == 1 and s.caption.endswith(s.things[0].motion) for s in moving)
    assert all(scene_from_caption(s.caption) == s for s in moving)  # the exact render a caption asks for
    assert caption_for([Thing("red", "circle", "up"), Thing("blue", "square", "up")]) == \
        "a red circle and a blue square moving up"
    assert caption_objects("a red circle moving up and a blue square") == ["red circle", "blue square"]  # old form
    with pytest.warns(UserWarning, match="once, at the end"):  # the old per-object form is named, not guessed at
        WordTokenizer(VOCAB).ids("a red circle moving up and a blue square")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        WordTokenizer(VOCAB).ids("a red circle and a blue square moving up")
    with pytest.raises(ValueError, match="same motion"):
        caption_for([Thing("red", "circle", "up"), Thing("blue", "square", None)])


def test_nasa_t_negatives_are_read_from_the_captions():
    """The bundled world's NASA-T sampler: caption_objects inverts caption_for; object_negatives draws the clip's own
    objects with the given share and the list otherwise."""
    from nasa_video.toy.nasa_t import object_negatives
    from nasa_video.toy.world import caption_objects

    rng = np.random.default_rng(4)
    scenes = [sample_scene(rng) for _ in range(50)]
    for scene in scenes:
        assert caption_objects(scene.caption) == scene.names
    captions = [s.caption for s in scenes]
    own = object_negatives(1.0, [])(captions, np.random.default_rng(0))
    assert all(n in s.names for n, s in zip(own, scenes))
    assert object_negatives(0.0, ["blurry"])(captions, np.random.default_rng(0)) == ["blurry"] * 50


@pytest.mark.slow
def test_detector_is_exact_on_rendered_frames():
    rng = np.random.default_rng(1)
    scores = []
    for _ in range(40):
        scene = sample_scene(rng)
        video, labels = render(scene, 21)
        scores.append(agreement(detect(video), visibility(scene, labels)))
        assert corruption(video) == 0.0
    assert np.mean(scores) == 1.0


def test_corruption_counts_unexplained_pixels():
    scene = sample_scene(np.random.default_rng(2), names=["green square"])
    video, _ = render(scene, 5)
    video[:, :16, :24] = (128, 0, 128)  # a purple quarter that is neither background nor a palette colour
    assert 0.2 < corruption(video) <= 0.25


def test_word_tokenizer_pads_and_names_unknown_words():
    tok = WordTokenizer(VOCAB)
    out = tok(["a red circle"], padding="max_length", max_length=6, return_tensors="pt")
    assert out["input_ids"].shape == (1, 6)
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0]]  # a, "red circle", </s>
    assert tok.words("A red circle moving up and a blue") == ["a", "red circle", "moving", "up", "and", "a", "blue"]
    plain = WordTokenizer([w for w in VOCAB if " " not in w])  # an older vocabulary: no pairs, no merging
    assert plain.words("a red circle") == ["a", "red", "circle"]
    with pytest.warns(UserWarning, match="'purple'"):
        tok(["a purple circle"], padding="max_length", max_length=6, return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok("a purple circle")  # the length check alone does not warn a second time


def test_benchmark_rows_are_fixed_distinct_and_held_out_of_training():
    from nasa_video.toy.removal import KINDS
    from nasa_video.toy.world import caption_objects, held_out

    rows = benchmark_rows()
    assert rows == benchmark_rows() and len({r.key for r in rows}) == len(rows)
    for split, wanted in (("held-out", 8), ("in-distribution", 4)):
        for kind in KINDS:
            mine = [r for r in rows if r.split == split and r.kind == kind]
            assert len(mine) == wanted, (split, kind, len(mine))
            assert all(held_out(caption_objects(r.positive)) == (split == "held-out") for r in mine)
            if kind.startswith("mid"):
                assert all(" moving " not in r.positive and r.change_after == 1 for r in mine)
    # no training draw contains a held-out composition (the teacher's, the student's and NASA-T's captions all
    # come from sample_scene(training=True))
    rng = np.random.default_rng(0)
    drawn = [sample_scene(rng, training=True) for _ in range(3000)]
    assert not any(held_out(s.names) for s in drawn)
    assert sum(held_out(sample_scene(rng).names) for _ in range(3000)) > 100  # the split has something to hide


def test_the_judge_on_ground_truth():
    rng = np.random.default_rng(3)
    scene = sample_scene(rng, names=["red circle", "blue square"])
    video, _ = render(scene, 33)
    kept = judge_caption(video, scene.caption, ["red circle"])
    assert kept["removed"] == 0.0 and kept["kept"] == 1.0 and kept["joint"] == 0.0
    unchanged = judge_caption(video, scene.caption, ["green triangle"])  # absent: the video must stay as it is
    assert unchanged["joint"] == 1.0


def test_training_smoke_run_writes_loadable_weights(tmp_path):
    from nasa_video.pipeline import StreamingGenerator
    from nasa_video.toy.train import train_toy

    from nasa_video.toy.train import export_bundle

    log = train_toy(tmp_path / "w", seed=0, smoke=True)
    assert np.isfinite(log["teacher_loss_last50"]) and np.isfinite(log["student_loss_last50"])
    files = export_bundle(tmp_path / "w", tmp_path / "ship")
    assert not any("cache" in str(f) for f in files)
    gen = StreamingGenerator.from_config("toy", device="cpu", overrides={"weights": {"folder": str(tmp_path / "ship")}})
    chunks = list(gen.stream("a red circle and a blue square", "red circle"))
    from nasa_video.pipeline import pixel_frames
    assert sum(len(c.frames) for c in chunks) == pixel_frames(int(gen.cfg.video.latent_frames), gen.temporal_stride)
    assert torch.isfinite(chunks[-1].latents).all()

    # The removal benchmark's whole output path on these (untrained) weights: JSON, table, plot.
    from nasa_video.toy.removal import markdown_table, plot_sweep, run_removal
    from nasa_video.video_io import write_json
    rows = benchmark_rows()
    rows = [next(r for r in rows if r.kind == kind) for kind in ("object", "absent", "mid-negative", "mid-prompt")]
    result = run_removal(gen, [("none", 0.0), ("nasa", 1.0)], rows, seeds=(0,), progress=False)
    assert set(result["methods"]) == {"none", "nasa@1"}
    for row in result["methods"].values():
        assert {"joint_success", "joint_low", "joint_high", "success", "retention", "kept_error"} <= set(row)
        assert row["videos"] == 3 and all(0 <= row[k] <= 1 for k in ("joint_success", "success", "retention"))
    assert "mid-prompt" in result["kinds"]["none"]["held-out"] and "mid-prompt" not in result["kinds"]["nasa@1"][
        "held-out"]  # the prompt switch has no negative: made once
    assert result["kinds"]["nasa@1"]["held-out"]["absent"]["change"] >= 0
    write_json(tmp_path / "r.json", result)
    plot_sweep(result, tmp_path / "r.png")
    assert "| nasa | 1 |" in markdown_table(result) and (tmp_path / "r.png").stat().st_size > 1000


def test_exact_codec_round_trip_and_streaming():
    from nasa_video.toy.codec import ShuffleCodec
    from nasa_video.vae import streaming_decoder

    codec = ShuffleCodec(3, [0.1] * 24, [0.5] * 24)
    pixels = torch.rand(2, 3, 17, 32, 48) * 2 - 1
    latents = codec.encode(pixels)
    assert latents.shape == (2, 24, 9, 16, 24)
    decoder = streaming_decoder(codec)
    blocks = [decoder.decode(latents[:, :, i:i + 3]) for i in (0, 3, 6)]
    assert [b.shape[2] for b in blocks] == [5, 6, 6]
    torch.testing.assert_close(torch.cat(blocks, 2), pixels, rtol=0, atol=1e-5)


def test_detector_command_prints_agreement(capsys):
    from nasa_video.cli import main
    import re

    assert main(["eval", "detector", "--videos", "5"]) == 0
    detector_line, judge_line = capsys.readouterr().out.strip().splitlines()
    exact, degraded, corruption_read, consistent, consistent_exact = (
        float(x) for x in re.findall(r"([0-9.]+)%", detector_line))
    assert exact >= 99.0 and degraded >= 95.0 and corruption_read < 2.0
    assert 0.0 <= consistent <= 100.0 and consistent_exact == 100.0
    judged_exact, judged_degraded, judged_jittered = (float(x) for x in re.findall(r"([0-9.]+)%", judge_line))
    assert judged_exact == 100.0 and 0 <= judged_degraded <= 100.0 and 0 <= judged_jittered <= 100.0, judge_line


@pytest.mark.slow
def test_training_resumes_where_it_stopped(tmp_path, monkeypatch):
    """A run stopped mid-stage (Ctrl-C in the teacher, then again in the student) and run again ends with the same
    weights as one that never stopped: every stage checkpoints its networks, optimiser and random streams."""
    from safetensors.torch import load_file

    from nasa_video.toy import train as toy_train

    steps = {"teacher": {"steps": 4, "checkpoint_every": 2}, "student": {"steps": 4, "checkpoint_every": 2}}
    toy_train.train_toy(tmp_path / "whole", smoke=True, overrides=steps)

    real_clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def stop_at(limit):
        def clip(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == limit:
                raise KeyboardInterrupt
            return real_clip(*args, **kwargs)
        return clip

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", stop_at(3))  # teacher step 3: checkpoint at 2 kept
    with pytest.raises(KeyboardInterrupt):
        toy_train.train_toy(tmp_path / "stopped", smoke=True, overrides=steps)
    calls["n"] = 0
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", stop_at(2 + 3))  # 2 teacher steps left, then student 3
    with pytest.raises(KeyboardInterrupt):
        toy_train.train_toy(tmp_path / "stopped", smoke=True, overrides=steps)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)
    log = toy_train.train_toy(tmp_path / "stopped", smoke=True, overrides=steps)
    assert np.isfinite(log["student_loss_last50"])
    for name in ("teacher.safetensors", "generator.safetensors"):
        whole, resumed = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "stopped" / name))
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), name


def test_removal_run_resumes_and_ctrl_c_keeps_the_scores(tmp_path, capsys):
    """The benchmark writes each video's scores as it goes: an interrupted run keeps them, a rerun does only the
    rest and gives the same table as an uninterrupted run; the CLI says so in one line (exit 130)."""
    from nasa_video.pipeline import StreamingGenerator
    from nasa_video.toy.removal import run_removal

    gen = StreamingGenerator.from_config("toy", device="cpu")
    methods, seeds = [("none", 0.0), ("nasa", 1.0)], (0,)
    pairs = [r for r in benchmark_rows() if r.kind == "object"][:2]
    whole = run_removal(gen, methods, pairs, seeds, progress=False)

    class StopAfter:
        def __init__(self, videos):
            self.left = videos

        def stream(self, *args, **kwargs):
            if self.left == 0:
                raise KeyboardInterrupt
            self.left -= 1
            return gen.stream(*args, **kwargs)

    scores = tmp_path / "scores.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_removal(StopAfter(3), methods, pairs, seeds, progress=False, resume=scores, model="m")
    assert len(scores.read_text().splitlines()) == 3
    counting = StopAfter(10)
    resumed = run_removal(counting, methods, pairs, seeds, progress=False, resume=scores, model="m")
    assert counting.left == 10 - 1 and resumed == whole  # one video left to make

    from nasa_video.cli import main
    from nasa_video.toy import removal as toy_removal

    original = toy_removal.score_row
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    toy_removal.score_row = interrupt
    try:
        code = main(["eval", "removal", "--json", str(tmp_path / "r.json"), "--rows", "1", "--seeds", "1"])
    finally:
        toy_removal.score_row = original
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("nasa-video:")]  # beside the progress bar
    assert code == 130 and "Traceback" not in err and len(said) == 1 and "run the same command to continue" in said[0]
    assert not (tmp_path / "r.json").exists()


def test_nasa_t_targets_are_the_scene_without_the_negative():
    """The student's NASA-T samples: the caption names every object, the negative one of them, and the target
    latents decode to the scene without it (the detector finds the others and not the negative)."""
    from nasa_video.toy.codec import ShuffleCodec
    from nasa_video.toy.train import make_removals
    from nasa_video.vae import to_uint8

    codec = ShuffleCodec()
    made = make_removals(codec, np.random.default_rng(0), 6, 11, 6)
    assert made["latents"].shape[:3] == (6, 24, 6) and len(made["captions"]) == len(made["negatives"]) == 6
    frames = to_uint8(codec.decode_video(made["latents"]))
    for video, caption, negative in zip(frames.numpy(), made["captions"], made["negatives"]):
        seen = detect(video)
        names = caption_objects(caption)
        assert negative in names and len(names) >= 2
        assert not seen[negative].any() and all(seen[n].all() for n in names if n != negative)


def test_the_students_nasa_t_steps_run_nasa_in_its_forward():
    """NASA-T with exact targets regresses the scene without the negative *under NASA*: the same step (same
    draws) with alpha 1 and with alpha 0 must differ in the student's first forward (its last block's output;
    alpha 0 is no guidance). A forward that installed plain attention would make them equal, and would teach the
    student to drop named objects with no negative at all."""
    from omegaconf import OmegaConf

    from nasa_video.loading import bundled_path, load_config
    from nasa_video.toy import train as toy_train
    from nasa_video.toy.codec import ShuffleCodec
    from nasa_video.toy.text import load_toy_text_encoder

    cfg = load_config("toy")
    codec = ShuffleCodec.load(bundled_path(cfg, "codec"))
    text = load_toy_text_encoder(bundled_path(cfg, "text"), "cpu")
    removals = toy_train.make_removals(codec, np.random.default_rng(0), 4, 11, 6)

    def first_output(alpha: float) -> torch.Tensor:
        teacher = toy_train.new_generator(cfg, 0)
        outputs = []
        teacher.blocks[-1].register_forward_hook(lambda m, args, out: outputs.append(out.detach().clone()))
        tc = OmegaConf.create({"seed": 0, "student": {
            "steps": 1, "batch": 2, "lr": 1e-4, "warmup": 1, "caption_dropout": 0.0, "ema": 0.9,
            "checkpoint_every": 100, "nasa_t": {"from_step": 0, "share": 1.0, "alpha": [alpha, alpha]}}})
        toy_train.train_student(teacher, text, cfg, tc, removals["latents"], removals["captions"], {}, None, removals)
        return outputs[0]  # the hook went with the student, a deep copy of the teacher

    guided, plain = first_output(1.0), first_output(0.0)
    difference = (guided - plain).abs().max().item()
    assert difference > 1e-3 * plain.abs().max().item(), difference


def test_mid_clip_training_samples_change_at_the_block_boundary():
    """NASA-T samples whose negative arrives after the first block keep the object in that block and drop it
    after; prompt switches add the new caption's object from the second block; neither uses a held-out
    composition; the loss counts only the blocks from the change on."""
    from nasa_video.toy.codec import ShuffleCodec
    from nasa_video.toy.train import make_removals, make_switches
    from nasa_video.toy.world import held_out
    from nasa_video.vae import to_uint8

    codec = ShuffleCodec()
    late = make_removals(codec, np.random.default_rng(0), 6, 11, 6, late_share=1.0, block=3)
    assert late["from_block"] == [1] * 6
    first_block_frames = 5  # latent frames 0-2: pixel frame 0, then 2 per latent frame
    for video, caption, negative in zip(to_uint8(codec.decode_video(late["latents"])).numpy(), late["captions"],
                                        late["negatives"]):
        seen = detect(video)
        assert seen[negative][:first_block_frames].all() and not seen[negative][first_block_frames:].any()
        assert all(seen[n].all() for n in caption_objects(caption) if n != negative)
    switched = make_switches(codec, np.random.default_rng(1), 6, 11, 6, block=3)
    for video, caption in zip(to_uint8(codec.decode_video(switched["latents"])).numpy(), switched["captions"]):
        names, seen = caption_objects(caption), detect(video)
        assert not held_out(names) and len(names) >= 2
        new = names[-1]
        assert not seen[new][:first_block_frames].any() and seen[new][first_block_frames:].all(), caption
        assert all(seen[n].all() for n in names[:-1])


def test_the_loss_counts_the_blocks_from_the_change_on():
    from nasa_video.schedule import FlowSchedule
    from nasa_video.train.ode import ode_regression_loss

    class Zero(torch.nn.Module):  # predicts x0 = 0 everywhere: the loss is the target's mean square per frame
        def set_guidance(self, *args):
            pass

        def forward(self, x, t, **kwargs):
            return torch.zeros_like(x)

    x0 = torch.zeros(2, 1, 6, 2, 2)
    x0[:, :, 3:] = 2.0  # the second block's frames
    trajectory = torch.stack([x0, x0], 1)  # one student step, then x0
    args = (Zero(), None, trajectory, torch.zeros(2, 2, dtype=torch.long), torch.tensor([500.0]),
            FlowSchedule(shift=1.0, num_train_timesteps=1000), "x0", None, None, 3)
    assert ode_regression_loss(*args).item() == pytest.approx(2.0)  # half the frames at 4
    assert ode_regression_loss(*args, from_block=torch.tensor([0, 0])).item() == pytest.approx(2.0)
    assert ode_regression_loss(*args, from_block=torch.tensor([1, 1])).item() == pytest.approx(4.0)
    assert ode_regression_loss(*args, from_block=torch.tensor([0, 1])).item() == pytest.approx((2.0 * 6 + 4.0 * 3) / 9)


def test_nasa_t_targets_of_every_kind_are_what_the_judge_asks_for():
    """Colour-only, shape-only and absent negatives: each target, decoded, is a joint success for the judge of the
    benchmark (the same rule names what goes), and an absent negative's target is the scene unchanged."""
    from nasa_video.toy.codec import ShuffleCodec
    from nasa_video.toy.train import make_removals
    from nasa_video.vae import to_uint8

    codec = ShuffleCodec()
    kinds = {"object": 1, "colour": 1, "shape": 1, "absent": 1, "absent-shared": 1}
    made = make_removals(codec, np.random.default_rng(2), 16, 11, 6, kinds=kinds)
    from nasa_video.toy.judge import names
    from nasa_video.toy.world import scene_from_caption

    said = set()
    for video, caption, negative in zip(to_uint8(codec.decode_video(made["latents"])).numpy(), made["captions"],
                                        made["negatives"]):
        scene = scene_from_caption(caption)
        named = names(negative, scene.things)
        said.add("absent" if not named else "one word" if len(negative.split()) == 1 else "object")
        assert judge_caption(video, caption, [negative])["joint"] == 1.0, (caption, negative)
        if not named:  # an absent negative: the scene unchanged
            assert (video == render(scene, 11)[0]).all(), (caption, negative)
    assert said == {"object", "one word", "absent"}, said
