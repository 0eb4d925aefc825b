"""DMD distillation for block-causal few-step students, with NASA-T (arXiv 2412.02687) as a switch.

One iteration (CausVid's recipe, arXiv 2412.07772, on a flow-matching teacher):
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
NASA-T the unconditional branch is the empty prompt and kappa the fixed real_guidance_scale.

Checkpoints hold both networks, both optimisers, the EMA, the step and every random state, written
atomically; a killed run resumes to the same parameters as an uninterrupted one.
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
    real_guidance_scale: float = 3.5  # CausVid's teacher CFG
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


def sample_nasa_t(rng: np.random.Generator, cfg: DMDConfig) -> tuple[float, float]:
    """(alpha for the student, kappa for the teacher) of one iteration."""
    return float(rng.uniform(0.0, cfg.alpha_max)), float(rng.uniform(cfg.kappa_min, cfg.kappa_max))


def dmd_gradient(x0: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor) -> torch.Tensor:
    """DMD's eq. 7 with eq. 8's normalisation, per sample: (fake - real) / mean |x0 - real|."""
    normaliser = (x0 - real_x0).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
    return torch.nan_to_num((fake_x0 - real_x0) / normaliser)


class DMDTrainer:
    """generator: the block-causal student; teacher: the frozen real score (bidirectional); text: TextEncoder
    with encode_batch; latents [N, C, F, h, w] and captions: the data the generator input is noised from."""

    def __init__(self, generator, teacher, text, model_cfg, cfg: DMDConfig, latents: torch.Tensor,
                 captions: list[str], dist: Distributed | None = None):
        cfg.check()
        self.cfg, self.model_cfg, self.dist = cfg, model_cfg, dist
        self.generator = generator.train().requires_grad_(True)
        self.teacher = teacher.eval().requires_grad_(False)
        self.fake = copy.deepcopy(teacher).train().requires_grad_(True)
        self.ema = copy.deepcopy(generator).eval().requires_grad_(False) if cfg.ema else None
        if dist is not None:  # shard before the optimisers see the parameters
            for net in (self.generator, self.teacher, self.fake, self.ema):
                if net is not None:
                    shard_transformer(net)
        self.text = text
        self.latents, self.captions = latents, captions
        self.flow = FlowSchedule(float(model_cfg.sampling.shift), int(model_cfg.sampling.num_train_timesteps))
        self.prediction = prediction_of(model_cfg)
        self.steps = torch.tensor(self.flow.step_list(list(model_cfg.sampling.steps), bool(model_cfg.sampling.warp)),
                                  dtype=torch.float32)
        self.fpb = int(model_cfg.video.frames_per_block)
        self.opt_g = torch.optim.AdamW(self.generator.parameters(), lr=cfg.lr_generator, betas=(0.9, 0.999),
                                       weight_decay=0.01)
        self.opt_f = torch.optim.AdamW(self.fake.parameters(), lr=cfg.lr_critic, betas=(0.9, 0.999),
                                       weight_decay=0.01)
        self.device = next(generator.parameters()).device
        seed = rank_seed(cfg.seed, dist.rank if dist else 0)
        self.torch_rng = torch.Generator().manual_seed(seed)  # on the CPU: same draws on any device
        self.np_rng = np.random.default_rng(seed)
        self.step = 0
        self.log: list[dict] = []
        _, frames, h, w = latents.shape[1:] if torch.is_tensor(latents) else latents.shape
        self.frames = frames
        tpf = generator.tokens_per_frame(h, w)
        flex = cfg.flex_mask if cfg.flex_mask is not None else (self.device.type == "cuda" and 2 * frames * tpf > 16384)
        self.mask_tokens = 2 * frames * tpf
        self.mask = (teacher_forcing_block_mask(frames, self.fpb, tpf, self.device, compile=self.device.type == "cuda")
                     if flex else teacher_forcing_mask(frames, self.fpb, tpf, device=self.device))
        self.positions = torch.cat([torch.arange(frames), torch.arange(frames)])

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
        return self.flow.sigma(t).float()[:, None, :, None, None]

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
        s = self.flow.shift * u / (1 + (self.flow.shift - 1) * u)
        t = (s * n).clamp(self.cfg.min_step * n, self.cfg.max_step * n)[:, None].expand(-1, self.frames).to(self.device)
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
    def _batch(self):
        idx = torch.randint(len(self.latents), (self.cfg.batch,), generator=self.torch_rng)
        if hasattr(self.latents, "batch"):  # a LatentFolder: read from disk, captions with the clips
            latents, captions = self.latents.batch(idx.tolist())
            return latents.to(self.device), captions
        captions = [self.captions[i] for i in idx.tolist()]
        return self.latents[idx].to(self.device), captions

    def train_step(self) -> dict:
        cfg = self.cfg
        x0_data, captions = self._batch()
        if cfg.nasa_t:
            alpha, kappa = sample_nasa_t(self.np_rng, cfg)
            negatives = self._negatives(captions)
        else:
            alpha, kappa, negatives = 0.0, cfg.real_guidance_scale, [""] * len(captions)
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

    # ---- checkpoints -------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "step": self.step,
            "generator": self.generator.state_dict(),
            "fake": self.fake.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "opt_g": self.opt_g.state_dict(),
            "opt_f": self.opt_f.state_dict(),
            "torch_rng": self.torch_rng.get_state(),
            "np_rng": self.np_rng.bit_generator.state,
            "log": self.log,
        }

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

    def _networks(self) -> dict:
        nets = {"generator": self.generator, "fake": self.fake}
        return {**nets, "ema": self.ema} if self.ema is not None else nets

    def _optimizers(self) -> dict:
        return {"opt_g": (self.generator, self.opt_g), "opt_f": (self.fake, self.opt_f)}

    def checkpoint_exists(self, path: str | os.PathLike) -> bool:
        return (sharded_checkpoint(Path(path)) is not None) if self.dist is not None else Path(path).exists()

    def load(self, path: str | os.PathLike) -> None:
        if self.dist is not None:
            mine, shared = load_sharded(sharded_checkpoint(Path(path)), self.dist, self._networks(), self._optimizers())
            self.step, self.log = int(shared["step"]), list(mine["log"])
            self.torch_rng.set_state(torch.tensor(mine["torch_rng"], dtype=torch.uint8))
            self.np_rng.bit_generator.state = mine["np_rng"]
            return
        if Path(path).is_dir():
            raise UserError(f"{path} is a sharded (torchrun) checkpoint; resume it under torchrun with the ranks "
                            f"that wrote it (see its trainer.json)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.step = int(state["step"])
        self.generator.load_state_dict(state["generator"])
        self.fake.load_state_dict(state["fake"])
        if self.ema is not None and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_f.load_state_dict(state["opt_f"])
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
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="dmd", unit="step", disable=not progress)
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


class LatentFolder:
    """Training clips as one safetensors file each: tensor "latents" [C, F, h, w] (the generator's standardised
    latents) and the caption in the file's metadata {"caption": ...}. Read lazily, a batch at a time."""

    def __init__(self, folder: str | os.PathLike):
        self.files = sorted(Path(folder).glob("*.safetensors"))
        if not self.files:
            raise UserError(f"no *.safetensors clips in {folder} (each: tensor 'latents' [C, F, h, w], "
                            f"metadata {{'caption': ...}})")
        self.shape = self._read(0)[0].shape

    def _read(self, i: int):
        from safetensors import safe_open

        with safe_open(str(self.files[i]), "pt") as f:
            return f.get_tensor("latents").float(), (f.metadata() or {}).get("caption", "")

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, list[str]]:
        items = [self._read(i) for i in indices]
        return torch.stack([x for x, _ in items]), [c for _, c in items]


def train_from_config(config: str | os.PathLike, out: str | os.PathLike, progress: bool = True) -> dict:
    """DMD / NASA-T from a training YAML, on one device or under torchrun (FSDP2 per Wan block, one process per
    GPU, each rank its own clips and noise). CUDA: bf16 autocast over fp32 weights, a bf16 text encoder, gradient
    checkpointing when asked. Keys: model, generator (student checkpoint), teacher (real-score weights: a
    checkpoint or a diffusers transformer folder; default: the student's), wan (VAE/text folder for real
    models), data.latents (a LatentFolder), dmd (DMDConfig), gradient_checkpointing."""
    import json

    from omegaconf import OmegaConf

    from .distributed import full_state_dict, init_from_env
    from .loading import build_generator, build_vae_and_text, load_config, resolve_device
    from .model.checkpoint import save_generator

    tc = OmegaConf.load(config)
    model_cfg = load_config(str(tc.model))
    ctx = init_from_env()
    device = ctx.device if ctx is not None else resolve_device(tc.get("device"))
    data = LatentFolder(tc.data.latents)
    generator = build_generator(model_cfg, device, torch.float32, tc.get("generator"))
    teacher = build_generator(model_cfg, device, torch.float32, tc.get("teacher") or tc.get("generator"))
    # The text encoder is frozen: bf16 on GPUs (umT5-XXL's encoder, 5.7 B parameters, is 23 GB in fp32; every rank holds one).
    _, text = build_vae_and_text(model_cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                                 tc.get("wan"))
    cfg = DMDConfig(**OmegaConf.to_container(tc.dmd))
    trainer = DMDTrainer(generator, teacher, text, model_cfg, cfg, data, [], dist=ctx)
    if tc.get("gradient_checkpointing", False):
        trainer.generator.enable_gradient_checkpointing()
        trainer.fake.enable_gradient_checkpointing()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    other = out / ("dmd.ckpt" if ctx is None else "dmd.pt")
    if other.exists():  # a run is resumed the way it was started: its random streams belong to its ranks
        raise UserError(f"{out} holds a {'torchrun' if ctx is None else 'one-process'} run ({other.name}): resume it "
                        f"{'under torchrun with the same --nproc_per_node' if ctx is None else 'without torchrun'}, "
                        f"or choose another --out")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:
        log = trainer.run(out / ("dmd.pt" if ctx is None else "dmd.ckpt"), progress=progress)
    final = trainer.ema if trainer.ema is not None else trainer.generator
    weights = full_state_dict(final) if ctx is not None else final.state_dict()  # a collective under torchrun
    summary = {"steps": trainer.step, "critic_loss_last": log[-1]["critic_loss"] if log else None,
               "nasa_t": cfg.nasa_t, "world_size": ctx.world_size if ctx else 1, "config": OmegaConf.to_container(tc)}
    if ctx is None or ctx.is_main:
        save_generator(weights, out / "generator.safetensors", "diffusers")
        save_generator(weights, out / "model.pt", "causvid")  # upstream CausVid's layout too
        (out / "dmd.json").write_text(json.dumps(summary, indent=2))
    if ctx is not None:
        ctx.barrier()
    return summary
