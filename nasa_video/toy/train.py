"""Train the bundled model from a seed: latents (exact codec) -> teacher -> ODE trajectories -> student.

    nasa-video train toy [--out FOLDER] [--seed 0] [--smoke]

Every stage runs on the CPU; the numbers live in configs/toy_train.yaml and configs/toy.yaml. The output
folder holds what nasa_video/toy/weights ships: generator.safetensors (the student), teacher.safetensors,
codec/, text/, training.json (losses, timings, detector agreement); cache/ holds the intermediate data.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from ..train.ode import ode_regression_loss, teacher_ode_trajectory
from ..loading import load_config
from ..model.cache import PromptEmbeddings, TextCache
from ..model.causal_wan import teacher_forcing_mask
from ..model.interface import build_from_config
from ..schedule import FlowSchedule, output_to_velocity, prediction_of
from .detect import agreement, detect
from .text import load_toy_text_encoder, new_toy_text_encoder, save_toy_text_encoder
from .world import render, sample_scene, visibility

SMOKE = {"data": {"clips": 8},
         "teacher": {"steps": 2, "batch": 4, "warmup": 1}, "ode": {"trajectories": 4, "batch": 4,
                                                                  "steps_per_segment": [1, 1, 2]},
         "student": {"steps": 2, "batch": 2, "warmup": 1}}


def to_pixels(video: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(video).permute(3, 0, 1, 2).float() / 127.5 - 1


def encodable(frames: int) -> int:
    """diffusers' Wan encoder reads a first frame and then chunks of 4: round up to 1 + 4k frames."""
    return 1 + 4 * math.ceil((frames - 1) / 4)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


@torch.no_grad()
def encode_dataset(vae, tc, rng, clips: int, latent_frames: int):
    latents, captions = [], []
    frames = encodable(tc.clip_frames)
    for start in tqdm(range(0, clips, 16), desc="encode", unit="batch"):
        scenes = [sample_scene(rng, frames) for _ in range(min(16, clips - start))]
        pixels = torch.stack([to_pixels(render(s, frames)[0]) for s in scenes])
        latents.append(vae.encode(pixels)[:, :, :latent_frames])
        captions += [s.caption for s in scenes]
    return torch.cat(latents), captions


@torch.no_grad()
def codec_agreement(vae, rng, videos: int, frames: int) -> float:
    """Detector vs ground truth on codec reconstructions (through the streaming decoder, as generation does)."""
    from ..vae import streaming_decoder, to_uint8

    decoder = streaming_decoder(vae)
    frames = encodable(frames)
    scores = []
    for _ in range(videos):
        scene = sample_scene(rng, frames)
        video, labels = render(scene, frames)
        decoder.reset()
        recon = to_uint8(decoder.decode(vae.encode(to_pixels(video)[None])))[0].numpy()
        scores.append(agreement(detect(recon), visibility(scene, labels)))
    return float(np.mean(scores))


def new_generator(model_cfg, seed):
    torch.manual_seed(seed)
    return build_from_config(model_cfg)


def train_teacher(model_cfg, tc, latents, captions, text, rng, log):
    flow = FlowSchedule(float(model_cfg.sampling.shift))
    model = new_generator(model_cfg, tc.seed + 2).train()
    text.encoder.train().requires_grad_(True)
    params = list(model.parameters()) + list(text.encoder.parameters())
    opt = torch.optim.AdamW(params, lr=tc.teacher.lr, weight_decay=0.01)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text.encoder).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(tc.seed + 3)
    losses = []
    frames = latents.shape[2]
    prediction = prediction_of(model_cfg)
    for step in tqdm(range(tc.teacher.steps), desc="teacher", unit="step"):
        set_lr(opt, lr_at(step, tc.teacher.steps, tc.teacher.lr, tc.teacher.warmup))
        idx = torch.randint(len(latents), (tc.teacher.batch,), generator=gen)
        x0 = latents[idx]
        prompts = [captions[i] if rng.random() >= tc.teacher.caption_dropout else "" for i in idx.tolist()]
        u = torch.rand(len(idx), generator=gen)
        sigma = flow.shifted(u)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma[:, None, None, None, None]
        x_t = (1 - s) * x0 + s * noise
        t = (sigma * flow.num_train_timesteps)[:, None].expand(-1, frames)
        model.set_text(TextCache(model, text.encode_batch(prompts)))
        # The loss is on v either way; an x0-predicting network is converted first (Li & He 2025).
        loss = F.mse_loss(output_to_velocity(model(x_t, t), x_t, s, prediction), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for net, avg in ((model, ema), (text.encoder, ema_text)):
                for p, q in zip(net.parameters(), avg.parameters()):
                    q.lerp_(p, 1 - tc.teacher.ema)
        losses.append(loss.item())
    log["teacher_loss_last50"] = float(np.mean(losses[-50:]))
    text.encoder = ema_text
    return ema


@torch.no_grad()
def teacher_trajectories(teacher, text, model_cfg, tc, rng, frames: int, hw: tuple[int, int]):
    """x at each student timestep and the final x0, sampled by the teacher with CFG (Euler)."""
    flow = FlowSchedule(float(model_cfg.sampling.shift))
    gen = torch.Generator().manual_seed(tc.seed + 5)
    empty = text.encode_batch([""])
    trajectories, captions = [], []
    for start in tqdm(range(0, tc.ode.trajectories, tc.ode.batch), desc="trajectories", unit="batch"):
        n = min(tc.ode.batch, tc.ode.trajectories - start)
        prompts = [sample_scene(rng, tc.clip_frames).caption for _ in range(n)]
        noise = torch.randn(n, teacher.config.in_channels, frames, *hw, generator=gen)
        trajectories.append(teacher_ode_trajectory(
            teacher, text.encode_batch(prompts), empty.expand(n, -1, -1), noise, flow, list(model_cfg.sampling.steps),
            list(tc.ode.steps_per_segment), float(tc.ode.cfg), prediction_of(model_cfg)))
        captions += prompts
    trajectories = torch.cat(trajectories)
    return trajectories[:, :-1], trajectories[:, -1], captions


def train_student(teacher, text, model_cfg, tc, states, finals, captions, log):
    """ODE regression (nasa_video.train.ode.ode_regression_loss) with this world's warm-up schedule."""
    flow = FlowSchedule(float(model_cfg.sampling.shift))
    steps = torch.tensor(list(model_cfg.sampling.steps), dtype=torch.float32)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=tc.student.lr, weight_decay=0.01)
    fpb = int(model_cfg.video.frames_per_block)
    _, _, _, frames, h, w = states.shape
    mask = teacher_forcing_mask(frames, fpb, student.tokens_per_frame(h, w))
    positions = torch.cat([torch.arange(frames), torch.arange(frames)])
    gen = torch.Generator().manual_seed(tc.seed + 7)
    losses = []
    with torch.no_grad():
        contexts = torch.cat([text.encode_batch(captions[i:i + 256]) for i in range(0, len(captions), 256)])
    for step in tqdm(range(tc.student.steps), desc="student", unit="step"):
        set_lr(opt, lr_at(step, tc.student.steps, tc.student.lr, tc.student.warmup))
        idx = torch.randint(len(states), (tc.student.batch,), generator=gen)
        k = torch.randint(len(steps), (len(idx), frames // fpb), generator=gen)
        trajectory = torch.cat([states[idx], finals[idx][:, None]], 1)
        loss = ode_regression_loss(student, PromptEmbeddings(contexts[idx]), trajectory, k, steps, flow,
                                   prediction_of(model_cfg), mask, positions, fpb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    log["student_loss_last50"] = float(np.mean(losses[-50:]))
    return student.eval().requires_grad_(False)


def train_toy(out: str | Path, seed: int | None = None, smoke: bool = False) -> dict:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = load_config("toy")
    tc = OmegaConf.load(Path(__file__).parents[1] / "configs" / "toy_train.yaml")
    if smoke:
        tc = OmegaConf.merge(tc, OmegaConf.create(SMOKE))
    if seed is not None:
        tc.seed = seed
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    log: dict = {"seed": int(tc.seed), "smoke": smoke, "torch_threads": torch.get_num_threads()}
    timings = {}

    # Each stage leaves its result in the output folder; a rerun (after a crash, or to retrain only the later
    # stages) picks up from the first missing one.
    from safetensors.torch import load_file

    from .codec import ShuffleCodec

    cache = out / "cache"
    cache.mkdir(exist_ok=True)
    began = time.perf_counter()
    # Each stage leaves its result in the output folder; a rerun picks up from the first missing one.
    # Every stage seeds its own generators, so a resumed run equals an uninterrupted one.
    if (cache / "latents.safetensors").exists():
        vae = ShuffleCodec.load(out / "codec")
        latents = load_file(str(cache / "latents.safetensors"))["latents"]
        captions = json.loads((cache / "captions.json").read_text())
        log.update(json.loads((cache / "codec.json").read_text()))
    else:
        vae = ShuffleCodec()
        latents, captions = encode_dataset(vae, tc, rng, int(tc.data.clips), int(model_cfg.video.latent_frames))
        mean, std = latents.mean(dim=(0, 2, 3, 4)), latents.std(dim=(0, 2, 3, 4))
        vae = ShuffleCodec(3, mean.tolist(), std.tolist())
        latents = (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
        log["codec_detector_agreement"] = codec_agreement(vae, np.random.default_rng([tc.seed, 1]),
                                                          4 if smoke else 100, tc.clip_frames)
        vae.save(out / "codec")
        save_file({"latents": latents.contiguous()}, str(cache / "latents.safetensors"))
        (cache / "captions.json").write_text(json.dumps(captions))
        (cache / "codec.json").write_text(json.dumps({"codec_detector_agreement": log["codec_detector_agreement"]}))
        tqdm.write(f"codec: detector agreement on reconstructions {log['codec_detector_agreement']:.4f}")
    rng = np.random.default_rng([tc.seed, 3])
    torch.manual_seed(tc.seed + 200)
    timings["codec_and_data"] = time.perf_counter() - began

    began = time.perf_counter()
    if (out / "teacher.safetensors").exists():
        text = load_toy_text_encoder(out / "text", "cpu")
        teacher = new_generator(model_cfg, 0)
        teacher.load_state_dict(load_file(str(out / "teacher.safetensors")))
        teacher.eval().requires_grad_(False)
        log.update(json.loads((cache / "teacher.json").read_text()))
    else:
        text = new_toy_text_encoder(OmegaConf.to_container(tc.text.config),
                                    int(model_cfg.weights.text_max_length), tc.seed + 1)
        teacher = train_teacher(model_cfg, tc, latents, captions, text, rng, log)
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(out / "teacher.safetensors"))
        save_toy_text_encoder(text, out / "text")
        (cache / "teacher.json").write_text(json.dumps({"teacher_loss_last50": log["teacher_loss_last50"]}))
        tqdm.write(f"teacher: loss {log['teacher_loss_last50']:.4f}, {time.perf_counter() - began:.0f}s")
    timings["teacher"] = time.perf_counter() - began
    text.encoder.eval().requires_grad_(False)

    began = time.perf_counter()
    if (cache / "trajectories.safetensors").exists():
        saved = load_file(str(cache / "trajectories.safetensors"))
        states, finals = saved["states"], saved["finals"]
        ode_captions = json.loads((cache / "trajectory_captions.json").read_text())
    else:
        states, finals, ode_captions = teacher_trajectories(teacher, text, model_cfg, tc, rng, latents.shape[2],
                                                            tuple(latents.shape[3:]))
        save_file({"states": states.contiguous(), "finals": finals.contiguous()},
                  str(cache / "trajectories.safetensors"))
        (cache / "trajectory_captions.json").write_text(json.dumps(ode_captions))
    timings["trajectories"] = time.perf_counter() - began

    began = time.perf_counter()
    student = train_student(teacher, text, model_cfg, tc, states, finals, ode_captions, log)
    timings["student"] = time.perf_counter() - began
    log["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    log["seconds_total"] = round(sum(timings.values()), 1)

    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(out / "generator.safetensors"))
    (out / "training.json").write_text(json.dumps(log, indent=2))
    return log


def export_bundle(out: str | Path, dest: str | Path) -> list[Path]:
    """Copy what the package ships from a training folder: the student (fp32), the teacher (fp16: it only
    serves NASA-T distillation and CFG comparisons), codec/, text/, training.json. Not cache/."""
    import shutil

    from safetensors.torch import load_file, save_file

    out, dest = Path(out), Path(dest)
    missing = [n for n in ("generator.safetensors", "teacher.safetensors", "codec", "text", "training.json")
               if not (out / n).exists()]
    if missing:
        from ..errors import UserError
        raise UserError(f"{out} is not a finished training folder (missing {', '.join(missing)}); "
                        f"run `nasa-video train toy --out {out}` first")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / "generator.safetensors", dest / "generator.safetensors")
    teacher = load_file(str(out / "teacher.safetensors"))
    save_file({k: v.half().contiguous() for k, v in teacher.items()}, str(dest / "teacher.safetensors"))
    for folder in ("codec", "text"):
        shutil.copytree(out / folder, dest / folder, dirs_exist_ok=True)
    shutil.copy2(out / "training.json", dest / "training.json")
    return sorted(p for p in dest.rglob("*") if p.is_file())
