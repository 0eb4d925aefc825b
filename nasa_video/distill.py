"""Distillation of block-causal few-step students, CausVid's two stages, with NASA-T (arXiv 2412.02687).

ODE regression (the first stage): the teacher's CFG ODE trajectories through the student's steps
(teacher_ode_trajectory); the student, started from the teacher's weights, regresses every block at a random
student step onto the trajectory's end (ode_regression_loss, ODETrainer).

DMD (the second stage, DMDTrainer), one iteration in CausVid's recipe (arXiv 2412.07772), flow-matching teacher:
  generator input  each block of a data clip noised to a random student timestep (CausVid trains without
                   backward simulation); the student predicts every block's x0 in one teacher-forcing
                   forward (clean context beside the noisy blocks, the same mask the ODE stage uses).
  critic (every)   the fake score, initialised from the teacher, learns to denoise the student's samples.
  generator (every dfake_gen_update_ratio-th iteration)
                   DMD: noise the student's x0 at t ~ U[min_step, max_step] (shifted), compare the fake score
                   with the real score = teacher with CFG, and step along (fake - real) / mean|x0 - real|.
NASA-T: the real score's CFG uses a sampled negative prompt as its unconditional branch,
    real = real(y-) + kappa (real(y+) - real(y-)),  kappa ~ U(kappa_min, kappa_max) per iteration,
and the student runs NASA with the same negative and alpha ~ U(0, alpha_max) per iteration. Without
NASA-T the unconditional branch is cfg.unconditional and kappa the fixed real_guidance_scale.

Where this departs from upstream CausVid, on purpose: the student's context is the clean frames (teacher
forcing: a clean copy of the clip beside the noisy blocks), as the KV cache holds clean frames at inference,
where CausVid shows each block its noisy predecessors (diffusion forcing) and samples t = 0 blocks among
them; and an EMA of the generator is optional (CausVid has none). So start DMD from this module's ODE stage
(trained the same way) rather than from CausVid's ODE checkpoint if the two should match.

Checkpoints hold the networks, their optimisers, the EMA, the step and every random state, written
atomically; a killed run resumes to the same parameters as an uninterrupted one. Under torchrun the networks
are sharded with FSDP2 and the checkpoints with torch.distributed.checkpoint (nasa_video.distributed).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .distributed import Distributed, load_sharded, rank_seed, save_sharded, shard_transformer, sharded_checkpoint
from .errors import UserError
from .guidance import NASA, NoGuidance
from .model.cache import PromptEmbeddings
from .model.causal_wan import teacher_forcing_block_mask, teacher_forcing_mask
from .schedule import FlowSchedule, output_to_velocity, output_to_x0, prediction_of

@dataclass
class DMDConfig:
    steps: int = 1000
    batch: int = 1
    lr_generator: float = 2e-6        # CausVid's lr (both networks), AdamW betas (0.9, 0.999)
    lr_critic: float = 2e-6
    dfake_gen_update_ratio: int = 5   # a generator update every 5 critic updates (CausVid)
    real_guidance_scale: float = 4.5  # weight w in uncond + w (cond - uncond): CausVid's 3.5 in its
                                      # cond + s (cond - uncond) form; NASA-T's kappa is a w too
    unconditional: str = ""           # the teacher's unconditional prompt without NASA-T (CausVid: Wan's negative)
    min_step: float = 0.02            # DMD noise levels, as fractions of the 1000 train timesteps
    max_step: float = 0.98
    ema: float | None = None          # EMA decay of the generator, or None
    checkpoint_every: int = 100
    seed: int = 0
    nasa_t: bool = False
    alpha_max: float = 1.0            # student alpha ~ U(0, alpha_max)
    kappa_min: float = 0.5            # teacher CFG kappa ~ U(kappa_min, kappa_max)
    kappa_max: float = 4.0
    negatives: list[str] = field(default_factory=list)  # NASA-T's negative prompts (quality terms, object names)
    negative_from_caption: float = 0.0  # bundled world: share of negatives drawn from the clip's own objects
    flex_mask: bool | None = None     # teacher-forcing mask as a flex-attention BlockMask; None: on CUDA above
                                      # 16k tokens (the 1.3B model's 65,520), where a dense mask cannot fit

    def check(self) -> None:
        if self.nasa_t and not (self.negatives or self.negative_from_caption > 0):
            raise UserError("NASA-T needs negative prompts: set negatives (a list) or negative_from_caption > 0")
        if not 0 <= self.kappa_min <= self.kappa_max or self.alpha_max < 0:
            raise UserError("need 0 <= kappa_min <= kappa_max and alpha_max >= 0")
        if self.dfake_gen_update_ratio < 1:
            raise UserError("dfake_gen_update_ratio must be at least 1")
        _check_run_lengths(self)


def _check_run_lengths(cfg) -> None:
    if cfg.batch < 1 or cfg.checkpoint_every < 1 or cfg.steps < 0:
        raise UserError(f"need batch >= 1, checkpoint_every >= 1 and steps >= 0 (got {cfg.batch}, "
                        f"{cfg.checkpoint_every}, {cfg.steps})")


def settings_from(cls, values, section: str):
    """A DMDConfig / ODEConfig from a YAML section, unknown keys named."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in {section}:; known: {sorted(known)}")
    return cls(**(values or {}))


def sample_nasa_t(rng: np.random.Generator, cfg: DMDConfig) -> tuple[float, float]:
    """(alpha for the student, kappa for the teacher) of one iteration."""
    return float(rng.uniform(0.0, cfg.alpha_max)), float(rng.uniform(cfg.kappa_min, cfg.kappa_max))


def dmd_gradient(x0: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor) -> torch.Tensor:
    """DMD's eq. 7 with eq. 8's normalisation, per sample: (fake - real) / mean |x0 - real|."""
    normaliser = (x0 - real_x0).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
    return torch.nan_to_num((fake_x0 - real_x0) / normaliser)


class Trainer:
    """What DMD and ODE regression share: random streams seeded per rank, FSDP sharding under torchrun, the
    teacher-forcing mask, atomic resumable checkpoints (sharded under torchrun) and the run loop. A subclass
    sets its networks and optimisers and defines train_step."""

    desc = "train"

    def _setup(self, cfg, model_cfg, dist, device, frames: int, tokens_per_frame: int) -> None:
        self.cfg, self.model_cfg, self.dist, self.device = cfg, model_cfg, dist, device
        self.flow = FlowSchedule(float(model_cfg.sampling.shift), int(model_cfg.sampling.num_train_timesteps))
        self.prediction = prediction_of(model_cfg)
        self.steps = torch.tensor(self.flow.step_list(list(model_cfg.sampling.steps), bool(model_cfg.sampling.warp)),
                                  dtype=torch.float32)
        self.fpb = int(model_cfg.video.frames_per_block)
        if frames % self.fpb:
            raise UserError(f"the clips have {frames} latent frames, not a whole number of {self.fpb}-frame blocks")
        seed = rank_seed(cfg.seed, dist.rank if dist else 0)
        self.torch_rng = torch.Generator().manual_seed(seed)  # on the CPU: same draws on any device
        self.np_rng = np.random.default_rng(seed)
        self.step = 0
        self.log: list[dict] = []
        self.frames = frames
        self.mask_tokens = 2 * frames * tokens_per_frame
        flex = cfg.flex_mask if cfg.flex_mask is not None else (device.type == "cuda" and self.mask_tokens > 16384)
        self.mask = (teacher_forcing_block_mask(frames, self.fpb, tokens_per_frame, device, compile=device.type == "cuda")
                     if flex else teacher_forcing_mask(frames, self.fpb, tokens_per_frame, device=device))
        self.positions = torch.cat([torch.arange(frames), torch.arange(frames)])

    def _shard(self, *networks) -> None:
        if self.dist is not None:  # before the optimisers see the parameters
            for net in networks:
                if net is not None:
                    shard_transformer(net)

    def _networks(self) -> dict:
        raise NotImplementedError

    def _optimizers(self) -> dict:
        """{name: (network, optimiser)}"""
        raise NotImplementedError

    def train_step(self) -> dict:
        raise NotImplementedError

    # ---- checkpoints -------------------------------------------------------------------------------------
    def state(self) -> dict:
        state = {name: net.state_dict() for name, net in self._networks().items()}
        state.update({name: opt.state_dict() for name, (_, opt) in self._optimizers().items()})
        return {**state, "step": self.step, "torch_rng": self.torch_rng.get_state(),
                "np_rng": self.np_rng.bit_generator.state, "log": self.log}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if self.dist is not None:
            save_sharded(path, self.dist, self._networks(), self._optimizers(),
                         {"torch_rng": self.torch_rng.get_state().tolist(), "np_rng": self.np_rng.bit_generator.state,
                          "log": self.log},  # each rank's own losses and draws
                         {"step": self.step})
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)
        return path

    def checkpoint_exists(self, path: str | os.PathLike) -> bool:
        if self.dist is None:
            return Path(path).exists()
        return self.dist.from_main(sharded_checkpoint(Path(path)) is not None)

    def load(self, path: str | os.PathLike) -> None:
        if self.dist is not None:
            found = self.dist.from_main(str(sharded_checkpoint(Path(path)) or ""))
            if not found:
                raise UserError(f"no complete sharded checkpoint at {path}")
            mine, shared = load_sharded(Path(found), self.dist, self._networks(), self._optimizers())
            self.step, self.log = int(shared["step"]), list(mine["log"])
            self.torch_rng.set_state(torch.tensor(mine["torch_rng"], dtype=torch.uint8))
            self.np_rng.bit_generator.state = mine["np_rng"]
            return
        if Path(path).is_dir():
            raise UserError(f"{path} is a sharded (torchrun) checkpoint; resume it under torchrun with the ranks "
                            f"that wrote it (see its trainer.json)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        for name, net in self._networks().items():
            net.load_state_dict(state[name])
        for name, (_, opt) in self._optimizers().items():
            opt.load_state_dict(state[name])
        self.step = int(state["step"])
        self.torch_rng.set_state(state["torch_rng"])
        self.np_rng.bit_generator.state = state["np_rng"]
        self.log = list(state["log"])

    def run(self, checkpoint: str | os.PathLike | None = None, progress: bool = True,
            stop_after: int | None = None) -> list[dict]:
        """Train to cfg.steps, resuming from `checkpoint` if it exists and saving to it every
        checkpoint_every steps and at the end. stop_after: return after that many steps this call (tests)."""
        from tqdm import tqdm

        if checkpoint is not None and self.checkpoint_exists(checkpoint):
            self.load(checkpoint)
        progress = progress and (self.dist is None or self.dist.is_main)
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=self.desc, unit="step", disable=not progress)
        done = 0
        while self.step < self.cfg.steps and (stop_after is None or done < stop_after):
            record = self.train_step()
            done += 1
            bar.update(1)
            bar.set_postfix({k: round(v, 4) for k, v in record.items() if k.endswith("loss")})
            if checkpoint is not None and (self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps):
                self.save(checkpoint)
        bar.close()
        return self.log

    # ---- data --------------------------------------------------------------------------------------------
    def _batch(self):
        """cfg.batch clips (and their captions), drawn with this rank's random stream."""
        idx = torch.randint(len(self.data), (self.cfg.batch,), generator=self.torch_rng).tolist()
        if hasattr(self.data, "batch"):  # a clip folder: read from disk, captions with the clips
            tensors, captions = self.data.batch(idx)
        else:
            tensors, captions = self.data[torch.tensor(idx)], [self.captions[i] for i in idx]
        return tensors.to(self.device), captions


class DMDTrainer(Trainer):
    """generator: the block-causal student; teacher: the frozen real score (bidirectional); text: TextEncoder
    with encode_batch; latents [N, C, F, h, w] and captions: the data the generator input is noised from."""

    desc = "dmd"

    def __init__(self, generator, teacher, text, model_cfg, cfg: DMDConfig, latents: torch.Tensor,
                 captions: list[str], dist: Distributed | None = None):
        cfg.check()
        self.generator = generator.train().requires_grad_(True)
        self.teacher = teacher.eval().requires_grad_(False)
        self.fake = copy.deepcopy(teacher).train().requires_grad_(True)
        self.ema = copy.deepcopy(generator).eval().requires_grad_(False) if cfg.ema else None
        _, frames, h, w = latents.shape[1:] if torch.is_tensor(latents) else latents.shape
        self._setup(cfg, model_cfg, dist, next(generator.parameters()).device, frames, generator.tokens_per_frame(h, w))
        self._shard(self.generator, self.teacher, self.fake, self.ema)
        self.text = text
        self.data, self.captions = latents, captions
        self.opt_g = torch.optim.AdamW(self.generator.parameters(), lr=cfg.lr_generator, betas=(0.9, 0.999),
                                       weight_decay=0.01)
        self.opt_f = torch.optim.AdamW(self.fake.parameters(), lr=cfg.lr_critic, betas=(0.9, 0.999),
                                       weight_decay=0.01)

    def _networks(self) -> dict:
        nets = {"generator": self.generator, "fake": self.fake}
        return {**nets, "ema": self.ema} if self.ema is not None else nets

    def _optimizers(self) -> dict:
        return {"opt_g": (self.generator, self.opt_g), "opt_f": (self.fake, self.opt_f)}

    # ---- pieces ------------------------------------------------------------------------------------------
    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.torch_rng).to(self.device)

    def _negatives(self, captions: list[str]) -> list[str]:
        out = []
        for caption in captions:
            if self.cfg.negative_from_caption and self.np_rng.random() < self.cfg.negative_from_caption:
                names = [part.split(" moving")[0].split()[-2:] for part in caption.split(" and ")]
                out.append(" ".join(names[int(self.np_rng.integers(len(names)))]))
            else:
                out.append(str(self.cfg.negatives[int(self.np_rng.integers(len(self.cfg.negatives)))]))
        return out

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.flow.frame_sigma(t).float()

    def generate(self, x0_data, positive, negative, alpha: float) -> torch.Tensor:
        """The student's x0 for every block, each block noised to a random student timestep."""
        b = x0_data.shape[0]
        blocks = self.frames // self.fpb
        k = torch.randint(len(self.steps), (b, blocks), generator=self.torch_rng).repeat_interleave(self.fpb, 1)
        t = self.steps[k].to(self.device)
        x_t = self.flow.add_noise(x0_data, self._randn(x0_data.shape), t)
        use_nasa = negative is not None and alpha > 0
        text = PromptEmbeddings(positive, [negative] if use_nasa else [])
        guidance = NASA() if use_nasa else NoGuidance()
        out = self.generator(torch.cat([x0_data, x_t], 2), torch.cat([torch.zeros_like(t), t], 1), text,
                             guidance, [alpha] if use_nasa else (), attn_mask=self.mask,
                             frame_positions=self.positions)[:, :, self.frames:]
        return output_to_x0(out, x_t, self._sigma(t), self.prediction)

    def _noise_for_score(self, x0):
        """DMD / critic noise level: uniform train timestep, shifted, clamped; one t per video."""
        b = x0.shape[0]
        n = self.flow.num_train_timesteps
        u = torch.randint(0, n, (b,), generator=self.torch_rng).float() / n
        t = (self.flow.shifted(u) * n).clamp(self.cfg.min_step * n, self.cfg.max_step * n)[:, None].expand(-1, self.frames).to(self.device)
        noise = self._randn(x0.shape)
        return self.flow.add_noise(x0, noise, t), t, noise

    def real_x0(self, x_t, t, positive, unconditional, kappa: float) -> torch.Tensor:
        """Teacher with CFG, in x0 space (CFG mixes outputs affinely, so x0 or v gives the same)."""
        text = PromptEmbeddings(torch.cat([positive, unconditional]))
        out = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), text)
        cond, uncond = output_to_x0(out, torch.cat([x_t, x_t]), self._sigma(torch.cat([t, t])), self.prediction).chunk(2)
        return uncond + kappa * (cond - uncond)

    def fake_x0(self, x_t, t, positive) -> torch.Tensor:
        out = self.fake(x_t, t, PromptEmbeddings(positive))
        return output_to_x0(out, x_t, self._sigma(t), self.prediction)

    # ---- one iteration -----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        x0_data, captions = self._batch()
        if cfg.nasa_t:
            alpha, kappa = sample_nasa_t(self.np_rng, cfg)
            negatives = self._negatives(captions)
        else:
            alpha, kappa, negatives = 0.0, cfg.real_guidance_scale, [cfg.unconditional] * len(captions)
        with torch.no_grad():
            positive = self.text.encode_batch(captions)
            unconditional = self.text.encode_batch(negatives)
        student_negative = unconditional if cfg.nasa_t else None
        record = {"step": self.step, "alpha": alpha, "kappa": kappa}

        update_generator = self.step % cfg.dfake_gen_update_ratio == 0
        if update_generator:
            x0 = self.generate(x0_data, positive, student_negative, alpha)
            with torch.no_grad():
                x_t, t, _ = self._noise_for_score(x0)
                grad = dmd_gradient(x0, self.fake_x0(x_t, t, positive),
                                    self.real_x0(x_t, t, positive, unconditional, kappa))
            loss = 0.5 * F.mse_loss(x0.double(), (x0.double() - grad.double()).detach())
            self.opt_g.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.generator.parameters(), 10.0)
            self.opt_g.step()
            if self.ema is not None:
                with torch.no_grad():
                    for p, q in zip(self.generator.parameters(), self.ema.parameters()):
                        q.lerp_(p, 1 - cfg.ema)
            record["generator_loss"] = float(loss.detach())

        with torch.no_grad():
            x0 = self.generate(x0_data, positive, student_negative, alpha)
        x_t, t, noise = self._noise_for_score(x0)
        out = self.fake(x_t, t, PromptEmbeddings(positive))
        critic = F.mse_loss(output_to_velocity(out, x_t, self._sigma(t), self.prediction), noise - x0)
        self.opt_f.zero_grad(set_to_none=True)
        critic.backward()
        torch.nn.utils.clip_grad_norm_(self.fake.parameters(), 10.0)
        self.opt_f.step()
        record["critic_loss"] = float(critic.detach())
        self.step += 1
        self.log.append(record)
        return record

# ---- ODE regression: CausVid's first stage -----------------------------------------------------------------
@dataclass
class ODEConfig:
    steps: int = 3000
    batch: int = 1
    lr: float = 2e-6                  # AdamW, as the DMD stage
    grad_clip: float = 10.0
    checkpoint_every: int = 100
    seed: int = 0
    flex_mask: bool | None = None     # as DMDConfig.flex_mask

    def check(self) -> None:
        _check_run_lengths(self)
        if self.lr <= 0 or self.grad_clip <= 0:
            raise UserError("ode: lr and grad_clip must be positive")


def sigma_path(flow: FlowSchedule, student_steps, steps_per_segment, spacing: str = "sigma") -> tuple[list[float], list[int]]:
    """Euler sigmas from the first student step to 0 that pass through every student sigma; returns
    (path, index of each student sigma in it). Within a segment the steps are even in sigma, or with
    spacing="shifted" even before the shift, as the teacher's own shifted sampler spaces them (with the counts
    that sampler spends per segment, the path is its grid through the student's sigmas)."""
    counts = list(steps_per_segment)
    if len(counts) != len(student_steps) or any(int(n) != n or n < 1 for n in counts):
        raise UserError(f"steps_per_segment needs one whole number >= 1 per student step ({len(student_steps)}), "
                        f"got {counts}")
    if spacing not in ("sigma", "shifted"):
        raise UserError(f"spacing must be sigma or shifted, not {spacing!r}")
    anchors = [float(flow.sigma(torch.tensor([float(t)]))) for t in student_steps] + [0.0]
    if any(a <= b for a, b in zip(anchors[:-1], anchors[1:])):
        raise UserError(f"the student steps {list(student_steps)} must have decreasing sigmas above 0")
    path, marks = [], []
    for (a, b), n in zip(zip(anchors[:-1], anchors[1:]), counts):
        marks.append(len(path))
        if spacing == "sigma":
            path += list(np.linspace(a, b, int(n) + 1)[:-1])
        else:
            inner = np.linspace(flow.unshifted(a), flow.unshifted(b), int(n) + 1)[1:-1]
            path += [a] + [flow.shifted(u) for u in inner]
    return [float(x) for x in path] + [0.0], marks


@torch.no_grad()
def teacher_ode_trajectory(teacher, positive, unconditional, noise, flow: FlowSchedule, student_steps,
                           steps_per_segment, guidance_scale: float, prediction: str,
                           spacing: str = "sigma") -> torch.Tensor:
    """The teacher's probability-flow ODE with CFG (Euler), from noise [B, C, F, h, w] at the first student
    step to x0: the states at every student step and the end, [B, S + 1, C, F, h, w]. positive [B, L, D];
    unconditional [B or 1, L, D]."""
    path, marks = sigma_path(flow, student_steps, steps_per_segment, spacing)
    x, recorded, b = noise, [], noise.shape[0]
    text = PromptEmbeddings(torch.cat([positive, unconditional.expand(b, -1, -1)]))
    for i, (s, s_next) in enumerate(zip(path[:-1], path[1:])):
        if i in marks:
            recorded.append(x.clone())
        t = torch.full((2 * b, x.shape[2]), s * flow.num_train_timesteps, device=x.device)
        both = torch.cat([x, x])
        cond, uncond = output_to_velocity(teacher(both, t, text), both, torch.tensor(s), prediction).float().chunk(2)
        x = x + (s_next - s) * (uncond + guidance_scale * (cond - uncond))
    return torch.stack(recorded + [x], 1)


def ode_regression_loss(student, text, trajectory, k, student_steps, flow: FlowSchedule, prediction: str,
                        mask, positions, frames_per_block: int) -> torch.Tensor:
    """MSE between the student's x0 and the trajectory's end, every block at its own student step k [B, blocks]
    (its state on the teacher's trajectory), the clean end frames beside it as context (teacher forcing).
    CausVid's own ODE stage gives each block its noisy predecessors as context instead; the clean context is
    what the student sees at inference (the KV cache holds clean frames) and what the DMD stage trains with."""
    states, x0 = trajectory[:, :-1], trajectory[:, -1]
    _, _, c, f, h, w = states.shape
    k_frames = k.repeat_interleave(frames_per_block, 1).to(states.device)
    x_t = torch.gather(states, 1, k_frames[:, None, None, :, None, None].expand(-1, 1, c, -1, h, w)).squeeze(1)
    t = student_steps.to(states.device)[k_frames]
    out = student(torch.cat([x0, x_t], 2), torch.cat([torch.zeros_like(t), t], 1), text, attn_mask=mask,
                  frame_positions=positions)[:, :, f:]
    return F.mse_loss(output_to_x0(out, x_t, flow.frame_sigma(t).float(), prediction), x0)


class ODETrainer(Trainer):
    """Regress the block-causal student onto teacher ODE trajectories (CausVid starts it from the bidirectional
    teacher's weights). trajectories: a ClipFolder of "trajectory" tensors [S + 1, C, F, h, w] (the states at the
    student steps, then x0) with captions, or a tensor [N, S + 1, C, F, h, w] beside a caption list."""

    desc = "ode"

    def __init__(self, student, text, model_cfg, cfg: ODEConfig, trajectories, captions: list[str] | None = None,
                 dist: Distributed | None = None):
        cfg.check()
        self.generator = student.train().requires_grad_(True)
        shape = trajectories.shape[1:] if torch.is_tensor(trajectories) else trajectories.shape
        steps, _, frames, h, w = shape
        self._setup(cfg, model_cfg, dist, next(student.parameters()).device, frames, student.tokens_per_frame(h, w))
        if steps != len(self.steps) + 1:
            raise UserError(f"the trajectories hold {steps} states; {model_cfg.description!r} needs "
                            f"{len(self.steps) + 1} (one per student step, then x0)")
        self._shard(self.generator)
        self.text, self.data, self.captions = text, trajectories, captions or []
        self.opt_g = torch.optim.AdamW(self.generator.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.01)

    def _networks(self) -> dict:
        return {"generator": self.generator}

    def _optimizers(self) -> dict:
        return {"opt_g": (self.generator, self.opt_g)}

    def train_step(self) -> dict:
        trajectory, captions = self._batch()
        k = torch.randint(len(self.steps), (trajectory.shape[0], self.frames // self.fpb), generator=self.torch_rng)
        with torch.no_grad():
            text = PromptEmbeddings(self.text.encode_batch(captions))
        loss = ode_regression_loss(self.generator, text, trajectory, k, self.steps, self.flow, self.prediction,
                                   self.mask, self.positions, self.fpb)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.generator.parameters(), self.cfg.grad_clip)
        self.opt_g.step()
        record = {"step": self.step, "ode_loss": float(loss.detach())}
        self.step += 1
        self.log.append(record)
        return record


def training_state_gib(parameters: int, ema: bool, ranks: int) -> float:
    """Per-GPU memory of the training state under FSDP: generator and fake score in fp32 with gradients and
    AdamW's two moments (16 bytes a parameter), the frozen teacher and the EMA in fp32 (4 each), all sharded."""
    return round((2 * 16 + 4 + (4 if ema else 0)) * parameters / ranks / 2**30, 1)


def dry_run(train_config: str | os.PathLike, batch: int = 1) -> dict:
    """Build the real-size generator, teacher and fake score on the meta device (no weights, no memory) and
    run one generator forward, the DMD scores and the critic forward to check every shape."""
    from omegaconf import OmegaConf

    from .loading import load_config
    from .model.causal_wan import CausalWanTransformer, parameter_count

    tc = OmegaConf.load(train_config)
    model_cfg = load_config(str(tc.model))
    config = OmegaConf.to_container(model_cfg.generator, resolve=True)
    config["patch_size"] = tuple(config["patch_size"])
    with torch.device("meta"):
        generator, teacher = CausalWanTransformer(**config), CausalWanTransformer(**config)
    latent_hw = (int(model_cfg.video.height) // 8, int(model_cfg.video.width) // 8)
    frames = int(model_cfg.video.latent_frames)
    latents = torch.empty(batch, config["in_channels"], frames, *latent_hw, device="meta")
    text_len, text_dim = int(model_cfg.weights.get("text_max_length", 512)), config["text_dim"]

    class MetaText:
        def encode_batch(self, prompts):
            return torch.empty(len(prompts), text_len, text_dim, device="meta")

    cfg = DMDConfig(**{**OmegaConf.to_container(tc.dmd), "batch": batch})
    trainer = DMDTrainer(generator, teacher, MetaText(), model_cfg, cfg, latents, ["a prompt"])
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
    parameters = parameter_count(config)
    state = {f"{n} GPU{'s' if n > 1 else ''}": training_state_gib(parameters, bool(cfg.ema), n) for n in (1, 8, 64)}
    return {"model": str(tc.model), "parameters_per_network": parameters, "shapes": shapes,
            "training_state_gib_per_gpu": state,
            "not_counted": "activations (with gradient checkpointing: each layer's input and one layer's "
                           "internals), the bf16 text encoder, one Wan block's all-gathered weights",
            "attention_mask": "flex-attention BlockMask on CUDA (dense on meta for this check)",
            "nasa_t": cfg.nasa_t}


class ClipFolder:
    """Training clips as one safetensors file each: one tensor (DMD: "latents" [C, F, h, w], the generator's
    standardised latents; ODE: "trajectory" [S + 1, C, F, h, w]) and the caption in the file's metadata
    {"caption": ...}. Read lazily, a batch at a time."""

    def __init__(self, folder: str | os.PathLike, tensor: str = "latents"):
        if not folder or not Path(folder).is_dir():
            raise UserError(f"clip folder {folder!r} does not exist: set it in the training YAML's data: section")
        self.files, self.tensor = sorted(Path(folder).glob("*.safetensors")), tensor
        if not self.files:
            raise UserError(f"no *.safetensors clips in {folder} (each: tensor {tensor!r}, metadata {{'caption': ...}})")
        self.shape = self._read(0)[0].shape

    def _read(self, i: int):
        from safetensors import safe_open

        with safe_open(str(self.files[i]), "pt") as f:
            if self.tensor not in f.keys():
                raise UserError(f"{self.files[i]} has no tensor {self.tensor!r} (has {sorted(f.keys())})")
            return f.get_tensor(self.tensor).float(), (f.metadata() or {}).get("caption", "")

    def __len__(self) -> int:
        return len(self.files)

    def check_captions(self, text) -> None:
        """Every caption within the text encoder's limit, found before training rather than on one rank mid-run."""
        from safetensors import safe_open

        for file in self.files:
            with safe_open(str(file), "pt") as f:
                caption = (f.metadata() or {}).get("caption", "")
            if text.token_count(caption) > text.max_length:
                raise UserError(f"{file}: its caption is {text.token_count(caption)} tokens, over the text encoder's "
                                f"{text.max_length}; shorten it")

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, list[str]]:
        items = [self._read(i) for i in indices]
        return torch.stack([x for x, _ in items]), [c for _, c in items]


def _training_setup(config):
    """(training config, model config, torchrun context or None, device)."""
    from omegaconf import OmegaConf

    from .distributed import init_from_env
    from .loading import load_config, resolve_device

    if not Path(config).is_file():
        raise UserError(f"no training config at {config}")
    tc = OmegaConf.load(config)
    if not tc.get("model"):
        raise UserError(f"{config}: set model (a model config name or YAML, e.g. causvid)")
    model_cfg = load_config(str(tc.model))
    ctx = init_from_env()
    return tc, model_cfg, ctx, ctx.device if ctx is not None else resolve_device(tc.get("device"))


def _require_weights(tc, model_cfg, config, key: str, what: str) -> None:
    """Real models need their weights named in the YAML (random and bundled models carry their own)."""
    if not tc.get(key) and str(model_cfg.weights.source) not in ("random", "bundled"):
        raise UserError(f"{config}: set {key}: ({what})")


def _section(tc, key: str, config) -> dict:
    from omegaconf import OmegaConf

    if tc.get(key) is None:
        raise UserError(f"{config} has no {key}: section (configs/causvid_ode_train.yaml has ode_pairs: and ode:, "
                        f"configs/causvid_nasa_t_train.yaml has dmd:)")
    return OmegaConf.to_container(tc[key], resolve=True)


def _frozen_text(model_cfg, device, wan):
    from .loading import build_vae_and_text

    # Frozen: bf16 on GPUs (umT5-XXL's encoder, 5.7 B parameters, is 23 GB in fp32; every rank holds one).
    return build_vae_and_text(model_cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32, wan)[1]


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


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

    from .distributed import finish, full_state_dict
    from .loading import build_generator
    from .model.checkpoint import save_generator

    if stage not in ("dmd", "ode"):
        raise UserError(f"stage must be dmd or ode, not {stage!r}")
    tc, model_cfg, ctx, device = _training_setup(config)
    settings = settings_from(DMDConfig if stage == "dmd" else ODEConfig, _section(tc, stage, config), stage)
    settings.check()
    data = ClipFolder(OmegaConf.select(tc, "data.latents" if stage == "dmd" else "data.trajectories"),
                      "latents" if stage == "dmd" else "trajectory")
    # The ODE stage starts the student from the teacher's weights unless given a generator.
    start = tc.get("generator") or (tc.get("teacher") if stage == "ode" else None)
    if stage == "dmd":
        _require_weights(tc, model_cfg, config, "generator", "the ODE-initialised student's checkpoint")
    else:
        _require_weights(tc, model_cfg, config, "teacher", "the bidirectional teacher's weights, the student's start")
    generator = build_generator(model_cfg, device, torch.float32, start)
    text = _frozen_text(model_cfg, device, tc.get("wan"))
    data.check_captions(text)
    if stage == "dmd":
        teacher = build_generator(model_cfg, device, torch.float32, tc.get("teacher") or tc.get("generator"))
        trainer = DMDTrainer(generator, teacher, text, model_cfg, settings, data, [], dist=ctx)
    else:
        trainer = ODETrainer(generator, text, model_cfg, settings, data, dist=ctx)
    if tc.get("gradient_checkpointing", False):
        for net in (trainer.generator, getattr(trainer, "fake", None)):
            if net is not None:
                net.enable_gradient_checkpointing()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mine, other = (f"{stage}.pt", f"{stage}.ckpt") if ctx is None else (f"{stage}.ckpt", f"{stage}.pt")
    if ctx is None:
        mixed = sharded_checkpoint(out / other) is not None
    else:
        mixed = ctx.from_main((out / other).exists())
    if mixed:  # a run is resumed the way it was started: its random streams belong to its ranks
        raise UserError(f"{out} holds a {'torchrun' if ctx is None else 'one-process'} run ({other}): resume it "
                        f"{'under torchrun with the same --nproc_per_node' if ctx is None else 'without torchrun'}, "
                        f"or choose another --out")
    with _autocast(device):
        log = trainer.run(out / mine, progress=progress)
    final = trainer.ema if getattr(trainer, "ema", None) is not None else trainer.generator
    weights = full_state_dict(final) if ctx is not None else final.state_dict()  # a collective under torchrun
    last = {k: v for k, v in (log[-1] if log else {}).items() if k.endswith("loss")}
    summary = {"stage": stage, "steps": trainer.step, **{f"{k}_last": v for k, v in last.items()},
               "nasa_t": bool(getattr(trainer.cfg, "nasa_t", False)), "world_size": ctx.world_size if ctx else 1,
               "config": OmegaConf.to_container(tc)}
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
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from tqdm import tqdm

    from .eval.jobs import generation_device, rank_and_world
    from .loading import build_generator, load_config, resolve_device

    tc, model_cfg = OmegaConf.load(config), None
    if not tc.get("model"):
        raise UserError(f"{config}: set model (a model config name or YAML, e.g. causvid)")
    model_cfg = load_config(str(tc.model))
    spec = _section(tc, "ode_pairs", config)
    if "guidance_scale" not in spec or "steps_per_segment" not in spec:
        raise UserError(f"{config}: ode_pairs needs steps_per_segment and guidance_scale")
    _require_weights(tc, model_cfg, config, "teacher", "the bidirectional teacher's weights")
    flow = FlowSchedule(float(model_cfg.sampling.shift), int(model_cfg.sampling.num_train_timesteps))
    student_steps = flow.step_list(list(model_cfg.sampling.steps), bool(model_cfg.sampling.warp))
    spacing = str(spec.get("spacing", "sigma"))
    sigma_path(flow, student_steps, spec["steps_per_segment"], spacing)  # checked before loading anything
    rank, world = rank_and_world()
    if torch.cuda.is_available():
        device = torch.device(generation_device())
        torch.cuda.set_device(device)  # every rank on its own GPU, not all on cuda:0
    else:
        device = resolve_device(tc.get("device"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(prompts)) if i % world == rank and not (out / f"{i:06d}.safetensors").exists()]
    if not todo:
        return 0
    text = _frozen_text(model_cfg, device, tc.get("wan"))
    for i in todo:
        if text.token_count(prompts[i]) > text.max_length:
            raise UserError(f"prompt {i} is {text.token_count(prompts[i])} tokens, over the text encoder's "
                            f"{text.max_length}; shorten it: {prompts[i][:60]!r}")
    teacher = build_generator(model_cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                              tc.get("teacher"))
    stride = model_cfg.video.vae_stride
    shape = (1, teacher.config.in_channels, int(model_cfg.video.latent_frames),
             int(model_cfg.video.height) // stride[1], int(model_cfg.video.width) // stride[2])
    with torch.no_grad():
        unconditional = text.encode_batch([str(spec.get("unconditional", ""))])
    for i in tqdm(todo, desc=f"ode pairs (rank {rank})", unit="clip", disable=not progress):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(int(spec.get("seed", 0)) * 1_000_003 + i))
        with torch.no_grad(), _autocast(device):
            trajectory = teacher_ode_trajectory(teacher, text.encode_batch([prompts[i]]), unconditional,
                                                noise.to(device), flow, student_steps, spec["steps_per_segment"],
                                                float(spec["guidance_scale"]), prediction_of(model_cfg), spacing)
        path = out / f"{i:06d}.safetensors"
        tmp = path.with_name(f".{path.name}.partial")
        save_file({"trajectory": trajectory[0].float().cpu().contiguous()}, str(tmp), metadata={"caption": prompts[i]})
        os.replace(tmp, path)
    return len(todo)
