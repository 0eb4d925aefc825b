"""DMD for block-causal students (CausVid's second stage) and NASA-T (arXiv 2412.02687).

One iteration in CausVid's recipe (arXiv 2412.07772), flow-matching teacher:
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

NASA-T's negatives come from a NegativeSampler, (captions, numpy rng) -> one negative per caption: by default
one of cfg.negatives; a dataset whose captions name what may be removed hands its own (the bundled world's
draws the clip's own objects: nasa_video.toy.nasa_t.object_negatives).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..guidance import NASA, NoGuidance
from ..model.cache import PromptEmbeddings
from ..schedule import output_to_velocity, output_to_x0
from .distributed import Distributed
from .trainer import Trainer, check_run_lengths


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
    negative_from_caption: float = 0.0  # share of negatives a caption-reading sampler (handed to DMDTrainer)
                                        # draws from the clip's own caption; the rest come from negatives
    flex_mask: bool | None = None     # teacher-forcing mask as a flex-attention BlockMask; None: on CUDA above
                                      # 16k tokens (the 1.3B model's 65,520), where a dense mask cannot fit

    def check(self) -> None:
        if self.nasa_t and not (self.negatives or self.negative_from_caption > 0):
            raise UserError("NASA-T needs negative prompts: set negatives (a list) or negative_from_caption > 0")
        if not 0 <= self.kappa_min <= self.kappa_max or self.alpha_max < 0:
            raise UserError("need 0 <= kappa_min <= kappa_max and alpha_max >= 0")
        if self.dfake_gen_update_ratio < 1:
            raise UserError("dfake_gen_update_ratio must be at least 1")
        check_run_lengths(self)



NegativeSampler = Callable[[list[str], np.random.Generator], list[str]]
"""NASA-T's negatives: one negative prompt per caption of the batch, drawn with the trainer's numpy stream."""


def list_negatives(negatives: list[str]) -> NegativeSampler:
    """The default sampler: one of `negatives` per caption, uniformly."""
    def sample(captions: list[str], rng: np.random.Generator) -> list[str]:
        return [str(negatives[int(rng.integers(len(negatives)))]) for _ in captions]
    return sample


def sample_nasa_t(rng: np.random.Generator, cfg: DMDConfig) -> tuple[float, float]:
    """(alpha for the student, kappa for the teacher) of one iteration."""
    return float(rng.uniform(0.0, cfg.alpha_max)), float(rng.uniform(cfg.kappa_min, cfg.kappa_max))


def dmd_gradient(x0: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor) -> torch.Tensor:
    """DMD's eq. 7 with eq. 8's normalisation, per sample: (fake - real) / mean |x0 - real|."""
    normaliser = (x0 - real_x0).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
    return torch.nan_to_num((fake_x0 - real_x0) / normaliser)


class DMDTrainer(Trainer):
    """generator: the block-causal student; teacher: the frozen real score (bidirectional); text: TextEncoder
    with encode_batch; latents [N, C, F, h, w] and captions: the data the generator input is noised from;
    negative_sampler: NASA-T's negatives (default: one of cfg.negatives per clip; needed when
    cfg.negative_from_caption > 0, as only the dataset knows how to read its captions)."""

    desc = "dmd"

    def __init__(self, generator, teacher, text, model_cfg, cfg: DMDConfig, latents: torch.Tensor,
                 captions: list[str], dist: Distributed | None = None,
                 negative_sampler: NegativeSampler | None = None):
        cfg.check()
        if negative_sampler is None and cfg.nasa_t and cfg.negative_from_caption > 0:
            raise UserError("negative_from_caption > 0 needs a negative sampler that reads this data's captions "
                            "(`train toy-nasa-t` hands the bundled world's); set it to 0 to draw from negatives")
        self.sample_negatives = negative_sampler or list_negatives(cfg.negatives)
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
        self.generator.set_guidance(NASA() if use_nasa else NoGuidance(), [alpha] if use_nasa else ())
        out = self.generator(torch.cat([x0_data, x_t], 2), torch.cat([torch.zeros_like(t), t], 1), attn_mask=self.mask,
                             frame_positions=self.positions, prompts=text)[:, :, self.frames:]
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
        self.teacher.set_guidance(NoGuidance())  # CFG acts on outputs: plain attention, whatever ran on it before
        out = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), prompts=text)
        cond, uncond = output_to_x0(out, torch.cat([x_t, x_t]), self._sigma(torch.cat([t, t])), self.prediction).chunk(2)
        return uncond + kappa * (cond - uncond)

    def fake_x0(self, x_t, t, positive) -> torch.Tensor:
        self.fake.set_guidance(NoGuidance())
        out = self.fake(x_t, t, prompts=PromptEmbeddings(positive))
        return output_to_x0(out, x_t, self._sigma(t), self.prediction)

    # ---- one iteration -----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        x0_data, captions = self._batch()
        if cfg.nasa_t:
            alpha, kappa = sample_nasa_t(self.np_rng, cfg)
            negatives = self.sample_negatives(captions, self.np_rng)
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
        self.fake.set_guidance(NoGuidance())
        out = self.fake(x_t, t, prompts=PromptEmbeddings(positive))
        critic = F.mse_loss(output_to_velocity(out, x_t, self._sigma(t), self.prediction), noise - x0)
        self.opt_f.zero_grad(set_to_none=True)
        critic.backward()
        torch.nn.utils.clip_grad_norm_(self.fake.parameters(), 10.0)
        self.opt_f.step()
        record["critic_loss"] = float(critic.detach())
        self.step += 1
        self.log.append(record)
        return record
