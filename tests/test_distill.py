"""DMD for block-causal students and NASA-T, on the tiny random config."""
import copy
import json

import numpy as np
import pytest
import torch

from nasa_video.train.dmd import DMDConfig, DMDTrainer, dmd_gradient, sample_nasa_t
from nasa_video.errors import UserError
from nasa_video.schedule import prediction_of

from .conftest import write_latent_clips

CAPTIONS = ["a red circle and a blue square", "a green triangle moving left and a small yellow square"]


@pytest.fixture(scope="module")
def parts(tiny_generator):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 6, 8, 8, generator=g)
    captions = [CAPTIONS[i % 2] for i in range(6)]
    return tiny_generator, latents, captions


def trainer(parts, **overrides):
    gen, latents, captions = parts
    cfg = DMDConfig(**{"steps": 4, "batch": 2, "lr_generator": 1e-3, "lr_critic": 1e-3,
                       "dfake_gen_update_ratio": 2, "seed": 3, **overrides})
    return DMDTrainer(copy.deepcopy(gen.model), copy.deepcopy(gen.model), gen.text, gen.cfg, cfg, latents, captions)


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_iterations_update_generator_and_critic_with_finite_losses(parts):
    t = trainer(parts, nasa_t=True, negatives=["blurry", "noise"], ema=0.9)
    g0, f0 = params(t.generator), params(t.fake)
    teacher0 = params(t.teacher)
    log = t.run(progress=False)
    assert len(log) == 4 and sum("generator_loss" in r for r in log) == 2  # steps 0 and 2
    assert all(np.isfinite(r["critic_loss"]) for r in log)
    assert all(np.isfinite(r["generator_loss"]) for r in log if "generator_loss" in r)
    assert not torch.equal(params(t.generator), g0) and not torch.equal(params(t.fake), f0)
    assert torch.equal(params(t.teacher), teacher0)  # the real score is frozen
    assert not torch.equal(params(t.ema), g0)


def test_alpha_and_kappa_stay_in_bounds():
    cfg = DMDConfig(nasa_t=True, negatives=["x"], alpha_max=1.5, kappa_min=0.5, kappa_max=4.0)
    rng = np.random.default_rng(0)
    draws = np.array([sample_nasa_t(rng, cfg) for _ in range(2000)])
    assert draws[:, 0].min() >= 0 and draws[:, 0].max() <= 1.5 and draws[:, 0].max() > 1.4
    assert draws[:, 1].min() >= 0.5 and draws[:, 1].max() <= 4.0 and draws[:, 1].min() < 0.6
    with pytest.raises(UserError, match="negative"):
        DMDConfig(nasa_t=True).check()


def test_nasa_t_with_alpha_zero_and_the_plain_teacher_is_plain_dmd(parts):
    """alpha = 0 in the student (and kappa fixed, empty negative in the teacher) is DMD exactly."""
    plain = trainer(parts, real_guidance_scale=4.5, unconditional="")
    nasa_t = trainer(parts, nasa_t=True, negatives=[""], alpha_max=0.0, kappa_min=4.5, kappa_max=4.5)
    plain.run(progress=False)
    nasa_t.run(progress=False)
    assert torch.equal(params(plain.generator), params(nasa_t.generator))
    assert torch.equal(params(plain.fake), params(nasa_t.fake))


def test_teacher_cfg_weight_and_unconditional_prompt_reach_the_real_score(parts):
    """real = uncond + w (cond - uncond) with the configured w (CausVid's 3.5 in its own form is w = 4.5) and the
    configured unconditional prompt."""
    t = trainer(parts)
    x_t, time = torch.randn(1, 4, 6, 8, 8), torch.full((1, 6), 700.0)
    with torch.no_grad():
        cond, empty = t.text.encode_batch(CAPTIONS[:1]), t.text.encode_batch([""])
        x0_cond = t.real_x0(x_t, time, cond, empty, 1.0)
        x0_uncond = t.real_x0(x_t, time, cond, empty, 0.0)
        x0_w = t.real_x0(x_t, time, cond, empty, 4.5)
    torch.testing.assert_close(x0_w, x0_uncond + 4.5 * (x0_cond - x0_uncond), rtol=1e-4, atol=1e-4)
    assert DMDConfig().real_guidance_scale == 4.5
    a, b = trainer(parts, unconditional=""), trainer(parts, unconditional="blurry")
    a.run(progress=False, stop_after=1)
    b.run(progress=False, stop_after=1)
    assert not torch.equal(params(a.generator), params(b.generator))


def test_nasa_t_negatives_come_from_the_sampler_handed_to_the_trainer(parts):
    """The trainer knows no caption grammar: a sampler (captions, numpy rng) -> negatives is handed in; without
    one, negative_from_caption > 0 is refused and the negatives list is drawn from."""
    seen = []

    def sampler(captions, rng):
        seen.append(list(captions))
        return ["blurry"] * len(captions)

    gen, latents, captions = parts
    cfg = DMDConfig(steps=1, batch=2, seed=3, nasa_t=True, negatives=["noise"], negative_from_caption=0.5)
    with pytest.raises(UserError, match="negative sampler"):
        DMDTrainer(copy.deepcopy(gen.model), copy.deepcopy(gen.model), gen.text, gen.cfg, cfg, latents, captions)
    t = DMDTrainer(copy.deepcopy(gen.model), copy.deepcopy(gen.model), gen.text, gen.cfg, cfg, latents, captions,
                   negative_sampler=sampler)
    t.run(progress=False)
    assert len(seen) == 1 and all(c in CAPTIONS for c in seen[0])
    assert set(trainer(parts, nasa_t=True, negatives=["x", "y"]).sample_negatives(CAPTIONS * 10,
                                                                                   np.random.default_rng(0))) == {"x", "y"}


def test_nasa_t_changes_the_student_update(parts):
    plain = trainer(parts)
    nasa_t = trainer(parts, nasa_t=True, negatives=["blurry"], alpha_max=1.0)
    plain.run(progress=False)
    nasa_t.run(progress=False)
    assert not torch.equal(params(plain.generator), params(nasa_t.generator))


def test_kill_and_resume_equals_an_uninterrupted_run(parts, tmp_path):
    whole = trainer(parts, nasa_t=True, negatives=["blurry", "noise"], ema=0.9, checkpoint_every=1)
    whole.run(progress=False)
    ckpt = tmp_path / "dmd.pt"
    first = trainer(parts, nasa_t=True, negatives=["blurry", "noise"], ema=0.9, checkpoint_every=1)
    first.run(ckpt, progress=False, stop_after=3)  # "killed" after step 3 (its last checkpoint)
    assert ckpt.exists() and not list(tmp_path.glob(".*partial"))
    resumed = trainer(parts, nasa_t=True, negatives=["blurry", "noise"], ema=0.9, checkpoint_every=1)
    resumed.run(ckpt, progress=False)
    assert resumed.step == 4
    for a, b in ((whole.generator, resumed.generator), (whole.fake, resumed.fake), (whole.ema, resumed.ema)):
        assert torch.equal(params(a), params(b))
    assert [r["critic_loss"] for r in resumed.log] == [r["critic_loss"] for r in whole.log]


def test_dmd_gradient_is_normalised_per_sample():
    x0 = torch.zeros(2, 1, 1, 2, 2)
    real = torch.ones(2, 1, 1, 2, 2) * torch.tensor([1.0, 4.0]).view(2, 1, 1, 1, 1)
    fake = real + 2.0
    grad = dmd_gradient(x0, fake, real)
    torch.testing.assert_close(grad[0], torch.full_like(grad[0], 2.0))
    torch.testing.assert_close(grad[1], torch.full_like(grad[1], 0.5))


def test_real_model_nasa_t_config_dry_run_on_meta():
    from nasa_video.train.setup import dry_run

    report = dry_run("configs/causvid_nasa_t_train.yaml")
    assert report["shapes"]["generator_x0"] == [1, 16, 21, 60, 104] == report["shapes"]["real_x0"]
    assert report["shapes"]["teacher_forcing_tokens"] == 2 * 21 * 1560
    assert 1.2e9 < report["parameters_per_network"] < 1.5e9 and report["nasa_t"]
    # 40 bytes a parameter (two trained networks with AdamW, teacher, EMA), sharded over the ranks
    state = report["training_state_gib_per_gpu"]
    assert state["1 GPU"] == pytest.approx(40 * report["parameters_per_network"] / 2**30, abs=0.1)
    assert state["8 GPUs"] == pytest.approx(state["1 GPU"] / 8, abs=0.1)


BUNDLED = __import__("pathlib").Path(__file__).parents[1] / "nasa_video" / "toy" / "weights" / "teacher.safetensors"


@pytest.mark.skipif(not BUNDLED.exists(), reason="needs the bundled toy weights (issue 3)")
def test_toy_nasa_t_smoke_run_writes_a_loadable_variant(tmp_path):
    from nasa_video.pipeline import StreamingGenerator
    from nasa_video.toy.nasa_t import train_toy_nasa_t

    summary = train_toy_nasa_t(tmp_path / "nt", smoke=True)
    assert summary["steps"] == 3 and np.isfinite(summary["critic_loss_last20"])
    assert (tmp_path / "nt" / "dmd.pt").exists()
    gen = StreamingGenerator.from_config("toy", device="cpu", overrides={
        "weights": {"generator": str(tmp_path / "nt" / "generator_nasa_t.safetensors")}})
    frames = [c.frames for c in gen.stream("a red circle and a blue square", "red circle")]
    assert sum(len(f) for f in frames) == 11


@pytest.mark.filterwarnings("ignore")
def test_flex_block_mask_training_forward_equals_the_dense_mask(parts):
    """The full-size path (flex-attention BlockMask) gives the student the same teacher-forcing forward as the
    dense mask. (Forward only: flex attention has no backward on the CPU; training with it runs on GPUs.)"""
    dense = trainer(parts, nasa_t=True, negatives=["blurry"], flex_mask=False)
    flex = trainer(parts, nasa_t=True, negatives=["blurry"], flex_mask=True)
    assert not isinstance(flex.mask, torch.Tensor)
    x0, captions = parts[1][:2], parts[2][:2]
    with torch.no_grad():
        positive = dense.text.encode_batch(captions)
        negative = dense.text.encode_batch(["blurry", "blurry"])
        a = dense.generate(x0, positive, negative, 0.7)
        b = flex.generate(x0, positive, negative, 0.7)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_train_dmd_from_a_config_on_a_latent_folder(tmp_path):
    """The real-model command path (`nasa-video train dmd --config`) on the tiny config: clips from a latent
    folder, NASA-T, gradient checkpointing, checkpoints; writes diffusers and CausVid layouts that load back."""
    from nasa_video.cli import main
    from nasa_video.loading import build_generator, load_config

    clips = write_latent_clips(tmp_path / "clips", CAPTIONS)
    config = tmp_path / "dmd.yaml"
    config.write_text(f"""model: tiny
device: cpu
data: {{latents: {clips}}}
gradient_checkpointing: true
dmd: {{steps: 3, batch: 2, lr_generator: 1.0e-3, lr_critic: 1.0e-3, dfake_gen_update_ratio: 2,
      checkpoint_every: 1, nasa_t: true, negatives: [blurry, noise]}}
""")
    assert main(["train", "dmd", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "dmd.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["critic_loss_last"])
    cfg = load_config("tiny")
    for name in ("generator.safetensors", "model.pt"):
        model = build_generator(cfg, "cpu", torch.float32, str(tmp_path / "run" / name))  # strict: no missing keys
        assert torch.isfinite(params(model)).all()
    # a longer run in the same folder resumes from the checkpoint
    config.write_text(config.read_text().replace("steps: 3", "steps: 4"))
    assert main(["train", "dmd", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "dmd.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_gpu_check_script_runs_on_the_tiny_config():
    """scripts/dmd_gpu_check.py (seconds and memory at full size on GPUs) runs its own CPU check here."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "scripts/dmd_gpu_check.py", "--model", "tiny", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout[result.stdout.index("{\n"):])
    assert report["losses_finite"] and report["teacher_forcing_tokens"] == 2 * 6 * 16
    assert report["warmup_iterations"] == 5 and report["seconds_generator_iteration"] > 0


# ---- ODE regression (CausVid's first stage) ------------------------------------------------------------------
def _ode_config(tmp_path, steps=3):
    config = tmp_path / "ode.yaml"
    config.write_text(f"""model: tiny
device: cpu
data: {{trajectories: {tmp_path / 'pairs'}}}
ode_pairs: {{steps_per_segment: [2, 2, 2], guidance_scale: 3.0, seed: 0}}
ode: {{steps: {steps}, batch: 2, lr: 1.0e-3, checkpoint_every: 1}}
""")
    return config


def test_teacher_trajectory_starts_at_the_noise_and_passes_every_student_step(parts):
    from nasa_video.train.ode import sigma_path, teacher_ode_trajectory
    from nasa_video.schedule import FlowSchedule

    gen = parts[0]
    flow = FlowSchedule(8.0)
    path, marks = sigma_path(flow, [1000, 757, 522], [3, 2, 2])
    assert len(path) == 8 and marks == [0, 3, 5] and path[-1] == 0.0
    assert [path[m] for m in marks] == pytest.approx([float(flow.sigma(torch.tensor([t]))) for t in (1000, 757, 522)])
    noise = torch.randn(2, 4, 6, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = gen.text.encode_batch(CAPTIONS)
    trajectory = teacher_ode_trajectory(gen.model, ctx, gen.text.encode_batch([""]), noise, flow,
                                        [1000, 757, 522], [3, 2, 2], 3.0, prediction_of(gen.cfg))
    assert trajectory.shape == (2, 4, 4, 6, 8, 8)
    torch.testing.assert_close(trajectory[:, 0], noise)  # sigma(1000) = 1: the first state is the noise
    assert all((trajectory[:, i + 1] - trajectory[:, i]).abs().mean() > 1e-3 for i in range(3))


def test_ode_regression_fits_teacher_trajectories(parts):
    """A few steps on four trajectories lower the regression loss (the student learns the teacher's ODE map)."""
    from nasa_video.train.ode import ODEConfig, ODETrainer, teacher_ode_trajectory
    from nasa_video.schedule import FlowSchedule

    gen = parts[0]
    noise = torch.randn(4, 4, 6, 8, 8, generator=torch.Generator().manual_seed(2))
    captions = [CAPTIONS[i % 2] for i in range(4)]
    trajectories = teacher_ode_trajectory(gen.model, gen.text.encode_batch(captions), gen.text.encode_batch([""] * 4),
                                          noise, FlowSchedule(8.0), [1000, 757, 522], [2, 2, 2], 3.0, prediction_of(gen.cfg))
    trainer = ODETrainer(copy.deepcopy(gen.model), gen.text, gen.cfg,
                         ODEConfig(steps=40, batch=4, lr=2e-3, seed=0), trajectories, captions)
    log = trainer.run(progress=False)
    first, last = np.mean([r["ode_loss"] for r in log[:5]]), np.mean([r["ode_loss"] for r in log[-5:]])
    assert last < 0.7 * first, (first, last)
    with pytest.raises(UserError, match="needs 4"):
        ODETrainer(copy.deepcopy(gen.model), gen.text, gen.cfg, ODEConfig(), trajectories[:, 1:], captions)


def test_ode_pairs_then_ode_stage_from_the_command_line(tmp_path, monkeypatch):
    """`train ode-pairs` split over two ranks writes the same files as one rank and resumes; `train ode` trains on
    them and writes a student that loads strictly; a DMD config is refused by the ODE command."""
    from safetensors.torch import load_file

    from nasa_video.cli import main
    from nasa_video.loading import build_generator, load_config

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(CAPTIONS + ["a blue circle", "a red triangle moving right"]) + "\n")
    config = _ode_config(tmp_path)
    for rank in (0, 1):  # what torchrun's environment gives each rank (no process group needed)
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(["train", "ode-pairs", "--config", str(config), "--prompts", str(prompts),
                     "--out", str(tmp_path / "pairs")]) == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    files = sorted((tmp_path / "pairs").glob("*.safetensors"))
    assert [f.name for f in files] == [f"{i:06d}.safetensors" for i in range(4)]
    assert main(["train", "ode-pairs", "--config", str(config), "--prompts", str(prompts),
                 "--out", str(tmp_path / "one")]) == 0
    for f in files:  # the noise of a prompt depends on its index only
        torch.testing.assert_close(load_file(str(f))["trajectory"], load_file(str(tmp_path / "one" / f.name))["trajectory"])
    assert load_file(str(files[0]))["trajectory"].shape == (4, 4, 6, 8, 8)

    assert main(["train", "ode", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "ode.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["ode_loss_last"])
    build_generator(load_config("tiny"), "cpu", torch.float32, str(tmp_path / "run" / "model.pt"))  # strict
    config.write_text(config.read_text().replace("steps: 3", "steps: 4"))
    assert main(["train", "ode", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "ode.json").read_text())["steps"] == 4
    assert main(["train", "dmd", "--config", str(config), "--out", str(tmp_path / "run")]) != 0  # no dmd: section


def test_real_model_ode_config_fits_the_causvid_student():
    from omegaconf import OmegaConf

    from nasa_video.train.ode import ODEConfig
    from nasa_video.loading import load_config

    tc = OmegaConf.load("configs/causvid_ode_train.yaml")
    assert ODEConfig(**OmegaConf.to_container(tc.ode)).lr == 2e-6
    student_steps = list(load_config(str(tc.model)).sampling.steps)
    assert len(tc.ode_pairs.steps_per_segment) == len(student_steps) == 3


def test_shifted_sigma_path_is_the_teachers_50_step_sampler_through_the_student_steps():
    """configs/causvid_ode_train.yaml: [36, 8, 6] shifted steps are CausVid's 50-step shift-8 Euler grid, and the
    path lands exactly on the student's sigmas; bad counts are refused before any weights load."""
    from omegaconf import OmegaConf

    from nasa_video.train.ode import sigma_path
    from nasa_video.loading import load_config
    from nasa_video.schedule import FlowSchedule

    tc = OmegaConf.load("configs/causvid_ode_train.yaml")
    cfg = load_config(str(tc.model))
    flow = FlowSchedule(float(cfg.sampling.shift))
    path, marks = sigma_path(flow, list(cfg.sampling.steps), list(tc.ode_pairs.steps_per_segment), tc.ode_pairs.spacing)
    u = np.linspace(1, 0, 51)
    np.testing.assert_allclose(path, 8 * u / (1 + 7 * u), atol=1e-12)
    assert [path[m] for m in marks] == [float(flow.sigma(torch.tensor([float(t)]))) for t in cfg.sampling.steps]
    for bad in ([36, 0, 6], [36, 8], [36, 8.5, 6]):
        with pytest.raises(UserError, match="steps_per_segment"):
            sigma_path(flow, [1000, 757, 522], bad)
    with pytest.raises(UserError, match="decreasing"):
        sigma_path(flow, [757, 1000, 522], [1, 1, 1])
