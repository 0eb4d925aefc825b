"""The training YAML and the model config it names, each read once into a typed view: ModelSettings (what
training takes from a model config), TrainingConfig (the paths and switches of a training YAML),
ODEPairsConfig (its ode_pairs: section); DMDConfig / ODEConfig come from their sections by settings_from."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..schedule import FlowSchedule, prediction_of, sampling_schedule


def generator_kwargs(model_cfg) -> dict:
    """The generator's constructor arguments (its config section without `arch`): sizes such as in_channels
    and text_dim. Build generators with model.interface.build_from_config, which picks the architecture."""
    from ..model.interface import generator_section

    return generator_section(model_cfg)[1]


@dataclass(frozen=True)
class ModelSettings:
    """What training reads from a model config."""
    flow: FlowSchedule
    student_steps: tuple[float, ...]  # the student's denoising timesteps (warped through the grid if asked)
    prediction: str                   # what the network outputs: velocity or x0
    frames_per_block: int
    latent_frames: int
    latent_hw: tuple[int, int]        # latent height and width: the video's over the VAE's spatial stride
    generator: dict                   # the generator's constructor arguments (its config section)
    text_max_length: int

    @classmethod
    def of(cls, model_cfg) -> ModelSettings:
        from ..config import model_spec  # the model config's typed sections, as the pipeline reads them

        spec = model_spec(model_cfg)
        video = spec.video
        flow, steps = sampling_schedule(spec)
        return cls(flow=flow, student_steps=tuple(steps), prediction=prediction_of(spec),
                   frames_per_block=video.frames_per_block,
                   latent_frames=video.latent_frames,
                   latent_hw=(video.height // video.vae_stride[1], video.width // video.vae_stride[2]),
                   generator=generator_kwargs(model_cfg),
                   text_max_length=spec.weights.text_max_length)


def settings_from(cls, values, section: str):
    """A DMDConfig / ODEConfig from a YAML section, unknown keys named."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in {section}:; known: {sorted(known)}")
    return cls(**(values or {}))


def _path(value) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class TrainingConfig:
    """A training YAML. Keys: model (a model config name or YAML), generator (the student's weights), teacher
    (the real score's / the ODE stage's start), wan (VAE / text folder for real models), device, data.latents
    (DMD's ClipFolder), data.trajectories (the ODE stage's), gradient_checkpointing, and the sections ode_pairs:,
    ode:, dmd:."""
    path: str
    raw: object                       # the whole YAML (DictConfig), written into the run's summary
    model: str
    model_cfg: object                 # the model config it names (DictConfig)
    settings: ModelSettings
    generator: str | None = None
    teacher: str | None = None
    wan: str | None = None
    device: str | None = None
    latents: str | None = None
    trajectories: str | None = None
    gradient_checkpointing: bool = False

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainingConfig:
        from omegaconf import OmegaConf

        from ..loading import load_config

        if not Path(path).is_file():
            raise UserError(f"no training config at {path}")
        tc = OmegaConf.load(path)
        if not tc.get("model"):
            raise UserError(f"{path}: set model (a model config name or YAML, e.g. causvid)")
        model_cfg = load_config(str(tc.model))
        return cls(path=str(path), raw=tc, model=str(tc.model), model_cfg=model_cfg,
                   settings=ModelSettings.of(model_cfg), generator=_path(tc.get("generator")),
                   teacher=_path(tc.get("teacher")), wan=_path(tc.get("wan")), device=_path(tc.get("device")),
                   latents=_path(OmegaConf.select(tc, "data.latents")),
                   trajectories=_path(OmegaConf.select(tc, "data.trajectories")),
                   gradient_checkpointing=bool(tc.get("gradient_checkpointing", False)))

    def section(self, key: str) -> dict:
        from omegaconf import OmegaConf

        if self.raw.get(key) is None:
            raise UserError(f"{self.path} has no {key}: section (configs/causvid_ode_train.yaml has ode_pairs: and "
                            f"ode:, configs/causvid_nasa_t_train.yaml has dmd:)")
        return OmegaConf.to_container(self.raw[key], resolve=True)

    def require_weights(self, key: str, what: str) -> None:
        """Real models need their weights named in the YAML (random and bundled models carry their own)."""
        if not getattr(self, key) and str(self.model_cfg.weights.source) not in ("random", "bundled"):
            raise UserError(f"{self.path}: set {key}: ({what})")


@dataclass(frozen=True)
class ODEPairsConfig:
    """The ode_pairs: section: the teacher's trajectories through the student's steps."""
    steps_per_segment: list           # Euler steps of the teacher between consecutive student steps
    guidance_scale: float             # the teacher's CFG weight
    spacing: str = "sigma"            # sigma or shifted (see ode.sigma_path)
    seed: int = 0
    unconditional: str = ""           # CFG's unconditional prompt

    @classmethod
    def from_section(cls, spec: dict, path: str) -> ODEPairsConfig:
        if "guidance_scale" not in spec or "steps_per_segment" not in spec:
            raise UserError(f"{path}: ode_pairs needs steps_per_segment and guidance_scale")
        return cls(steps_per_segment=spec["steps_per_segment"], guidance_scale=float(spec["guidance_scale"]),
                   spacing=str(spec.get("spacing", "sigma")), seed=int(spec.get("seed", 0)),
                   unconditional=str(spec.get("unconditional", "")))
