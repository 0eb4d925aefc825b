"""Typed views of a model config's sections, read once (the YAML stays the source; nothing is re-derived or
cast at each use). `model_spec(cfg)` checks types as it reads, so a wrong value is one clear error."""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import UserError


def _read(cls, section, where: str):
    """An instance of dataclass cls from a config section: each field cast to its annotated type."""
    values = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section or {})
    out = {}
    for f in fields(cls):
        if f.name not in values or values[f.name] is None:
            if f.default is MISSING and f.default_factory is MISSING:
                raise UserError(f"the model config has no {where}.{f.name}")
            continue
        value = values[f.name]
        try:
            out[f.name] = _cast(f.type, value)
        except (TypeError, ValueError):
            raise UserError(f"{where}.{f.name} must be {f.type}, got {value!r}") from None
    return cls(**out)


def _cast(kind: str, value):
    if kind == "int":
        if isinstance(value, bool) or float(value) != int(value):
            raise ValueError
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError
        return value
    if kind == "str":
        return str(value)
    if kind.startswith("tuple[int"):
        return tuple(int(v) for v in value)
    if kind.startswith("tuple[float"):
        return tuple(float(v) for v in value)
    return value


@dataclass(frozen=True)
class VideoSpec:
    height: int
    width: int
    latent_frames: int
    frames_per_block: int
    vae_stride: tuple[int, ...]
    fps: int
    display_scale: int = 1  # small models' frames, enlarged (nearest neighbour) in written MP4s


@dataclass(frozen=True)
class SamplingSpec:
    steps: tuple[float, ...]
    shift: float
    warp: bool = False
    num_train_timesteps: int = 1000
    context_noise: float = 0.0
    prediction: str = "velocity"


@dataclass(frozen=True)
class CacheSpec:
    capacity_frames: int
    rolling: bool = False
    sink_frames: int = 0


@dataclass(frozen=True)
class GuidanceSpec:
    method: str
    scale: float
    in_cache_pass: bool = True
    settings: Any = field(default_factory=dict)  # {method: {setting: value}}


@dataclass(frozen=True)
class WeightsSpec:
    """Where the weights come from; the loaders read their own keys (folder, text_encoder, ...) beside these."""

    source: str  # random, bundled, wan
    text_max_length: int
    checkpoint: "str | None" = None
    wan: "str | None" = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    video: VideoSpec
    sampling: SamplingSpec
    cache: CacheSpec
    guidance: GuidanceSpec
    weights: WeightsSpec

    @property
    def temporal_stride(self) -> int:
        return self.video.vae_stride[0]


def model_spec(cfg) -> ModelSpec:
    """The typed sections of a model config (a ModelSpec is returned as it is)."""
    if isinstance(cfg, ModelSpec):
        return cfg
    return ModelSpec(str(cfg.get("name", "model")), _read(VideoSpec, cfg.video, "video"),
                     _read(SamplingSpec, cfg.sampling, "sampling"), _read(CacheSpec, cfg.cache, "cache"),
                     _read(GuidanceSpec, cfg.guidance, "guidance"), _read(WeightsSpec, cfg.weights, "weights"))


MODEL_SECTIONS = ("generator", "video", "sampling", "cache", "guidance", "weights")
# The Wan generator's sizes: a missing one would silently take diffusers' default (30 layers, ...) and surface only
# as a checkpoint that does not fit, so each is required and a positive whole number.
WAN_SIZES = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim", "freq_dim",
             "ffn_dim", "num_layers", "rope_max_seq_len")


def validate_model_config(cfg, where: str) -> ModelSpec:
    """Every section a model config needs, with types and ranges, checked once where the YAML is read: one line
    naming the file and the key, before anything is built."""
    if not isinstance(cfg, DictConfig):
        raise UserError(f"{where}: a model config is a mapping of sections ({', '.join(MODEL_SECTIONS)}), "
                        f"not a {type(cfg).__name__}")
    for section in MODEL_SECTIONS:
        if not isinstance(cfg.get(section), DictConfig):
            raise UserError(f"{where}: the model config has no {section}: section (it needs "
                            f"{', '.join(MODEL_SECTIONS)}); start from nasa_video/configs/tiny.yaml")
    try:
        spec = model_spec(cfg)
    except UserError as error:
        raise UserError(f"{where}: {error}") from None

    def need(ok: bool, key: str, rule: str):
        if not ok:
            raise UserError(f"{where}: {key} {rule}")
    video = spec.video
    for key in ("height", "width", "latent_frames", "frames_per_block", "fps", "display_scale"):
        need(getattr(video, key) >= 1, f"video.{key}", f"must be at least 1, got {getattr(video, key)}")
    need(len(video.vae_stride) == 3 and all(s >= 1 for s in video.vae_stride), "video.vae_stride",
         f"must be three whole numbers >= 1 (time, height, width), got {list(video.vae_stride)}")
    need(video.height % video.vae_stride[1] == 0 and video.width % video.vae_stride[2] == 0, "video.height/width",
         f"must be multiples of the codec's stride {video.vae_stride[1:]}, got {video.height}x{video.width}")
    need(video.latent_frames % video.frames_per_block == 0, "video.latent_frames",
         f"must be a whole number of blocks of {video.frames_per_block}, got {video.latent_frames}")
    sampling = spec.sampling
    need(len(sampling.steps) >= 1 and all(0 < t <= sampling.num_train_timesteps for t in sampling.steps),
         "sampling.steps", f"must be timesteps in (0, {sampling.num_train_timesteps}], got {list(sampling.steps)}")
    need(sampling.shift > 0, "sampling.shift", f"must be > 0, got {sampling.shift}")
    need(sampling.context_noise >= 0, "sampling.context_noise", f"must be >= 0, got {sampling.context_noise}")
    cache = spec.cache
    need(cache.capacity_frames >= video.frames_per_block, "cache.capacity_frames",
         f"must hold at least one block ({video.frames_per_block} frames), got {cache.capacity_frames}")
    need(0 <= cache.sink_frames < cache.capacity_frames, "cache.sink_frames",
         f"must be in [0, capacity_frames), got {cache.sink_frames}")
    generator = cfg.generator
    if str(generator.get("arch", "wan")) == "wan":
        for key in WAN_SIZES:
            value = generator.get(key)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"generator.{key}",
                 f"must be a whole number >= 1, got {value!r}")
        patch = generator.get("patch_size")
        need(patch is not None and len(patch) == 3 and all(isinstance(p, int) and p >= 1 for p in patch),
             "generator.patch_size", f"must be three whole numbers >= 1, got {patch!r}")
    return spec


# ---- frame counts (pure: the CLI checks --frames before anything heavy is imported) ----------------------
def pixel_frames(latent_frames: int, temporal_stride: int = 4) -> int:
    return 1 + temporal_stride * (latent_frames - 1)


def check_cache_holds(latent_frames: int, capacity: int, rolling: bool, temporal_stride: int = 4) -> None:
    """A fixed self-attention cache must hold the whole video; a rolling one streams past it."""
    if latent_frames > capacity and not rolling:
        raise UserError(f"{pixel_frames(latent_frames, temporal_stride)} frames need {latent_frames} latent frames "
                        f"but the cache holds {capacity}; use --rolling or fewer frames")


SEED_LIMIT = 2 ** 63  # torch.Generator seeds are signed 64-bit


def latent_frames_for(frames: int, frames_per_block: int, temporal_stride: int = 4) -> int:
    """Pixel frame count -> latent frames; it must be 1 + 4 (L - 1) with L a whole number of blocks."""
    latent = (frames - 1) / temporal_stride + 1
    if frames < 1 or latent != int(latent) or int(latent) % frames_per_block:
        step = temporal_stride * frames_per_block
        lower = max(pixel_frames(frames_per_block, temporal_stride),
                    pixel_frames(((frames - 1) // step) * frames_per_block or frames_per_block, temporal_stride))
        raise UserError(f"--frames {frames} is not a whole number of blocks: use {step}k - {temporal_stride - 1} "
                        f"frames, e.g. {lower} or {lower + step}")
    return int(latent)
