"""Train the bundled model from a seed: latents (exact codec) -> teacher -> student.

The world's caption fixes its picture (nasa_video/toy/world.py), so the student needs no teacher trajectories:
it learns to denoise the data itself at its own few steps, block by block with clean frames as context
(CausVid's teacher-forcing initialisation, with data in place of ODE end points). The teacher (multi-step,
bidirectional) trains the text encoder, starts the student, and serves NASA-T distillation.

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

from ..train.ode import ode_regression_loss
from ..config import model_spec
from ..loading import load_config
from ..model.cache import PromptEmbeddings, TextCache
from ..model.causal_wan import teacher_forcing_mask
from ..guidance import NASA, NoGuidance
from ..model.interface import build_from_config
from ..schedule import FlowSchedule, output_to_velocity, prediction_of, sampling_schedule
from .detect import agreement, detect
from .text import load_toy_text_encoder, new_toy_text_encoder, save_toy_text_encoder
from .world import degrade, render, sample_scene, visibility

SMOKE = {"data": {"clips": 8}, "teacher": {"steps": 2, "batch": 4, "warmup": 1},
         "student": {"steps": 2, "batch": 2, "warmup": 1,
                     "nasa_t": {"from_step": 1, "share": 0.5, "clips": 8, "late_share": 0.5},
                     "switch": {"share": 0.5, "clips": 8}}}


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


def save_checkpoint(path: Path, state: dict) -> None:
    """Written beside and renamed over: a run stopped mid-write keeps the previous checkpoint."""
    tmp = path.with_suffix(".partial")
    torch.save(state, tmp)
    tmp.replace(path)


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


@torch.no_grad()
def encode_dataset(vae, tc, rng, clips: int, latent_frames: int):
    latents, captions = [], []
    frames = encodable(tc.clip_frames)
    for start in tqdm(range(0, clips, 16), desc="encode", unit="batch"):
        scenes = [sample_scene(rng, frames, training=True) for _ in range(min(16, clips - start))]
        pixels = torch.stack([to_pixels(render(s, frames)[0]) for s in scenes])
        latents.append(vae.encode(pixels)[:, :, :latent_frames])
        captions += [s.caption for s in scenes]
    return torch.cat(latents), captions


@torch.no_grad()
def make_removals(vae, rng, clips: int, frames: int, latent_frames: int, late_share: float = 0.0,
                  block: int = 3, kinds: dict[str, float] | None = None) -> dict:
    """NASA-T's exact targets: scenes of two to four objects, one of them named as the negative, and the latents
    of the same scene drawn without it. A `late_share` of them have the negative arrive after the first block
    (`block` latent frames): the target keeps the object in that block (the context a stream has cached) and
    drops it from the next, and the loss counts the blocks from the change on (from_block). kinds: shares of the
    negative's kind (removal.KINDS' names: object, colour, shape, absent, absent-shared; default all object),
    the target being the scene without what it names (judge.expected_scene: an absent one names nothing).
    Returns {"latents", "captions", "negatives", "from_block"}."""
    from .judge import expected_scene
    from .removal import negative_of_kind
    from .world import Scene, caption_for

    kinds = kinds or {"object": 1.0}
    kind_names, kind_p = list(kinds), np.array(list(kinds.values()), np.float64) / sum(kinds.values())

    latents, captions, negatives, from_block = [], [], [], []
    frames = encodable(frames)
    for start in tqdm(range(0, clips, 16), desc="removals", unit="batch"):
        scenes, kept = [], []
        while len(scenes) < min(16, clips - start):
            scene = sample_scene(rng, training=True)
            if len(scene.things) < 2:
                continue
            if kind_names == ["object"]:  # the draws of the shipped weights' recipe
                drop = int(rng.integers(len(scene.things)))
                negative = scene.things[drop].name
            else:
                negative = negative_of_kind(str(rng.choice(kind_names, p=kind_p)), scene.names, rng)
                if negative is None:  # this scene cannot ask that kind
                    continue
                negative = negative[0]
            others = expected_scene(scene, [negative])[0].things
            scenes.append(scene)
            kept.append(Scene(others, caption_for(others)))
            negatives.append(negative)
            from_block.append(int(late_share > 0 and rng.random() < late_share))
        target = vae.encode(torch.stack([to_pixels(render(s, frames)[0]) for s in kept]))[:, :, :latent_frames]
        late = torch.tensor(from_block[start:start + len(scenes)], dtype=torch.bool)
        if late.any():  # the first block as drawn with the object, the rest without
            full = vae.encode(torch.stack([to_pixels(render(s, frames)[0]) for s in scenes]))[:, :, :latent_frames]
            target[late, :, :block] = full[late, :, :block]
        latents.append(target)
        captions += [s.caption for s in scenes]
    return {"latents": torch.cat(latents), "captions": captions, "negatives": negatives, "from_block": from_block}


@torch.no_grad()
def make_switches(vae, rng, clips: int, frames: int, latent_frames: int, block: int = 3) -> dict:
    """Prompt switches mid-clip: a scene for the first block (`block` latent frames), then the same scene with one
    more object (one that may share it, the same motion) named by the new caption. The student
    regresses it under the new caption, the first block as context only. Neither scene is a held-out
    composition. Returns {"latents", "captions", "from_block"} (from_block: 1 each)."""
    from .world import LINE, MAX_OBJECTS, Scene, Thing, caption_for, compatible, held_out

    latents, captions = [], []
    frames = encodable(frames)
    for start in tqdm(range(0, clips, 16), desc="switches", unit="batch"):
        before, after = [], []
        while len(before) < min(16, clips - start):
            scene = sample_scene(rng, training=True)
            free = [n for n in LINE if n not in scene.names and compatible(scene.names + [n])]
            if len(scene.things) >= MAX_OBJECTS or not free:
                continue
            added = Thing(*str(rng.choice(free)).split(), scene.things[0].motion)
            things = scene.things + (added,)
            if held_out(t.name for t in things):
                continue
            before.append(scene)
            after.append(Scene(things, caption_for(things)))
        old = vae.encode(torch.stack([to_pixels(render(s, frames)[0]) for s in before]))[:, :, :latent_frames]
        new = vae.encode(torch.stack([to_pixels(render(s, frames)[0]) for s in after]))[:, :, :latent_frames]
        new[:, :, :block] = old[:, :, :block]
        latents.append(new)
        captions += [s.caption for s in after]
    return {"latents": torch.cat(latents), "captions": captions, "from_block": [1] * len(captions)}


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


def degraded_agreement(rng, videos: int, frames: int) -> dict[str, float]:
    """The detector on renders made to look generated (world.render jitter + world.degrade): its agreement with
    ground truth, the mean corruption it reads (degradation alone should read as clean), and the share of videos
    the removal benchmark's consistency rule passes, on them and on the same scenes rendered exactly (its
    calibration: each degraded frame's shape is jittered on its own, up to a pixel off its path and 10% off its
    size, so a strict rule fails some)."""
    from .detect import corruption, regions
    from .removal import video_consistent

    scores, corrupt, consistent, exact = [], [], [], []
    for _ in range(videos):
        scene = sample_scene(rng)
        clean, labels = render(scene, frames, jitter=rng)
        video = degrade(clean, rng)
        scores.append(agreement(detect(video), visibility(scene, labels)))
        corrupt.append(corruption(video))
        consistent.append(video_consistent(regions(video)))
        exact.append(video_consistent(regions(render(scene, frames)[0])))
    return {"agreement": float(np.mean(scores)), "corruption": float(np.mean(corrupt)),
            "consistent": float(np.mean(consistent)), "consistent_exact": float(np.mean(exact))}


def new_generator(model_cfg, seed):
    torch.manual_seed(seed)
    return build_from_config(model_cfg)


def train_teacher(model_cfg, tc, latents, captions, text, rng, log, checkpoint: Path | None = None):
    flow, _ = sampling_schedule(model_cfg)
    device = text.device
    model = new_generator(model_cfg, tc.seed + 2).to(device).train()
    text.encoder.train().requires_grad_(True)
    params = list(model.parameters()) + list(text.encoder.parameters())
    opt = torch.optim.AdamW(params, lr=tc.teacher.lr, weight_decay=0.01)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text.encoder).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(tc.seed + 3)
    losses, first = [], 0
    frames = latents.shape[2]
    prediction = prediction_of(model_cfg)
    nets = {"model": model, "text": text.encoder, "ema": ema, "ema_text": ema_text, "opt": opt}
    if checkpoint is not None and checkpoint.exists():  # resume: every state the next step depends on
        state = torch.load(checkpoint, weights_only=True)
        for name, net in nets.items():
            net.load_state_dict(state[name])
        gen.set_state(state["gen"]), setattr(rng.bit_generator, "state", state["rng"])
        torch.set_rng_state(state["torch_rng"])  # the text encoder's dropout draws from it
        losses, first = list(state["losses"]), int(state["step"])
    for step in tqdm(range(first, tc.teacher.steps), desc="teacher", unit="step", initial=first,
                     total=tc.teacher.steps):
        set_lr(opt, lr_at(step, tc.teacher.steps, tc.teacher.lr, tc.teacher.warmup))
        idx = torch.randint(len(latents), (tc.teacher.batch,), generator=gen)
        x0 = latents[idx].to(device)
        prompts = [captions[i] if rng.random() >= tc.teacher.caption_dropout else "" for i in idx.tolist()]
        u = torch.rand(len(idx), generator=gen)  # random draws on the CPU: the same numbers on any device
        sigma = flow.shifted(u).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
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
        if checkpoint is not None and ((step + 1) % tc.teacher.checkpoint_every == 0 or step + 1 == tc.teacher.steps):
            save_checkpoint(checkpoint, {**{k: v.state_dict() for k, v in nets.items()}, "gen": gen.get_state(),
                                         "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                                         "losses": losses, "step": step + 1})
    log["teacher_loss_last50"] = float(np.mean(losses[-50:]))
    text.encoder = ema_text
    return ema


@torch.no_grad()
def encode_all(text, prompts: list[str], chunk: int = 256) -> torch.Tensor:
    """Every prompt's embeddings [N, L, C], encoded a chunk at a time (the whole dataset at once is too large)."""
    return torch.cat([text.encode_batch(prompts[i:i + chunk]) for i in range(0, len(prompts), chunk)])


def student_states(x0: torch.Tensor, student_steps: torch.Tensor, flow: FlowSchedule, gen: torch.Generator):
    """[B, S+1, C, F, H, W]: the clean video noised to each student step (fresh noise each), then the video itself:
    the shape of a teacher trajectory, so the student's regression (ode_regression_loss) reads it unchanged."""
    sigmas = flow.sigma(student_steps).float()
    noise = torch.randn((x0.shape[0], len(sigmas), *x0.shape[1:]), generator=gen)
    s = sigmas.view(1, -1, 1, 1, 1, 1)
    return torch.cat([(1 - s) * x0[:, None] + s * noise, x0[:, None]], 1)


def train_student(teacher, text, model_cfg, tc, latents, captions, log, checkpoint: Path | None = None,
                  removals: dict | None = None, switches: dict | None = None):
    """The block-causal few-step student, from the teacher: each block at a random student step, clean frames
    before it as context (teacher forcing), x0 regressed onto the data; captions dropped like the teacher's so
    CFG has its unconditional branch. Saves its state every tc.student.checkpoint_every steps and resumes.

    NASA-T with exact targets (from step tc.student.nasa_t.from_step, a share of the steps): the forward runs NASA
    in its cross-attention (Z+ - alpha Z-, alpha drawn per step) with the caption as the positive and one of its
    objects as the negative, and regresses the same scene rendered without that object (removals: make_removals).
    DMD's NASA-T learns the same thing from a teacher's scores; this world has the answer itself. Removals whose
    negative arrives after the first block (from_block 1) teach a stream to take out an object it has drawn.

    Prompt switches (switches: make_switches; tc.student.switch.share of the steps from nasa_t.from_step): the
    first block of one scene as context, the next under a caption naming one more object, regressed onto the
    scene with it."""
    flow, steps = sampling_schedule(model_cfg)  # the steps it samples (warped when the config says so)
    steps = torch.tensor(steps, dtype=torch.float32)
    device = text.device
    student = copy.deepcopy(teacher).to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=tc.student.lr, weight_decay=0.01)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    fpb = model_spec(model_cfg).video.frames_per_block
    _, _, frames, h, w = latents.shape
    mask = teacher_forcing_mask(frames, fpb, student.tokens_per_frame(h, w)).to(device)
    positions = torch.cat([torch.arange(frames), torch.arange(frames)]).to(device)
    gen = torch.Generator().manual_seed(tc.seed + 7)
    losses, first = [], 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        student.load_state_dict(state["student"]), ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"]), gen.set_state(state["gen"])
        losses, first = list(state["losses"]), int(state["step"])
    contexts, empty = encode_all(text, captions), encode_all(text, [""])
    if removals is not None:
        removal_contexts = encode_all(text, removals["captions"])
        negative_contexts = encode_all(text, removals["negatives"])
        removal_from = torch.tensor(removals.get("from_block", [0] * len(removals["captions"])))
    if switches is not None:
        switch_contexts, switch_from = encode_all(text, switches["captions"]), torch.tensor(switches["from_block"])
    nasa_t, switch = tc.student.get("nasa_t"), tc.student.get("switch")
    for step in tqdm(range(first, tc.student.steps), desc="student", unit="step", initial=first,
                     total=tc.student.steps):
        set_lr(opt, lr_at(step, tc.student.steps, tc.student.lr, tc.student.warmup))
        from_block = None
        # one draw per step decides its kind (a removal, a switch, or the data), so adding switches keeps the
        # removal steps' share
        kind = float(torch.rand(1, generator=gen)) if removals is not None and step >= nasa_t.from_step else 1.0
        if removals is not None and kind < nasa_t.share:
            idx = torch.randint(len(removals["latents"]), (tc.student.batch,), generator=gen)
            alpha = float(nasa_t.alpha[0] + (nasa_t.alpha[1] - nasa_t.alpha[0]) * torch.rand(1, generator=gen))
            prompts = PromptEmbeddings(removal_contexts[idx.to(device)], [negative_contexts[idx.to(device)]])
            guidance = (NASA(), [alpha])
            target = removals["latents"][idx]
            from_block = removal_from[idx] if bool(removal_from[idx].any()) else None
        elif switches is not None and kind < nasa_t.share + switch.share:
            idx = torch.randint(len(switches["latents"]), (tc.student.batch,), generator=gen)
            prompts = PromptEmbeddings(switch_contexts[idx.to(device)])
            guidance = (NoGuidance(), [])
            target, from_block = switches["latents"][idx], switch_from[idx]
        else:
            idx = torch.randint(len(latents), (tc.student.batch,), generator=gen)
            dropped = torch.rand(len(idx), generator=gen) < tc.student.caption_dropout
            prompts = PromptEmbeddings(torch.where(dropped[:, None, None].to(device), empty, contexts[idx.to(device)]))
            guidance = (NoGuidance(), [])
            target = latents[idx]
        k = torch.randint(len(steps), (len(idx), frames // fpb), generator=gen)
        states = student_states(target, steps, flow, gen).to(device)
        loss = ode_regression_loss(student, prompts, states, k, steps, flow, prediction_of(model_cfg), mask,
                                   positions, fpb, *guidance, from_block=from_block)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for p, q in zip(student.parameters(), ema.parameters()):
                q.lerp_(p, 1 - tc.student.ema)
        losses.append(loss.item())
        if checkpoint is not None and ((step + 1) % tc.student.checkpoint_every == 0 or step + 1 == tc.student.steps):
            save_checkpoint(checkpoint, {"student": student.state_dict(), "ema": ema.state_dict(),
                                         "opt": opt.state_dict(), "gen": gen.get_state(), "losses": losses,
                                         "step": step + 1})
    log["student_loss_last50"] = float(np.mean(losses[-50:]))
    ema.set_guidance(NoGuidance())
    return ema


def train_toy(out: str | Path, seed: int | None = None, smoke: bool = False, overrides: dict | None = None,
              device: str = "cpu") -> dict:
    """overrides: merged into configs/toy_train.yaml (for example {"teacher": {"steps": 300}}). device: where the
    networks train; every random draw is made on the CPU, so a GPU run follows the same data and noise."""
    from safetensors.torch import save_file

    from ..loading import resolve_device

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    model_cfg = load_config("toy")
    tc = OmegaConf.load(Path(__file__).parents[1] / "configs" / "toy_train.yaml")
    if smoke:
        tc = OmegaConf.merge(tc, OmegaConf.create(SMOKE))
    if overrides:
        tc = OmegaConf.merge(tc, OmegaConf.create(overrides))
    if seed is not None:
        tc.seed = seed
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    log: dict = {"seed": int(tc.seed), "smoke": smoke, "device": str(device), "torch_threads": torch.get_num_threads()}
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
        latents, captions = encode_dataset(vae, tc, rng, int(tc.data.clips), model_spec(model_cfg).video.latent_frames)
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
        text = load_toy_text_encoder(out / "text", device)
        teacher = new_generator(model_cfg, 0)
        teacher.load_state_dict(load_file(str(out / "teacher.safetensors")))
        teacher.to(device)
        teacher.eval().requires_grad_(False)
        log.update(json.loads((cache / "teacher.json").read_text()))
    else:
        text = new_toy_text_encoder(OmegaConf.to_container(tc.text.config),
                                    model_spec(model_cfg).weights.text_max_length, tc.seed + 1)
        text.encoder.to(device)
        teacher = train_teacher(model_cfg, tc, latents, captions, text, rng, log, cache / "teacher.pt")
        save_file({k: v.cpu().contiguous() for k, v in teacher.state_dict().items()}, str(out / "teacher.safetensors"))
        save_toy_text_encoder(text, out / "text")
        (cache / "teacher.json").write_text(json.dumps({"teacher_loss_last50": log["teacher_loss_last50"]}))
        tqdm.write(f"teacher: loss {log['teacher_loss_last50']:.4f}, {time.perf_counter() - began:.0f}s")
    timings["teacher"] = time.perf_counter() - began
    text.encoder.eval().requires_grad_(False)

    began = time.perf_counter()
    removals, fpb = None, model_spec(model_cfg).video.frames_per_block
    if tc.student.get("nasa_t"):
        if (cache / "removals.safetensors").exists():
            removals = {"latents": load_file(str(cache / "removals.safetensors"))["latents"],
                        **json.loads((cache / "removals.json").read_text())}
        else:
            removals = make_removals(vae, np.random.default_rng([tc.seed, 5]), int(tc.student.nasa_t.clips),
                                     tc.clip_frames, model_spec(model_cfg).video.latent_frames,
                                     float(tc.student.nasa_t.get("late_share", 0.0)), fpb,
                                     dict(tc.student.nasa_t.get("kinds") or {"object": 1.0}))
            save_file({"latents": removals["latents"].contiguous()}, str(cache / "removals.safetensors"))
            (cache / "removals.json").write_text(json.dumps({k: removals[k] for k in
                                                             ("captions", "negatives", "from_block")}))
    switches = None
    if tc.student.get("switch") and float(tc.student.switch.share) > 0:
        if (cache / "switches.safetensors").exists():
            switches = {"latents": load_file(str(cache / "switches.safetensors"))["latents"],
                        **json.loads((cache / "switches.json").read_text())}
        else:
            switches = make_switches(vae, np.random.default_rng([tc.seed, 6]), int(tc.student.switch.clips),
                                     tc.clip_frames, model_spec(model_cfg).video.latent_frames, fpb)
            save_file({"latents": switches["latents"].contiguous()}, str(cache / "switches.safetensors"))
            (cache / "switches.json").write_text(json.dumps({k: switches[k] for k in ("captions", "from_block")}))
    student = train_student(teacher, text, model_cfg, tc, latents, captions, log, cache / "student.pt", removals,
                            switches)
    timings["student"] = time.perf_counter() - began
    log["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    log["seconds_total"] = round(sum(timings.values()), 1)

    save_file({k: v.cpu().contiguous() for k, v in student.state_dict().items()}, str(out / "generator.safetensors"))
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
