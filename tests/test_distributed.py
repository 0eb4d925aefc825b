"""DMD / NASA-T under torchrun with FSDP2, run here as two CPU ranks over gloo on the tiny config."""
import copy
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import nasa_video.train.trainer as trainer_module
from nasa_video.errors import UserError
from nasa_video.train.dmd import DMDConfig, DMDTrainer

from .conftest import write_latent_clips

CAPTIONS = ["a red circle and a blue square", "a green triangle moving left and a small yellow square"]
CONFIG = dict(steps=4, batch=2, lr_generator=1e-3, lr_critic=1e-3, dfake_gen_update_ratio=2, seed=3, ema=0.9,
              checkpoint_every=1, nasa_t=True, negatives=["blurry", "noise"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parts():
    from nasa_video.pipeline import StreamingGenerator

    gen = StreamingGenerator.from_config("tiny", device="cpu", dtype="fp32", attention_backend="sdpa")
    g = torch.Generator().manual_seed(0)
    return gen, torch.randn(6, 4, 6, 8, 8, generator=g), [CAPTIONS[i % 2] for i in range(6)]


def _trainer(dist=None, checkpointing=False, **overrides):
    gen, latents, captions = _parts()
    trainer = DMDTrainer(copy.deepcopy(gen.model), copy.deepcopy(gen.model), gen.text, gen.cfg,
                         DMDConfig(**{**CONFIG, **overrides}), latents, captions, dist=dist)
    if checkpointing:
        trainer.generator.enable_gradient_checkpointing()
        trainer.fake.enable_gradient_checkpointing()
    return trainer


def _rank(rank, world, port, runs, one_seed, checkpointing, overrides):
    """One torchrun-like rank: for each (out, checkpoint, stop_after) in runs, a fresh trainer trains, then the
    gathered networks and this rank's log are written to out."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if one_seed:  # every rank draws rank 0's clips and noise: the run must then equal one process
        trainer_module.rank_seed = lambda seed, rank: seed
    from nasa_video.train.distributed import finish, full_state_dict, init_from_env

    ctx = init_from_env()
    for out, checkpoint, stop_after in runs:
        trainer = _trainer(ctx, checkpointing, **overrides)
        log = trainer.run(checkpoint, progress=False, stop_after=stop_after)
        nets = {name: full_state_dict(getattr(trainer, name)) for name in ("generator", "fake", "ema")}
        if rank == 0:
            torch.save(nets, f"{out}/networks.pt")
        with open(f"{out}/log{rank}.json", "w") as f:
            json.dump(log, f)
    # Leave as the library does (barrier, then destroy), then skip interpreter finalization: FSDP's device mesh
    # keeps the gloo process group, and its worker threads, alive past destroy_process_group, and a worker
    # that drops the last reference to a Python-owned tensor after finalization has begun needs the GIL, which
    # (Python 3.11) ends the thread with pthread_exit; the unwind through C++ noexcept code calls
    # std::terminate ("terminate called without an active exception", SIGABRT). Everything is written by now.
    finish(ctx)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn_runs(runs, one_seed=False, checkpointing=False, **overrides):
    """Two ranks doing runs [(out, checkpoint, stop_after)] in turn; [(networks, logs)] per run."""
    for out, _, _ in runs:
        out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank, args=(2, _free_port(), [(str(o), c, s) for o, c, s in runs], one_seed, checkpointing,
                          overrides), nprocs=2)
    results = []
    for out, _, _ in runs:
        logs = [json.loads((out / f"log{r}.json").read_text()) for r in range(2)]
        results.append((torch.load(out / "networks.pt", weights_only=True), logs))
    return results


def _spawn(out, one_seed=False, checkpoint=None, stop_after=None, checkpointing=False, **overrides):
    return _spawn_runs([(out, checkpoint, stop_after)], one_seed, checkpointing, **overrides)[0]


def _assert_same(a: dict, b: dict, **tol):
    for name in ("generator", "fake", "ema"):
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], **tol, msg=f"{name}.{key}")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_two_fsdp_ranks_on_the_same_draws_equal_one_process(tmp_path):
    """FSDP shards, all-gathers and averages gradients: two ranks fed the same clips and noise train exactly
    what one process trains (generator and critic updates, EMA, NASA-T), with gradient checkpointing on."""
    sharded, logs = _spawn(tmp_path, one_seed=True, checkpointing=True)
    plain = _trainer()
    plain_log = plain.run(progress=False)
    reference = {name: getattr(plain, name).state_dict() for name in ("generator", "fake", "ema")}
    _assert_same(sharded, reference, rtol=1e-4, atol=1e-4)
    assert [r["critic_loss"] for r in logs[0]] == pytest.approx([r["critic_loss"] for r in plain_log], rel=1e-4)
    moved = max((reference["generator"][k] - _trainer().generator.state_dict()[k]).abs().max() for k in reference["generator"])
    assert moved > 1e-3  # the comparison is over trained weights, not the initial ones


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_ranks_draw_their_own_data_and_a_killed_sharded_run_resumes_exactly(tmp_path):
    """3 steps (generator updates at 0 and 2): the uninterrupted run and a run "killed" after 2 steps share one
    launch (fresh trainers in turn); the resume is a new launch whose one step updates the generator, the
    critic and the EMA from the loaded sharded optimiser states and random streams."""
    short = dict(steps=3)
    checkpoint = tmp_path / "cut" / "dmd.ckpt"
    (whole, logs), _ = _spawn_runs([(tmp_path / "whole", None, None), (tmp_path / "cut", str(checkpoint), 2)],
                                   **short)
    assert [r["alpha"] for r in logs[0]] != [r["alpha"] for r in logs[1]]  # per-rank draws
    assert sum("generator_loss" in r for r in logs[0]) == 2 and "generator_loss" in logs[0][-1]
    assert json.loads((checkpoint / "trainer.json").read_text())["step"] == 2
    # a kill inside the swap (old moved aside, new not yet in place) leaves the previous checkpoint as .old
    checkpoint.rename(checkpoint.with_name("dmd.ckpt.old"))
    resumed, resumed_logs = _spawn(tmp_path / "cut", checkpoint=str(checkpoint), **short)
    _assert_same(resumed, whole, rtol=0, atol=0)
    assert resumed_logs == logs
    assert sorted(p.name for p in checkpoint.parent.iterdir() if p.name.startswith("dmd")) == ["dmd.ckpt"]


def test_a_sharded_checkpoint_is_not_resumed_by_one_process(tmp_path):
    (tmp_path / "dmd.ckpt").mkdir()
    with pytest.raises(UserError, match="under torchrun"):
        _trainer().load(tmp_path / "dmd.ckpt")


def _torchrun(*cli_args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "nasa_video.cli", *cli_args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_torchrun_ode_pairs_and_ode_stage(tmp_path):
    """The ODE stage's two commands under torchrun on two CPU ranks: pairs split over the ranks, then FSDP
    regression writing a strictly loadable student and a sharded checkpoint."""
    from nasa_video.loading import build_generator, load_config

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(CAPTIONS + ["a blue circle", "a red triangle moving right"]) + "\n")
    config = tmp_path / "ode.yaml"
    config.write_text(f"""model: tiny
data: {{trajectories: {tmp_path / 'pairs'}}}
gradient_checkpointing: true
ode_pairs: {{steps_per_segment: [2, 2, 2], guidance_scale: 3.0}}
ode: {{steps: 2, batch: 1, lr: 1.0e-3, checkpoint_every: 1}}
""")
    result = _torchrun("train", "ode-pairs", "--config", str(config), "--prompts", str(prompts),
                       "--out", str(tmp_path / "pairs"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "pairs").glob("*.safetensors"))) == 4
    result = _torchrun("train", "ode", "--config", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote") == 1  # the summary once, from rank 0
    summary = json.loads((tmp_path / "run" / "ode.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and np.isfinite(summary["ode_loss_last"])
    assert (tmp_path / "run" / "ode.ckpt" / "trainer.json").exists()
    build_generator(load_config("tiny"), "cpu", torch.float32, str(tmp_path / "run" / "model.pt"))  # strict


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_torchrun_train_dmd_command_end_to_end(tmp_path):
    """What a cluster user runs, on two CPU ranks: writes loadable student weights once, and resumes."""
    from nasa_video.loading import build_generator, load_config

    clips = write_latent_clips(tmp_path / "clips", CAPTIONS)
    config = tmp_path / "dmd.yaml"
    config.write_text(f"""model: tiny
data: {{latents: {clips}}}
gradient_checkpointing: true
dmd: {{steps: 2, batch: 1, lr_generator: 1.0e-3, lr_critic: 1.0e-3, dfake_gen_update_ratio: 2,
      checkpoint_every: 1, nasa_t: true, negatives: [blurry, noise], ema: 0.9}}
""")
    run_dir = tmp_path / "run"

    def torchrun():
        return _torchrun("train", "dmd", "--config", str(config), "--out", str(run_dir))

    result = torchrun()
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "dmd.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and np.isfinite(summary["critic_loss_last"])
    for name in ("generator.safetensors", "model.pt"):
        model = build_generator(load_config("tiny"), "cpu", torch.float32, str(run_dir / name))  # strict load
        assert all(torch.isfinite(p).all() for p in model.parameters())
    config.write_text(config.read_text().replace("steps: 2", "steps: 3"))
    result = torchrun()
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "dmd.json").read_text())["steps"] == 3
    # the same folder without torchrun is refused with the way to resume it
    from nasa_video.cli import main

    assert main(["train", "dmd", "--config", str(config), "--out", str(run_dir)]) != 0
