"""ODE regression, CausVid's first stage: the teacher's CFG ODE trajectories through the student's steps
(teacher_ode_trajectory); the student, started from the teacher's weights, regresses every block at a random
student step onto the trajectory's end (ode_regression_loss, ODETrainer)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..guidance import NoGuidance
from ..model.cache import PromptEmbeddings
from ..schedule import FlowSchedule, output_to_velocity, output_to_x0
from .distributed import Distributed
from .trainer import Trainer, check_run_lengths


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
        check_run_lengths(self)
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
    teacher.set_guidance(NoGuidance())  # plain attention on the prompts handed in, whatever ran on it before
    path, marks = sigma_path(flow, student_steps, steps_per_segment, spacing)
    x, recorded, b = noise, [], noise.shape[0]
    text = PromptEmbeddings(torch.cat([positive, unconditional.expand(b, -1, -1)]))
    for i, (s, s_next) in enumerate(zip(path[:-1], path[1:])):
        if i in marks:
            recorded.append(x.clone())
        t = torch.full((2 * b, x.shape[2]), s * flow.num_train_timesteps, device=x.device)
        both = torch.cat([x, x])
        cond, uncond = output_to_velocity(teacher(both, t, prompts=text), both, torch.tensor(s), prediction).float().chunk(2)
        x = x + (s_next - s) * (uncond + guidance_scale * (cond - uncond))
    return torch.stack(recorded + [x], 1)


def ode_regression_loss(student, text, trajectory, k, student_steps, flow: FlowSchedule, prediction: str,
                        mask, positions, frames_per_block: int, guidance=None, alphas=(),
                        from_block: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the student's x0 and the trajectory's end, every block at its own student step k [B, blocks]
    (its state on the teacher's trajectory), the clean end frames beside it as context (teacher forcing).
    CausVid's own ODE stage gives each block its noisy predecessors as context instead; the clean context is
    what the student sees at inference (the KV cache holds clean frames) and what the DMD stage trains with.
    guidance, alphas: the method its cross-attention runs on `text` (default plain attention; the bundled
    student's NASA-T runs NASA with the text's negatives). from_block [B]: each clip's loss counts its blocks from
    this one on (a change that lands mid-clip: the blocks before it are context only); None: every block."""
    states, x0 = trajectory[:, :-1], trajectory[:, -1]
    _, _, c, f, h, w = states.shape
    k_frames = k.repeat_interleave(frames_per_block, 1).to(states.device)
    x_t = torch.gather(states, 1, k_frames[:, None, None, :, None, None].expand(-1, 1, c, -1, h, w)).squeeze(1)
    t = student_steps.to(states.device)[k_frames]
    student.set_guidance(guidance or NoGuidance(), alphas)  # installed here: never what an earlier forward left
    out = student(torch.cat([x0, x_t], 2), torch.cat([torch.zeros_like(t), t], 1), attn_mask=mask,
                  frame_positions=positions, prompts=text)[:, :, f:]
    predicted = output_to_x0(out, x_t, flow.frame_sigma(t).float(), prediction)
    if from_block is None:
        return F.mse_loss(predicted, x0)
    block = torch.arange(f, device=x0.device) // frames_per_block
    weight = (block[None] >= from_block.to(x0.device)[:, None]).to(x0.dtype)  # [B, F]
    error = F.mse_loss(predicted, x0, reduction="none").mean((1, 3, 4))  # per clip and frame
    return (error * weight).sum() / weight.sum()


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

