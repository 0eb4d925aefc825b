"""One video as every entry point asks for it, and the same request checked once against a generator.

The CLI, StreamingGenerator.generate / stream / stream_batch and the server all build a VideoRequest (its fields
are the per-video arguments, named once here: a batch's spec dicts and the server's jobs are these fields), and
the stream runs its resolved form: the prompt's embeddings, the negatives as Negative(text, weight, embeds) items
(one shape from the CLI to the text cache), the scale schedule, the method, the length, the random source, the
initial noise and the prompt schedule, each checked with one line naming the fix. Nothing here imports torch at
module import (the CLI checks its arguments before torch loads)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, NamedTuple

from .config import SEED_LIMIT, latent_frames_for, pixel_frames
from .errors import UserError

if TYPE_CHECKING:
    import torch


class Negative(NamedTuple):
    """One negative prompt: its text (or a label for given embeddings), weight, and embeddings (None: encode text)."""

    text: str
    weight: float
    embeds: Any = None


@dataclass
class VideoRequest:
    """The per-video arguments. prompt or prompt_embeds [1, L, text_dim]; negative: a str, a list of str or of
    (text, weight) pairs, and/or negative_prompt_embeds (a tensor, a list of them or of (tensor, weight) pairs);
    scale: a number, a list per block, per-step lists or a function (block, step); method: a registered name or
    a Guidance; frames: pixel frames (None: the config's length, unbounded if rolling); seed or generator (a
    torch.Generator on the device for every draw); latents: the initial noise (a tensor covering the video or
    per-block tensors); prompt_at: {block: prompt} switches the positive prompt from that block on, re-caching
    the window at each switch when recache."""

    prompt: str | None = None
    negative: Any = None
    scale: Any = None
    method: Any = None
    frames: int | None = None
    seed: int | None = None
    rolling: bool | None = None
    prompt_embeds: Any = None
    negative_prompt_embeds: Any = None
    latents: Any = None
    generator: Any = None
    prompt_at: dict | None = None
    recache: bool = False

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_spec(cls, spec: dict, what: str = "the request", **defaults) -> "VideoRequest":
        """A request from a dict of its fields (a batch's spec); defaults fill what the dict leaves out or None."""
        unknown = sorted(set(spec) - set(cls.field_names()))
        if unknown:
            raise UserError(f"{what}: unknown argument {unknown[0]!r}; a video takes {', '.join(cls.field_names())}")
        values = {**defaults, **{k: v for k, v in spec.items() if v is not None or k not in defaults}}
        return cls(**values)

    def resolve(self, gen) -> "ResolvedRequest":
        """Every field checked against the generator, in one place (one line each), and made ready to run."""
        import torch

        from .guidance import Guidance, ScaleSchedule, default_scale, method_from_config, parse_negatives

        spec, text_dim, length = gen.spec, gen.model.config.text_dim, _text_length(gen)
        prompt_embeds = self.prompt_embeds
        if prompt_embeds is None:
            check_prompt(self.prompt)
        else:
            prompt_embeds = check_embeds(prompt_embeds, text_dim, length=length).to(gen.device)
        seed, generator = self.seed, self.generator
        if generator is None:
            seed = 0 if seed is None else seed
            check_seed(seed)
        elif seed is not None:  # one of them would be ignored
            raise UserError("give seed or generator, not both: the generator draws all the noise, so seed would be "
                            "ignored")
        elif not isinstance(generator, torch.Generator) or generator.device.type != gen.device.type:
            raise UserError(f"generator must be a torch.Generator on {gen.device.type} (the stream's device)")
        fpb = spec.video.frames_per_block
        rolling = spec.cache.rolling if self.rolling is None else bool(self.rolling)
        if self.frames is None:
            latent_total = None if rolling else spec.video.latent_frames
        else:
            latent_total = latent_frames_for(int(self.frames), fpb, gen.temporal_stride)
        positions = gen.model.max_frame_positions  # temporal positions the generator can encode
        # A rolling stream re-bases its positions (engine.rebase_positions) and never runs out; a fixed cache cannot.
        endless = rolling and hasattr(gen.model, "shift_positions")
        if latent_total is not None and latent_total > positions and not endless:
            most = pixel_frames(positions // fpb * fpb, gen.temporal_stride)
            raise UserError(f"{pixel_frames(latent_total, gen.temporal_stride)} frames need {latent_total} latent "
                            f"frames but {spec.name} encodes positions for {positions}; ask for at most {most} frames")
        method = self.method if isinstance(self.method, Guidance) else method_from_config(spec, self.method)
        latent_hw = (spec.video.height // gen.spatial_stride, spec.video.width // gen.spatial_stride)
        num_blocks = None if latent_total is None else latent_total // fpb
        latents = check_latents(self.latents, gen.model.config.in_channels, latent_hw, fpb, num_blocks)
        if prompt_embeds is None:
            gen.text.check_readable(self.prompt)
            prompt_embeds = gen.text.encode(self.prompt)
        label = self.prompt if isinstance(self.prompt, str) and self.prompt.strip() else EMBEDS
        negatives = [Negative(t, w) for t, w in parse_negatives(self.negative)]
        negatives += negative_embeds_items(self.negative_prompt_embeds, text_dim, length)
        schedule = ScaleSchedule(default_scale(spec, method) if self.scale is None else self.scale)
        check_negatives(gen, method, negatives, schedule)
        switches = check_prompt_at(self.prompt_at, num_blocks, gen)
        return ResolvedRequest(label, prompt_embeds, negatives, schedule, method, rolling, endless, latent_total,
                               seed, generator, latents, latent_hw, switches, bool(self.recache))


@dataclass
class ResolvedRequest:
    """A VideoRequest checked against a generator: what a Stream runs."""

    prompt: str  # the prompt's text, or EMBEDS for given embeddings
    prompt_embeds: Any  # [1, L, text_dim] on the device
    negatives: list[Negative]
    schedule: Any  # ScaleSchedule
    method: Any  # Guidance
    rolling: bool
    endless: bool  # rolling on a generator that re-bases its positions
    latent_total: int | None  # None: unbounded
    seed: int | None
    generator: Any
    latents: Any
    latent_hw: tuple[int, int]
    switches: dict[int, str]  # {block: prompt}
    recache: bool


def check_negatives(gen, method, negatives: list[Negative], schedule) -> None:
    """The method's count, each scale in its range, the weights (each and their sum) and every text readable and
    within the token limit: now, not in the middle of a block."""
    method.check_negatives(len(negatives))
    for value in schedule.values():
        method.check_scale(value)
    method.check_weights([n.weight for n in negatives], schedule.values())
    for negative in negatives:
        if negative.embeds is None:
            gen.text.check_readable(negative.text, "negative prompt")
            gen.text.encode(negative.text)  # too many tokens: one line now


def check_prompt_at(prompt_at, num_blocks: int | None, gen) -> dict[int, str]:
    """{block: prompt}: blocks >= 1 (block 0 is the prompt) inside the video, every text readable and encoded now
    (over the token limit: one line before the first block, not a partial video at that block)."""
    switches = dict(prompt_at or {})
    for block, text in switches.items():
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise UserError(f"--prompt-at {block}: the block must be a whole number >= 1 (block 0 is --prompt)")
        if num_blocks is not None and block >= num_blocks:
            raise UserError(f"--prompt-at {block}: the video has {num_blocks} blocks (0..{num_blocks - 1})")
        check_prompt(text, f"prompt at block {block}")
        gen.text.check_readable(text, f"prompt at block {block}")
        gen.text.encode(text)
    return switches


def check_latents(latents, channels: int, latent_hw: tuple[int, int], fpb: int, num_blocks: int | None):
    """latents: None, a tensor [1, C, F, h, w], or a list of per-block tensors [1, C, fpb, h, w]."""
    import torch

    if latents is None:
        return None
    h, w = latent_hw
    blocks = [latents] if isinstance(latents, torch.Tensor) else list(latents)
    for i, item in enumerate(blocks):
        frames = fpb if not isinstance(latents, torch.Tensor) else None
        if (not isinstance(item, torch.Tensor) or item.dim() != 5 or item.shape[0] != 1
                or tuple(item.shape[1:2]) + tuple(item.shape[3:]) != (channels, h, w)
                or (frames is not None and item.shape[2] != frames)):
            shape = list(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            want = f"[1, {channels}, {frames or 'F'}, {h}, {w}]"
            raise UserError(f"latents{'' if frames is None else f'[{i}]'} has shape {shape}; this model's "
                            f"initial noise is {want}")
        if not torch.isfinite(item).all() or item.abs().max() > LATENT_LIMIT:
            raise UserError(f"latents{'' if frames is None else f'[{i}]'} hold NaN, infinite or huge values; "
                            f"they are the initial noise, about N(0, 1) (at most {LATENT_LIMIT:g} in size)")
    covered = blocks[0].shape[2] // fpb if isinstance(latents, torch.Tensor) else len(blocks)
    if num_blocks is not None and covered < num_blocks:
        raise UserError(f"latents cover {covered} blocks but the video has {num_blocks}: give "
                        f"{num_blocks * fpb} latent frames")
    return latents


def check_prompt(prompt, what: str = "prompt") -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"the {what} is empty: give some text")


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise UserError(f"--seed {seed} is out of range: use a whole number in [0, 2^63)")


EMBEDS = "<prompt_embeds>"


def check_embeds(embeds, text_dim: int, what: str = "prompt_embeds", length: int | None = None) -> torch.Tensor:
    """A text encoder output [1, L, text_dim] (as TextEncoder.encode returns it), checked and made float32.
    length: the encoder's own L; the prompt and every negative share one text cache, so all must have it."""
    import torch

    if not isinstance(embeds, torch.Tensor):
        raise UserError(f"{what} must be a tensor [1, L, {text_dim}], not {type(embeds).__name__}")
    if embeds.dim() != 3 or embeds.shape[0] != 1 or embeds.shape[2] != text_dim or embeds.shape[1] == 0:
        raise UserError(f"{what} has shape {list(embeds.shape)}; the text encoder's output is [1, L, {text_dim}]")
    if not torch.isfinite(embeds).all():
        raise UserError(f"{what} holds NaN or infinite values")
    if length is not None and embeds.shape[1] != length:
        raise UserError(f"{what} has {embeds.shape[1]} tokens; this model's text encoder gives {length} (its padding "
                        f"rows zero): pad it with zero rows to {length}, as the encoder does")
    return embeds.detach().float()


def embeds_length(embeds: torch.Tensor) -> int:
    """Real token count of an encoder output whose padding rows are zero (Wan's convention): last non-zero row + 1."""
    rows = embeds[0].abs().sum(-1).nonzero()
    return int(rows[-1]) + 1 if len(rows) else embeds.shape[1]


def negative_embeds_items(embeds, text_dim: int, length: int | None = None) -> list[Negative]:
    """negative_prompt_embeds: a tensor, a list of tensors, or a list of (tensor, weight) -> [Negative(label, weight,
    tensor)]."""
    import torch

    if embeds is None:
        return []
    if isinstance(embeds, torch.Tensor):
        embeds = [embeds]
    items = []
    for i, item in enumerate(embeds):
        tensor, weight = item if isinstance(item, (tuple, list)) else (item, 1.0)
        items.append(Negative(f"<negative_prompt_embeds {i}>", float(weight),
                              check_embeds(tensor, text_dim, f"negative_prompt_embeds[{i}]", length)))
    return items


LATENT_LIMIT = 1e4  # initial noise is N(0, 1); a value this size is a mistake (unnormalised latents, a wrong tensor)


def _text_length(gen) -> int | None:
    """The token count the generator's text encoder gives every prompt (None when it does not say)."""
    length = getattr(getattr(gen, "text", None), "max_length", None)
    return int(length) if isinstance(length, int) else None
