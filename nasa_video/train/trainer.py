"""What DMD and ODE regression share: random streams seeded per rank, FSDP sharding under torchrun, the
teacher-forcing mask, atomic resumable checkpoints (sharded under torchrun) and the run loop.

Checkpoints hold the networks, their optimisers, the EMA, the step and every random state, written
atomically; a killed run resumes to the same parameters as an uninterrupted one. Under torchrun the networks
are sharded with FSDP2 and the checkpoints with torch.distributed.checkpoint (nasa_video.train.distributed).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..model.causal_wan import teacher_forcing_block_mask, teacher_forcing_mask
from .config import ModelSettings
from .data import draw_batch
from .distributed import load_sharded, rank_seed, save_sharded, shard_transformer, sharded_checkpoint


def check_run_lengths(cfg) -> None:
    if cfg.batch < 1 or cfg.checkpoint_every < 1 or cfg.steps < 0:
        raise UserError(f"need batch >= 1, checkpoint_every >= 1 and steps >= 0 (got {cfg.batch}, "
                        f"{cfg.checkpoint_every}, {cfg.steps})")


class Trainer:
    """What DMD and ODE regression share: random streams seeded per rank, FSDP sharding under torchrun, the
    teacher-forcing mask, atomic resumable checkpoints (sharded under torchrun) and the run loop. A subclass
    sets its networks and optimisers and defines train_step."""

    desc = "train"

    def _setup(self, cfg, model_cfg, dist, device, frames: int, tokens_per_frame: int) -> None:
        self.cfg, self.model_cfg, self.dist, self.device = cfg, model_cfg, dist, device
        self.model_settings = ModelSettings.of(model_cfg)  # the model config, read once
        settings = self.model_settings
        self.flow, self.prediction, self.fpb = settings.flow, settings.prediction, settings.frames_per_block
        self.steps = torch.tensor(settings.student_steps, dtype=torch.float32)
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
        return draw_batch(self.data, self.captions, self.cfg.batch, self.torch_rng, self.device)
