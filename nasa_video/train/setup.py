"""The training commands from a YAML: `train ode-pairs` (make_ode_pairs), `train ode` / `train dmd`
(train_from_config, one device or torchrun) and `train dmd --dry-run` (the real-size shapes on the meta device)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError
from .config import ODEPairsConfig, TrainingConfig, settings_from
from .data import ClipFolder
from .distributed import sharded_checkpoint
from .dmd import DMDConfig, DMDTrainer
from .ode import ODEConfig, ODETrainer, sigma_path, teacher_ode_trajectory


def frozen_text(model_cfg, device, wan):
    from ..loading import build_vae_and_text

    # Frozen: bf16 on GPUs (umT5-XXL's encoder, 5.7 B parameters, is 23 GB in fp32; every rank holds one).
    return build_vae_and_text(model_cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32, wan)[1]


def autocast_for(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def training_state_gib(parameters: int, ema: bool, ranks: int) -> float:
    """Per-GPU memory of the training state under FSDP: generator and fake score in fp32 with gradients and
    AdamW's two moments (16 bytes a parameter), the frozen teacher and the EMA in fp32 (4 each), all sharded."""
    return round((2 * 16 + 4 + (4 if ema else 0)) * parameters / ranks / 2**30, 1)


def dry_run(train_config: str | os.PathLike, batch: int = 1) -> dict:
    """Build the real-size generator, teacher and fake score on the meta device (no weights, no memory) and
    run one generator forward, the DMD scores and the critic forward to check every shape."""
    from ..model.interface import build_from_config, parameter_count

    tc = TrainingConfig.load(train_config)
    model, config = tc.settings, tc.settings.generator
    with torch.device("meta"):
        generator, teacher = build_from_config(tc.model_cfg), build_from_config(tc.model_cfg)
    latents = torch.empty(batch, config["in_channels"], model.latent_frames, *model.latent_hw, device="meta")
    text_len, text_dim = model.text_max_length, config["text_dim"]

    class MetaText:
        def encode_batch(self, prompts):
            return torch.empty(len(prompts), text_len, text_dim, device="meta")

    cfg = settings_from(DMDConfig, {**tc.section("dmd"), "batch": batch}, "dmd")
    trainer = DMDTrainer(generator, teacher, MetaText(), tc.model_cfg, cfg, latents, ["a prompt"])
    x0_data, captions = trainer._batch()
    positive = trainer.text.encode_batch(captions)
    negative = trainer.text.encode_batch(["a negative"])
    x0 = trainer.generate(x0_data, positive, negative if cfg.nasa_t else None, cfg.alpha_max)
    x_t, t, _ = trainer._noise_for_score(x0)
    real = trainer.real_x0(x_t, t, positive, negative, cfg.kappa_max)
    fake = trainer.fake_x0(x_t, t, positive)
    shapes = {"latents": list(x0_data.shape), "generator_x0": list(x0.shape), "real_x0": list(real.shape),
              "fake_x0": list(fake.shape), "teacher_forcing_tokens": int(trainer.mask_tokens)}
    for name, shape in shapes.items():
        if name.endswith("x0") and shape != shapes["latents"]:
            raise UserError(f"dry run: {name} has shape {shape}, expected {shapes['latents']}")
    parameters = parameter_count(tc.model_cfg)
    state = {f"{n} GPU{'s' if n > 1 else ''}": training_state_gib(parameters, bool(cfg.ema), n) for n in (1, 8, 64)}
    return {"model": tc.model, "parameters_per_network": parameters, "shapes": shapes,
            "training_state_gib_per_gpu": state,
            "not_counted": "activations (with gradient checkpointing: each layer's input and one layer's "
                           "internals), the bf16 text encoder, one Wan block's all-gathered weights",
            "attention_mask": "flex-attention BlockMask on CUDA (dense on meta for this check)",
            "nasa_t": cfg.nasa_t}


def _checkpoint_path(out: Path, stage: str, ctx) -> Path:
    """The run's checkpoint in `out` (<stage>.pt, or the sharded <stage>.ckpt under torchrun), refusing a folder
    that holds the other kind: a run is resumed the way it was started, its random streams belong to its ranks."""
    out.mkdir(parents=True, exist_ok=True)
    mine, other = (f"{stage}.pt", f"{stage}.ckpt") if ctx is None else (f"{stage}.ckpt", f"{stage}.pt")
    if ctx is None:
        mixed = sharded_checkpoint(out / other) is not None
    else:
        mixed = ctx.from_main((out / other).exists())
    if mixed:
        raise UserError(f"{out} holds a {'torchrun' if ctx is None else 'one-process'} run ({other}): resume it "
                        f"{'under torchrun with the same --nproc_per_node' if ctx is None else 'without torchrun'}, "
                        f"or choose another --out")
    return out / mine


def train_from_config(config: str | os.PathLike, out: str | os.PathLike, progress: bool = True,
                      stage: str = "dmd") -> dict:
    """A training stage from a YAML, on one device or under torchrun (FSDP2 per Wan block, one process per
    GPU, each rank its own clips and noise). CUDA: bf16 autocast over fp32 weights, a bf16 text encoder, gradient
    checkpointing when asked. stage: dmd or ode. Keys: model, generator (student checkpoint, or for the ODE
    stage the teacher's weights it starts from), teacher (real-score weights: a checkpoint or a
    diffusers transformer folder; default: the student's), wan (VAE/text folder for real models), data.latents
    (DMD: a ClipFolder of latents) or data.trajectories (ODE: a ClipFolder written by `train ode-pairs`),
    dmd (DMDConfig) or ode (ODEConfig), gradient_checkpointing."""
    import json

    from omegaconf import OmegaConf

    from ..loading import build_generator, resolve_device
    from ..model.checkpoint import save_generator
    from .distributed import finish, full_state_dict, init_from_env

    if stage not in ("dmd", "ode"):
        raise UserError(f"stage must be dmd or ode, not {stage!r}")
    tc = TrainingConfig.load(config)
    model_cfg = tc.model_cfg
    ctx = init_from_env()
    device = ctx.device if ctx is not None else resolve_device(tc.device)
    settings = settings_from(DMDConfig if stage == "dmd" else ODEConfig, tc.section(stage), stage)
    settings.check()
    data = ClipFolder(tc.latents if stage == "dmd" else tc.trajectories, "latents" if stage == "dmd" else "trajectory")
    # The ODE stage starts the student from the teacher's weights unless given a generator.
    start = tc.generator or (tc.teacher if stage == "ode" else None)
    if stage == "dmd":
        tc.require_weights("generator", "the ODE-initialised student's checkpoint")
    else:
        tc.require_weights("teacher", "the bidirectional teacher's weights, the student's start")
    generator = build_generator(model_cfg, device, torch.float32, start)
    text = frozen_text(model_cfg, device, tc.wan)
    data.check_captions(text)
    if stage == "dmd":
        teacher = build_generator(model_cfg, device, torch.float32, tc.teacher or tc.generator)
        trainer = DMDTrainer(generator, teacher, text, model_cfg, settings, data, [], dist=ctx)
    else:
        trainer = ODETrainer(generator, text, model_cfg, settings, data, dist=ctx)
    if tc.gradient_checkpointing:
        for net in (trainer.generator, getattr(trainer, "fake", None)):
            if net is not None:
                net.enable_gradient_checkpointing()
    out = Path(out)
    with autocast_for(device):
        log = trainer.run(_checkpoint_path(out, stage, ctx), progress=progress)
    final = trainer.ema if getattr(trainer, "ema", None) is not None else trainer.generator
    weights = full_state_dict(final) if ctx is not None else final.state_dict()  # a collective under torchrun
    last = {k: v for k, v in (log[-1] if log else {}).items() if k.endswith("loss")}
    summary = {"stage": stage, "steps": trainer.step, **{f"{k}_last": v for k, v in last.items()},
               "nasa_t": bool(getattr(trainer.cfg, "nasa_t", False)), "world_size": ctx.world_size if ctx else 1,
               "config": OmegaConf.to_container(tc.raw)}
    if ctx is None or ctx.is_main:
        save_generator(weights, out / "generator.safetensors", "diffusers")
        save_generator(weights, out / "model.pt", "causvid")  # upstream CausVid's layout too
        (out / f"{stage}.json").write_text(json.dumps(summary, indent=2))
    finish(ctx)
    return summary


def make_ode_pairs(config: str | os.PathLike, prompts: list[str], out: str | os.PathLike,
                   progress: bool = True) -> int:
    """Teacher ODE trajectories for the ODE stage, one file per prompt (<index>.safetensors: "trajectory"
    [S + 1, C, F, h, w], the caption in its metadata). The noise of prompt i is seeded by (seed, i), so the
    files do not depend on how the work is split: under torchrun each rank takes every world_size-th prompt
    (no process group needed). Written atomically; existing files are kept, so a killed run resumes.
    Keys of the YAML: model, teacher, wan, device, ode_pairs {steps_per_segment, spacing, guidance_scale, seed,
    unconditional}. Returns how many files this rank wrote."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..eval.jobs import generation_device, rank_and_world
    from ..loading import build_generator, resolve_device

    tc = TrainingConfig.load(config)
    model_cfg, model = tc.model_cfg, tc.settings
    spec = ODEPairsConfig.from_section(tc.section("ode_pairs"), tc.path)
    tc.require_weights("teacher", "the bidirectional teacher's weights")
    student_steps = list(model.student_steps)
    sigma_path(model.flow, student_steps, spec.steps_per_segment, spec.spacing)  # checked before loading anything
    rank, world = rank_and_world()
    if torch.cuda.is_available():
        device = torch.device(generation_device())
        torch.cuda.set_device(device)  # every rank on its own GPU, not all on cuda:0
    else:
        device = resolve_device(tc.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(prompts)) if i % world == rank and not (out / f"{i:06d}.safetensors").exists()]
    if not todo:
        return 0
    text = frozen_text(model_cfg, device, tc.wan)
    for i in todo:
        if text.token_count(prompts[i]) > text.max_length:
            raise UserError(f"prompt {i} is {text.token_count(prompts[i])} tokens, over the text encoder's "
                            f"{text.max_length}; shorten it: {prompts[i][:60]!r}")
    teacher = build_generator(model_cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                              tc.teacher)
    shape = (1, teacher.config.in_channels, model.latent_frames, *model.latent_hw)
    with torch.no_grad():
        unconditional = text.encode_batch([spec.unconditional])
    for i in tqdm(todo, desc=f"ode pairs (rank {rank})", unit="clip", disable=not progress):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(spec.seed * 1_000_003 + i))
        with torch.no_grad(), autocast_for(device):
            trajectory = teacher_ode_trajectory(teacher, text.encode_batch([prompts[i]]), unconditional,
                                                noise.to(device), model.flow, student_steps, spec.steps_per_segment,
                                                spec.guidance_scale, model.prediction, spec.spacing)
        path = out / f"{i:06d}.safetensors"
        tmp = path.with_name(f".{path.name}.partial")
        save_file({"trajectory": trajectory[0].float().cpu().contiguous()}, str(tmp), metadata={"caption": prompts[i]})
        os.replace(tmp, path)
    return len(todo)
