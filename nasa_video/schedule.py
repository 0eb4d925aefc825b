"""Flow matching as CausVid / Self-Forcing use it: shifted sigma grid, step lists, re-noising, x0 <-> v.

x_t = (1 - sigma) x0 + sigma eps, t = 1000 sigma, the model predicts v = eps - x0, so x0 = x_t - sigma v.
Sigmas are always looked up at the nearest grid timestep, as upstream's add_noise does.

A model may instead predict x0 itself (`sampling.prediction: x0`, the bundled model): a small network
denoising raw pixel patches learns the clean patch, which lies on a low-dimensional set, far faster than
the full-rank noise inside v (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise").
The two are affine in each other at fixed (x_t, sigma), so guidance that mixes outputs (CFG) is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


MIN_SIGMA = 0.05  # x0-prediction networks: v = (x_t - x0) / sigma, with sigma clamped near the clean end


def prediction_of(cfg) -> str:
    """What a model config's (or ModelSpec's) network outputs: "velocity" (Wan, CausVid) or "x0" (the bundled
    model)."""
    from .config import model_spec

    prediction = model_spec(cfg).sampling.prediction
    if prediction not in ("velocity", "x0"):
        from .errors import UserError
        raise UserError(f"sampling.prediction must be velocity or x0, got {prediction!r}")
    return prediction


def sampling_schedule(cfg) -> tuple["FlowSchedule", list[float]]:
    """(the flow schedule, the denoising timesteps) of a model config or ModelSpec: the one reading of the
    sampling section, shared by the sampler and every trainer (a student trains on the steps it samples)."""
    from .config import model_spec

    sampling = model_spec(cfg).sampling
    flow = FlowSchedule(sampling.shift, sampling.num_train_timesteps)
    return flow, flow.step_list(list(sampling.steps), sampling.warp)


def output_to_x0(output: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, prediction: str) -> torch.Tensor:
    """A network's output (v or x0, per its config) -> x0; sigma broadcastable to x_t."""
    if prediction == "x0":
        return output
    if prediction == "velocity":
        return x_t - sigma * output
    raise ValueError(f"prediction must be 'velocity' or 'x0', not {prediction!r}")


def output_to_velocity(output: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, prediction: str) -> torch.Tensor:
    """A network's output -> v (for v-space losses and ODE steps)."""
    if prediction == "velocity":
        return output
    if prediction == "x0":
        return (x_t - output) / sigma.clamp(min=MIN_SIGMA)
    raise ValueError(f"prediction must be 'velocity' or 'x0', not {prediction!r}")


@dataclass(frozen=True)
class FlowSchedule:
    shift: float
    num_train_timesteps: int = 1000

    def shifted(self, u):
        """The time shift: an unshifted fraction u in [0, 1] (tensor or float) -> sigma."""
        return self.shift * u / (1 + (self.shift - 1) * u)

    def unshifted(self, sigma):
        """The shift's inverse: sigma -> the unshifted fraction."""
        return sigma / (self.shift - (self.shift - 1) * sigma)

    def sigmas(self) -> torch.Tensor:
        return self.shifted(torch.linspace(1.0, 0.0, self.num_train_timesteps + 1, dtype=torch.float64)[:-1])

    def timesteps(self) -> torch.Tensor:
        return self.sigmas() * self.num_train_timesteps

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at the grid timestep nearest to each t (float64, same shape as t)."""
        grid = self.timesteps().to(t.device)
        index = (grid.view(*([1] * t.ndim), -1) - t.double().unsqueeze(-1)).abs().argmin(-1)
        return self.sigmas().to(t.device)[index]

    def frame_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma of per-frame timesteps t [B, F], shaped [B, 1, F, 1, 1] to broadcast over latents [B, C, F, H, W]."""
        return self.sigma(t)[:, None, :, None, None]

    def step_list(self, steps: list[float], warp: bool) -> list[float]:
        """The denoising timesteps. warp=True maps 1000, 750, ... through the shifted grid (Self-Forcing)."""
        if not warp:
            return [float(t) for t in steps]
        grid = torch.cat([self.timesteps(), torch.zeros(1, dtype=torch.float64)])
        return [float(grid[self.num_train_timesteps - int(t)]) for t in steps]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0, noise [B, C, F, H, W]; t [B, F] per latent frame."""
        sigma = self.frame_sigma(t).to(torch.float32)
        return ((1 - sigma) * x0.float() + sigma * noise.float()).to(noise.dtype)

    def velocity_to_x0(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.frame_sigma(t)
        return (x_t.double() - sigma * v.double()).to(v.dtype)

    def prediction_to_x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                         prediction: str = "velocity") -> torch.Tensor:
        """The network's output (v or x0, by the model's config) -> x0."""
        return output if prediction == "x0" else self.velocity_to_x0(output, x_t, t)

    def x0_to_velocity(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.frame_sigma(t)
        return ((x_t.double() - x0.double()) / sigma).to(x0.dtype)
