"""What the pipeline, the trainers and the benchmarks need of a block-causal generator, and the registry that
maps a config's `generator.arch` to the module that builds one.

A new base model is one module that implements `Generator` and calls `register_architecture`, plus one YAML
whose `generator.arch` names it (and whose other `generator` keys are its constructor's arguments).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from ..errors import UserError


@runtime_checkable
class Generator(Protocol):
    """A block-causal video generator with a self-attention KV cache and guided cross-attention.

    What the block loop, the streams, the trainers and the benchmark call (a generator with only these runs
    through all of them: tests/test_extensibility.py streams one that is not Wan). config: in_channels,
    text_dim, num_layers, num_attention_heads, attention_head_dim (diffusers-style names). The cross-attention of
    every layer is a module with diffusers' Attention names (to_q, to_k, to_v, norm_q, norm_k, to_out, heads)
    whose `processor` the forward calls as processor(attn, hidden) (model.cross_attention.CrossAttentionProcessor).
    Optional: shift_positions(kv_cache, delta), moving a rolling cache's non-sink frames back by delta temporal
    positions (with it a rolling stream re-bases and never ends, without it the stream stops at
    max_frame_positions); compile_blocks(enable) and `compiled` (torch.compile of its repeated block).
    """

    config: Any

    def forward(self, x: torch.Tensor, t: torch.Tensor, start_frame: int = 0, kv_cache=None,
                attn_mask: torch.Tensor | None = None, frame_positions: torch.Tensor | None = None,
                prompts=None) -> torch.Tensor:
        """The network's output for latent frames x [B, C, F, H, W] at per-frame timesteps t [B, F]."""

    def text_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cross-attention (K, V) [B, L, H, D] of one prompt's encoder output [B, L, text_dim]."""

    def set_cross_attention(self, processors: Sequence) -> None:
        """Install one cross-attention processor per layer (what every following forward uses)."""

    def set_text(self, text) -> None:
        """Install a TextCache's cross-attention processors (its prompts' K/V and guidance)."""

    def set_guidance(self, method, alphas: Sequence[float] = ()) -> None:
        """Text-less processors with this method, for forwards handed prompts=."""

    def new_kv_cache(self, batch: int, capacity_frames: int, latent_height: int, latent_width: int,
                     rolling: bool = False, sink_frames: int = 0, dtype=None, device=None):
        """An empty SelfAttentionCache sized for this generator."""

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        """Tokens one latent frame of that size becomes."""

    @property
    def max_frame_positions(self) -> int:
        """Latent frames the generator has temporal positions for."""


@dataclass(frozen=True)
class Architecture:
    """How to make and store one kind of generator.

    build(section): a generator from the config's `generator` section (a plain dict without `arch`), with
    freshly initialised weights on the current default device (the meta device for counting).
    cast(model, device, dtype): move to the device and dtype the way the architecture wants (fp32 norms...).
    reset_buffers(model): rebuild non-persistent buffers after a meta-device build was materialised with
    to_empty (before loading a checkpoint into it).
    """

    name: str
    build: Callable[[dict], torch.nn.Module]
    cast: Callable[[torch.nn.Module, Any, torch.dtype], torch.nn.Module]
    reset_buffers: Callable[[torch.nn.Module], None] = lambda model: None
    description: str = ""


ARCHITECTURES: dict[str, Architecture] = {}
DEFAULT_ARCH = "wan"


def register_architecture(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.name] = arch
    return arch


def generator_section(cfg) -> tuple[str, dict]:
    """(arch name, constructor arguments) of a model config's generator section, read once."""
    from omegaconf import OmegaConf

    section = cfg.generator if hasattr(cfg, "generator") else cfg
    values = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)
    return str(values.pop("arch", DEFAULT_ARCH)), values


def architecture(name: str) -> Architecture:
    from . import causal_wan  # noqa: F401  (registers "wan")

    if name not in ARCHITECTURES:
        raise UserError(f"unknown generator.arch {name!r}; known: {', '.join(sorted(ARCHITECTURES))} "
                        f"(a new one registers itself with nasa_video.model.register_architecture)")
    return ARCHITECTURES[name]


def build_from_config(cfg) -> torch.nn.Module:
    """A freshly initialised generator for a model config (on the current default device)."""
    name, section = generator_section(cfg)
    return architecture(name).build(section)


def empty_from_config(cfg) -> torch.nn.Module:
    """A generator for a model config with uninitialised CPU weights, for loading a checkpoint into
    (no time spent on an initialisation the checkpoint overwrites)."""
    name, section = generator_section(cfg)
    arch = architecture(name)
    with torch.device("meta"):
        model = arch.build(section)
    model = model.to_empty(device="cpu")
    arch.reset_buffers(model)
    return model


def parameter_count(cfg) -> int:
    """Parameters of a model config's generator, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = build_from_config(cfg)
    return sum(p.numel() for p in model.parameters())
