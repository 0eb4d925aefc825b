"""The streaming loop: the one place that knows the order of things.

    encode prompts -> text cache (positive + negatives, once)
    for each block of latent frames:
        for each step t_i:  x0 = G(x_t, t_i)   [guidance inside every cross-attention]
                            x_{t_{i+1}} = (1 - s) x0 + s * fresh noise      (not after the last step)
        one cache pass over the clean x0 at t = context_noise (writes the K/V later blocks read)
        streaming VAE decode -> uint8 frames, yielded at once

With overlap_decode (the default on CUDA) block k is decoded on a worker (its own CUDA stream) while block
k + 1 is denoised, and its chunk is yielded once block k + 1's denoising is done; frames and their order are
those of the sequential loop. The first block is the exception: it is decoded and yielded before block 1
starts, so the first-block latency is the sequential one (denoise + decode of block 0, nothing waited for).
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from omegaconf import DictConfig

from . import attention
from .errors import UserError
from .guidance import (Guidance, NoGuidance, ScaleSchedule, ScaleSpec, default_scale, make_guidance,
                       method_from_config, parse_negatives)
from .loading import build_generator, build_vae_and_text, load_config, resolve_device, resolve_dtype
from .config import SEED_LIMIT, check_cache_holds, latent_frames_for, model_spec, pixel_frames  # noqa: F401 (re-exported)
from .memory import check_fits
from .model.cache import TextCache
from .schedule import FlowSchedule, prediction_of
from .vae import OverlappedDecoder, as_codec, decode_now, resolve_vae_dtype, set_codec_dtype


@dataclass
class FrameChunk:
    """One block's output. frames: [T, H, W, 3] uint8 (None when decode=False). latents: the block's clean latents
    [1, C, F, h, w] (float32, CPU), always returned, decoded or not: concatenate them on dim 2 for the video's.
    prompt: the positive prompt the block was made with. recache_seconds: time spent before this block re-caching
    the self-attention window under a new prompt (set_prompt(..., recache=True)); 0 when none ran."""

    block: int
    first_frame: int  # index in the video of frames[0]
    latent_frames: tuple[int, int]  # [start, end) latent frames of this block
    frames: np.ndarray | None
    latents: torch.Tensor  # [1, C, F, h, w] on the CPU, float32
    negative: list[tuple[str, float]]
    scale: float
    denoise_seconds: float
    decode_seconds: float  # the decode's own time (on the worker when overlapped)
    prompt: str = ""
    recache_seconds: float = 0.0
    decode_wait_seconds: float = 0.0  # what the loop waited for it: all of it sequentially, less when overlapped


@dataclass
class GenerationResult:
    path: str | None
    frames: int
    blocks: int
    seconds: float
    first_block_seconds: float
    interrupted: bool = False
    recache_seconds: float = 0.0  # total spent re-caching at prompt switches
    recaches: int = 0


_PLAIN = NoGuidance()


def check_prompt(prompt, what: str = "prompt") -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"the {what} is empty: give some text")


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise UserError(f"--seed {seed} is out of range: use a whole number in [0, 2^63)")


def resolve_compile(compile: bool | None, device) -> bool:
    """The compile switch: None means on for CUDA (where it pays), off for the CPU (where compiling a video's few
    shapes costs more than it saves); True / False as given."""
    if compile is None:
        return torch.device(device).type == "cuda"
    return bool(compile)


EMBEDS = "<prompt_embeds>"


def check_embeds(embeds, text_dim: int, what: str = "prompt_embeds", length: int | None = None) -> torch.Tensor:
    """A text encoder output [1, L, text_dim] (as TextEncoder.encode returns it), checked and made float32.
    length: the encoder's own L; the prompt and every negative share one text cache, so all must have it."""
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


def negative_embeds_items(embeds, text_dim: int, length: int | None = None) -> list[tuple[str, float, torch.Tensor]]:
    """negative_prompt_embeds: a tensor, a list of tensors, or a list of (tensor, weight) -> [(label, weight, tensor)]."""
    if embeds is None:
        return []
    if isinstance(embeds, torch.Tensor):
        embeds = [embeds]
    items = []
    for i, item in enumerate(embeds):
        tensor, weight = item if isinstance(item, (tuple, list)) else (item, 1.0)
        items.append((f"<negative_prompt_embeds {i}>", float(weight),
                      check_embeds(tensor, text_dim, f"negative_prompt_embeds[{i}]", length)))
    return items


LATENT_LIMIT = 1e4  # initial noise is N(0, 1); a value this size is a mistake (unnormalised latents, a wrong tensor)


def _text_length(gen) -> int | None:
    """The token count the generator's text encoder gives every prompt (None when it does not say)."""
    length = getattr(getattr(gen, "text", None), "max_length", None)
    return int(length) if isinstance(length, int) else None


def _sync(device: torch.device) -> None:
    """Wait for this thread's stream (not the whole device: an overlapped decode runs on another stream)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class StreamingGenerator:
    """Text-to-video with negative prompts, streamed block by block. Build with from_config()."""

    def __init__(self, cfg: DictConfig, model, vae, text_encoder, device, dtype, vae_dtype=None,
                 overlap_decode: bool | None = None):
        """vae_dtype: auto (None) = bf16 on CUDA, fp32 elsewhere (vae.BF16_DECODE_TOLERANCE); overlap_decode:
        decode block k while block k + 1 is denoised (None = on for CUDA)."""
        self.cfg, self.model, self.vae, self.text = cfg, model, vae, text_encoder
        self.spec = model_spec(cfg)  # the config's sections, typed and read once
        self.device, self.dtype = torch.device(device), dtype
        sampling = self.spec.sampling
        self.flow = FlowSchedule(sampling.shift, sampling.num_train_timesteps)
        self.steps = self.flow.step_list(list(sampling.steps), sampling.warp)
        self.prediction = prediction_of(cfg)  # what the network outputs
        self.codec = as_codec(vae)
        self.vae_dtype = set_codec_dtype(self.codec, resolve_vae_dtype(vae_dtype, self.device))
        self.overlap_decode = self.device.type == "cuda" if overlap_decode is None else bool(overlap_decode)
        self.decoder = self.codec.streaming_decoder()
        self.temporal_stride, self.spatial_stride, z_dim = (self.codec.temporal_stride, self.codec.spatial_stride,
                                                            self.codec.z_dim)
        if z_dim != model.config.in_channels:
            raise UserError(f"VAE has {z_dim} latent channels but the generator takes {model.config.in_channels}")

    @classmethod
    def from_config(cls, model: str = "toy", checkpoint: str | None = None, wan: str | None = None,
                    device: str | None = None, dtype: str | None = None, attention_backend: str = "auto",
                    overrides: dict | None = None, check_memory: bool = True,
                    compile: bool | None = None, vae_dtype: str | None = None,
                    overlap_decode: bool | None = None) -> "StreamingGenerator":
        """compile: torch.compile the generator's repeated block (one compiled code for all layers; see
        CausalWanTransformer.compile_blocks). None: on for CUDA, off elsewhere; True also works on the CPU
        (inductor). The first block of each cache length pays the compile: warm up before timing.
        vae_dtype: auto (None) = bf16 on CUDA, fp32 elsewhere; overlap_decode: decode block k while block k + 1
        is denoised (None = on for CUDA)."""
        cfg = load_config(model, overrides)
        device_ = resolve_device(device)
        dtype_ = resolve_dtype(dtype, device_)
        attention.set_backend(attention_backend)
        checkpoint = checkpoint or cfg.weights.get("checkpoint")
        if checkpoint is None and cfg.weights.source not in ("random", "bundled"):
            raise UserError(f"model {cfg.name} needs its generator weights: pass --checkpoint PATH")
        if checkpoint is not None and not os.path.exists(checkpoint):
            raise UserError(f"checkpoint not found: {checkpoint}")
        if check_memory:
            check_fits(cfg, device_, dtype_)
        vae, text = build_vae_and_text(cfg, device_, dtype_, wan)
        generator = build_generator(cfg, device_, dtype_, checkpoint)
        gen = cls(cfg, generator, vae, text, device_, dtype_, vae_dtype, overlap_decode)
        gen.set_compile(compile)
        return gen

    def set_compile(self, enable: bool | None = None) -> bool:
        """Compile the generator's blocks (True), run them eagerly (False), or the default for the device (None:
        on for CUDA). Returns whether the blocks are now compiled. What `--compile/--no-compile` maps to."""
        enable = resolve_compile(enable, self.device)
        compile_blocks = getattr(self.model, "compile_blocks", None)
        if compile_blocks is None:
            if enable:
                raise UserError(f"generator {type(self.model).__name__} has no compile_blocks(); use compile=False")
            return False
        compile_blocks(enable)
        return enable

    @property
    def compiled(self) -> bool:
        return bool(getattr(self.model, "compiled", False))

    # ---- the stream -------------------------------------------------------------------------------------
    def stream(self, prompt: str | None, negative=None, scale: ScaleSpec | None = None,
               guidance: str | Guidance | None = None, frames: int | None = None, seed: int | None = None,
               rolling: bool | None = None, decode: bool = True, *, prompt_embeds: torch.Tensor | None = None,
               negative_prompt_embeds=None, latents=None, generator: torch.Generator | None = None,
               overlap_decode: bool | None = None) -> "Stream":
        """An iterator of FrameChunk, one per block. frames=None: the config's length (unbounded if rolling).

        Research inputs (diffusers' names): prompt_embeds [1, L, text_dim] instead of the prompt's text (the text
        encoder's output; prompt may then be None or a label); negative_prompt_embeds: a tensor, a list of tensors
        or of (tensor, weight) pairs, added to the text negatives; latents: the initial noise of every block, a
        tensor [1, C, F, h, w] covering the video (block i takes frames [i*fpb, (i+1)*fpb)) or a list of per-block
        tensors [1, C, fpb, h, w]; generator: a torch.Generator on the device for all random draws instead of
        `seed` (with latents, it draws only the re-noising and context noise). decode=False: no VAE; each
        FrameChunk still carries its latents."""
        return Stream(self, prompt, negative, scale, guidance, frames, seed, rolling, decode,
                      prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, latents=latents,
                      generator=generator, overlap_decode=overlap_decode)

    def stream_batch(self, specs, guidance: str | Guidance | None = None, frames: int | None = None,
                     rolling: bool | None = None, decode: bool = True) -> "StreamBatch":
        """Several streams in one forward per step; see StreamBatch. specs: dicts of Stream's per-video arguments
        (prompt, negative, scale, seed, prompt_embeds, negative_prompt_embeds, latents, generator)."""
        from .batch import StreamBatch

        return StreamBatch(self, specs, guidance, frames, rolling, decode)

    def generate(self, prompt: str | None, out: str | os.PathLike, negative=None, scale: ScaleSpec | None = None,
                 guidance: str | Guidance | None = None, frames: int | None = None, seed: int | None = None,
                 rolling: bool | None = None, progress: bool = True, *, prompt_at: dict[int, str] | None = None,
                 recache: bool = False, output_type: str = "mp4", **inputs) -> GenerationResult:
        """Write an MP4 as the blocks arrive (temp file, renamed at the end). Ctrl-C keeps the finished blocks.

        prompt_at: {block: prompt} switches the positive prompt from that block on (Stream.set_prompt), re-caching
        the window at each switch when recache. output_type="latent": no decode; `out` gets a .safetensors with
        "latents" [1, C, F, h, w] float32. inputs: Stream's research inputs (prompt_embeds, negative_prompt_embeds,
        latents, generator)."""
        if output_type not in ("mp4", "latent"):
            raise UserError(f"output_type {output_type!r}: use 'mp4' or 'latent'")
        if output_type == "latent":
            return self._generate_latents(prompt, out, negative, scale, guidance, frames, seed, rolling, prompt_at,
                                          recache, **inputs)
        from tqdm import tqdm

        from .video_io import Mp4Writer

        writer = Mp4Writer(out, fps=self.spec.video.fps)
        zoom = self.spec.video.display_scale  # small models' frames, enlarged for viewing
        stream = self.stream(prompt, negative, scale, guidance, frames, seed, rolling, **inputs)
        switches = _check_prompt_at(prompt_at, stream)
        bar = tqdm(total=getattr(stream, "num_blocks", None), unit="block", disable=not progress, desc="generating")
        start, first, written, blocks = time.perf_counter(), 0.0, 0, 0
        recache_seconds, recaches = 0.0, 0
        interrupted = False
        try:
            for chunk in stream:
                writer.write(chunk.frames.repeat(zoom, axis=1).repeat(zoom, axis=2) if zoom > 1 else chunk.frames)
                written += len(chunk.frames)
                blocks += 1
                recache_seconds += chunk.recache_seconds
                recaches += chunk.recache_seconds > 0
                if chunk.block + 1 in switches:
                    stream.set_prompt(switches[chunk.block + 1], recache=recache)
                if blocks == 1:
                    first = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(frames=written)
        except KeyboardInterrupt:
            interrupted = True
        except BaseException as error:  # a failure mid-video: keep what was made, under a name that says so
            bar.close()
            partial = writer.keep_partial() if written else writer.abort()
            if partial is not None and isinstance(error, UserError):
                raise UserError(f"{error} (the {written} frames made before it are in {partial})") from None
            if partial is not None and hasattr(error, "add_note"):
                error.add_note(f"the {written} frames made before the failure are in {partial}")
            raise
        bar.close()
        if written:
            writer.close()
        else:
            writer.abort()
        return GenerationResult(str(out) if written else None, written, blocks, time.perf_counter() - start,
                                first, interrupted, recache_seconds, recaches)

    def _generate_latents(self, prompt, out, negative, scale, guidance, frames, seed, rolling, prompt_at, recache,
                          **inputs) -> GenerationResult:
        """output_type="latent": the clean latents of the whole video in one .safetensors (written atomically)."""
        from safetensors.torch import save_file

        from .video_io import check_output_path

        check_output_path(out, suffix=".safetensors")  # before the video, not after it
        stream = self.stream(prompt, negative, scale, guidance, frames, seed, rolling, decode=False, **inputs)
        switches = _check_prompt_at(prompt_at, stream)
        start, first, latents, recache_seconds, recaches = time.perf_counter(), 0.0, [], 0.0, 0
        for chunk in stream:
            latents.append(chunk.latents)
            if len(latents) == 1:
                first = time.perf_counter() - start
            recache_seconds += chunk.recache_seconds
            recaches += chunk.recache_seconds > 0
            if chunk.block + 1 in switches:
                stream.set_prompt(switches[chunk.block + 1], recache=recache)
        video = torch.cat(latents, dim=2).contiguous()
        tmp = f"{out}.partial"
        save_file({"latents": video}, tmp, metadata={"prompt": str(prompt), "seed": str(stream.seed),
                                                     "frames_per_block": str(stream.fpb)})
        os.replace(tmp, out)
        return GenerationResult(str(out), video.shape[2], len(latents), time.perf_counter() - start, first, False,
                                recache_seconds, recaches)


def _check_prompt_at(prompt_at, stream) -> dict[int, str]:
    """{block: prompt} checked against the stream: blocks >= 1 (block 0 is the prompt) and inside the video."""
    switches = dict(prompt_at or {})
    for block, text in switches.items():
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise UserError(f"--prompt-at {block}: the block must be a whole number >= 1 (block 0 is --prompt)")
        if stream.num_blocks is not None and block >= stream.num_blocks:
            raise UserError(f"--prompt-at {block}: the video has {stream.num_blocks} blocks (0..{stream.num_blocks - 1})")
        check_prompt(text, f"prompt at block {block}")
        stream.gen.text.check_readable(text, f"prompt at block {block}")
        stream.gen.text.encode(text)  # over the token limit: one line now, not a partial video at that block
    return switches


def rebase_positions(gen, kv_caches, held: dict, start: int, offset: int, fpb: int, capacity: int, endless: bool,
                     what: str) -> tuple[int, dict]:
    """(offset, held) for the block at latent frame `start`, given the positions taken off so far (`offset`). When
    the block would pass the RoPE table, a rolling stream re-bases: the cached non-sink frames move back by
    delta = position - (capacity - fpb), so the window left after this block's eviction sits right after the sink
    frames, as when the cache first filled, and the block goes at capacity - fpb. Relative positions inside the
    window are unchanged; the sinks keep positions 0..sink-1, so only the sink-to-window distance changes (back to
    what it was then). `held` (position -> a cached block's cache-pass input, for a re-cache) moves with its
    frames. A fixed cache (or a generator without shift_positions) stops here with one line."""
    position, limit = start - offset, gen.model.max_frame_positions
    if position + fpb <= limit:
        return offset, held
    if not endless or capacity > limit:
        raise UserError(f"{what} reached latent frame {start}, the last position {gen.cfg.name} encodes ({limit}); "
                        f"{'it ends' if what == 'the stream' else 'they end'} here")
    delta = position - (capacity - fpb)
    for cache in kv_caches:
        gen.model.shift_positions(cache, delta)
    sink = kv_caches[0].sink_frames
    return offset + delta, {(s if s < sink else s - delta): context for s, context in held.items()}


class Stream:
    """One video in progress. set_prompt() / set_negative() / set_scale() take effect from the next block and
    compose: only the changed text K/V are rebuilt, the self-attention cache (the video so far) is kept, unless
    set_prompt(..., recache=True) asks to recompute it under the new prompt."""

    def __init__(self, gen: StreamingGenerator, prompt, negative, scale, guidance, frames, seed, rolling, decode,
                 prompt_embeds=None, negative_prompt_embeds=None, latents=None, generator=None,
                 overlap_decode: bool | None = None):
        cfg, spec = gen.cfg, gen.spec
        text_dim = gen.model.config.text_dim
        if prompt_embeds is None:
            check_prompt(prompt)
        else:
            prompt_embeds = check_embeds(prompt_embeds, text_dim, length=_text_length(gen)).to(gen.device)
        if generator is None:
            seed = 0 if seed is None else seed
            check_seed(seed)
        elif seed is not None:  # one of them would be ignored
            raise UserError("give seed or generator, not both: the generator draws all the noise, so seed would be "
                            "ignored")
        elif not isinstance(generator, torch.Generator) or generator.device.type != gen.device.type:
            raise UserError(f"generator must be a torch.Generator on {gen.device.type} (the stream's device)")
        self.gen, self.decode = gen, decode
        self.ended = False  # set when every block is made
        # Overlapped, a negative set after chunk k (k >= 1) applies from block k + 2: block k + 1 is already made.
        self.overlap_decode = gen.overlap_decode if overlap_decode is None else bool(overlap_decode)
        self.fpb = spec.video.frames_per_block
        self.rolling = spec.cache.rolling if rolling is None else rolling
        if frames is None:
            self.latent_total = None if self.rolling else spec.video.latent_frames
        else:
            self.latent_total = latent_frames_for(int(frames), self.fpb, gen.temporal_stride)
        self.max_latent_frames = gen.model.max_frame_positions  # temporal positions the generator can encode
        # A rolling stream re-bases its positions (see _position) and never runs out; a fixed cache cannot.
        self.endless = self.rolling and hasattr(gen.model, "shift_positions")
        self.rebases: deque[int] = deque(maxlen=1024)  # the latest blocks before which positions were re-based
        if self.latent_total is not None and self.latent_total > self.max_latent_frames and not self.endless:
            most = pixel_frames(self.max_latent_frames // self.fpb * self.fpb, gen.temporal_stride)
            raise UserError(f"{pixel_frames(self.latent_total, gen.temporal_stride)} frames need {self.latent_total} "
                            f"latent frames but {cfg.name} encodes positions for {self.max_latent_frames}; "
                            f"ask for at most {most} frames")
        self.guidance = guidance if isinstance(guidance, Guidance) else method_from_config(cfg, guidance)
        self.uncond_cache: TextCache | None = None  # CFG: the negative (or empty) prompt as its own context
        # CFG always refreshes both caches with their own contexts; attention methods follow the config.
        in_cache = spec.guidance.in_cache_pass or not self.guidance.in_attention
        self.cache_pass_guidance = self.guidance if in_cache else _PLAIN
        self.seed, self.generator = seed, generator
        self.latent_hw = (spec.video.height // gen.spatial_stride, spec.video.width // gen.spatial_stride)
        self.latents = self._check_latents(latents)
        if prompt_embeds is None:
            gen.text.check_readable(prompt)
            prompt_embeds = gen.text.encode(prompt)
        self.prompt = prompt if isinstance(prompt, str) and prompt.strip() else EMBEDS
        with torch.no_grad():
            self.text_cache = TextCache(gen.model, prompt_embeds)
        self._pending: tuple | None = None
        self._pending_prompt: tuple | None = None
        self.negatives: list[tuple[str, float]] = []
        self._negative_items: list[tuple] = []  # (label, weight, embeddings or None for text)
        self._negative_key: list = []
        self.schedule = ScaleSchedule(default_scale(spec, self.guidance))
        self.set_negative(negative, default_scale(spec, self.guidance) if scale is None else scale,
                          negative_prompt_embeds)
        self._apply_pending()
        self.kv_cache: tuple | None = None  # the self-attention cache(s) of the running video (set by iteration)
        self.held: dict[int, torch.Tensor] = {}  # start frame -> the cache pass's input, for blocks in the cache
        self.recaches: list[tuple[int, float]] = []  # (block, seconds) of each re-cache done

    def _check_latents(self, latents):
        """latents: None, a tensor [1, C, F, h, w], or a list of per-block tensors [1, C, fpb, h, w]."""
        if latents is None:
            return None
        channels, (h, w) = self.gen.model.config.in_channels, self.latent_hw
        blocks = [latents] if isinstance(latents, torch.Tensor) else list(latents)
        for i, item in enumerate(blocks):
            frames = self.fpb if not isinstance(latents, torch.Tensor) else None
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
        covered = blocks[0].shape[2] // self.fpb if isinstance(latents, torch.Tensor) else len(blocks)
        if self.latent_total is not None and covered < self.num_blocks:
            raise UserError(f"latents cover {covered} blocks but the video has {self.num_blocks}: give "
                            f"{self.latent_total} latent frames")
        return latents

    def _initial_noise(self, block: int, shape, rng: torch.Generator) -> torch.Tensor:
        device = self.gen.device
        if self.latents is None:
            return torch.randn(shape, generator=rng, device=device, dtype=torch.float32)
        if isinstance(self.latents, torch.Tensor):
            piece = self.latents[:, :, block * self.fpb:(block + 1) * self.fpb]
        else:
            piece = self.latents[block] if block < len(self.latents) else self.latents[:0]
        if piece.shape[2] != self.fpb:
            raise UserError(f"the given latents end before block {block}; the stream ends here")
        return piece.to(device=device, dtype=torch.float32)

    @property
    def num_blocks(self) -> int | None:
        return None if self.latent_total is None else self.latent_total // self.fpb

    def set_prompt(self, prompt: str | None = None, recache: bool = False,
                   prompt_embeds: torch.Tensor | None = None) -> None:
        """Replace the positive prompt (text, or the encoder's output prompt_embeds [1, L, text_dim]) from the next
        block; the negatives and scale are kept (and set_negative / set_scale compose with it).

        recache=False: later blocks attend to the video so far as it was cached (under the old prompt).
        recache=True (LongLive's KV re-cache): before the next block, the cache pass is re-run over the clean
        latents of every block still in the self-attention cache, oldest first, under the new prompt, so the
        cached window's K/V agree with the new prompt. Cost: one forward per cached block (up to the cache's
        capacity / frames_per_block), reported in the next FrameChunk's recache_seconds."""
        self._check_running("set_prompt")
        if prompt_embeds is None:
            check_prompt(prompt)
            self.gen.text.check_readable(prompt)
            embeds = self.gen.text.encode(prompt)  # fail now, not in the middle of a block
            label = prompt
        else:
            embeds = check_embeds(prompt_embeds, self.gen.model.config.text_dim,
                                  length=_text_length(self.gen)).to(self.gen.device)
            label = prompt if isinstance(prompt, str) and prompt.strip() else EMBEDS
        self._pending_prompt = (label, embeds, bool(recache))

    def set_negative(self, negative, scale: ScaleSpec | None = None, negative_prompt_embeds=None) -> None:
        """Replace the negative prompt(s) (str, list of str, or (text, weight) pairs, and/or negative_prompt_embeds:
        a tensor [1, L, text_dim], a list of them or of (tensor, weight) pairs) from the next block."""
        self._check_running("set_negative")
        items = [(t, w, None) for t, w in parse_negatives(negative)]
        items += negative_embeds_items(negative_prompt_embeds, self.gen.model.config.text_dim, _text_length(self.gen))
        self._queue_negatives(items, scale)

    def _queue_negatives(self, items: list[tuple], scale: ScaleSpec | None) -> None:
        self.guidance.check_negatives(len(items))
        schedule = self.schedule if scale is None else ScaleSchedule(scale)
        for value in schedule.values():
            self.guidance.check_scale(value)
        self.guidance.check_weights([weight for _, weight, _ in items], schedule.values())
        for text, weight, embeds in items:
            if embeds is None:
                self.gen.text.check_readable(text, "negative prompt")
                self.gen.text.encode(text)  # fail now (e.g. too many tokens), not in the middle of a block
        self._pending = (items, schedule)

    def set_scale(self, scale: ScaleSpec) -> None:
        self._check_running("set_scale")
        self._queue_negatives(self._negative_items if self._pending is None else self._pending[0], scale)

    def _apply_pending(self) -> bool:
        """Apply the queued changes; True when a re-cache is due before the next block."""
        recache = False
        if self._pending_prompt is not None:
            label, embeds, recache = self._pending_prompt
            self._pending_prompt = None
            with torch.no_grad():
                self.text_cache.set_positive(embeds)
            self.prompt = label
        if self._pending is None:
            return recache
        items, self.schedule = self._pending
        self._pending = None
        texts, weights = [t for t, _, _ in items], [w for _, w, _ in items]
        key = [t if e is None else id(e) for t, _, e in items]
        if key != self._negative_key:
            text = self.gen.text
            embeddings = [text.encode(t) if e is None else e.to(self.gen.device) for t, _, e in items]
            lengths = [text.token_count(t) if e is None else embeds_length(e) for t, _, e in items]
            with torch.no_grad():
                self.text_cache.set_negatives(texts, weights, embeddings, lengths)
                if not self.guidance.in_attention:
                    self.uncond_cache = TextCache(self.gen.model, embeddings[0] if embeddings else text.encode(""))
        if not self.guidance.in_attention and self.uncond_cache is None:
            with torch.no_grad():
                self.uncond_cache = TextCache(self.gen.model, self.gen.text.encode(""))
        self.text_cache.weights = weights
        self.negatives = [(t, w) for t, w, _ in items]
        self._negative_items, self._negative_key = items, key
        return recache

    def __iter__(self) -> Iterator[FrameChunk]:
        yield from self._run()
        self.ended = True  # every block is made: a later change would apply to nothing

    def _check_running(self, what: str) -> None:
        if self.ended:
            raise UserError(f"{what} after the stream ended (all its blocks are made) would apply to nothing: "
                            f"start a new stream")

    @torch.no_grad()
    def _run(self) -> Iterator[FrameChunk]:
        gen, spec = self.gen, self.gen.spec
        model, device = gen.model, gen.device
        h, w = self.latent_hw
        capacity = spec.cache.capacity_frames
        if self.latent_total is not None:
            check_cache_holds(self.latent_total, capacity, self.rolling, gen.temporal_stride)
        # CFG's unconditional pass needs its own self-attention cache, refreshed with its own context.
        kv_cache = tuple(model.new_kv_cache(1, capacity, h, w, self.rolling, spec.cache.sink_frames, gen.dtype,
                                            device) for _ in range(1 if self.guidance.in_attention else 2))
        self.kv_cache, self.held = kv_cache, {}
        rng = self.generator if self.generator is not None else torch.Generator(device=device).manual_seed(int(self.seed))
        channels = model.config.in_channels
        gen.decoder.reset()
        worker = OverlappedDecoder(gen.decoder, device) if self.decode and self.overlap_decode else None
        pending = None  # overlapped: (the chunk's fields, the Future of its frames) of the block being decoded
        first_frame = 0

        def finish(fields: dict, frames, decode_s: float, wait_s: float) -> FrameChunk:
            nonlocal first_frame
            chunk = FrameChunk(first_frame=first_frame, frames=frames, decode_seconds=decode_s,
                               decode_wait_seconds=wait_s, **fields)
            first_frame += 0 if frames is None else len(frames)
            return chunk

        def collect(fields: dict, future) -> FrameChunk:
            t = time.perf_counter()
            frames, decode_s = future.result()
            return finish(fields, frames, decode_s, time.perf_counter() - t)

        block = 0
        offset = 0  # positions taken off by re-bases so far: the block at latent frame `start` sits at start - offset
        try:
            while self.num_blocks is None or block < self.num_blocks:
                recache_seconds = self.recache(block) if self._apply_pending() else 0.0
                start = block * self.fpb
                try:
                    offset = self._position(kv_cache, start, offset, capacity)
                except UserError:  # a fixed cache reached the position limit: the block made before it is the caller's
                    if pending is not None:
                        yield collect(*pending)
                        pending = None
                    raise
                t0 = time.perf_counter()
                x0 = self._denoise_block(kv_cache, rng, start - offset, (1, channels, self.fpb, h, w), block)
                _sync(device)
                denoise_s = time.perf_counter() - t0
                fields = dict(block=block, latent_frames=(start, start + self.fpb), latents=x0.float().cpu(),
                              negative=list(self.negatives), scale=self.schedule(block, len(gen.steps) - 1),
                              denoise_seconds=denoise_s, prompt=self.prompt, recache_seconds=recache_seconds)
                if not self.decode:
                    yield finish(fields, None, 0.0, 0.0)
                elif worker is None:
                    frames, decode_s = decode_now(gen.decoder, x0)
                    yield finish(fields, frames, decode_s, decode_s)
                else:
                    future = worker.submit(x0)  # decodes while the next block is denoised
                    if pending is not None:  # the previous block, decoded while this one was denoised
                        yield collect(*pending)
                        pending = None
                    if block == 0:  # first-block latency: yield it now rather than after block 1's denoising
                        yield collect(fields, future)
                    else:
                        pending = (fields, future)
                block += 1
            if pending is not None:
                yield collect(*pending)
        finally:
            if worker is not None:
                worker.close()

    @torch.no_grad()
    def recache(self, block: int) -> float:
        """Re-run the cache pass of every block still in the self-attention cache (before `block`), oldest first,
        under the current text cache: each rewrites its own slots and attends to the (re-cached) slots before it,
        as its first cache pass did. Only the positive branch's cache (CFG's unconditional one keeps its context).
        Returns the seconds it took (also kept in self.recaches)."""
        gen, cache = self.gen, self.kv_cache[0] if self.kv_cache else None
        if cache is None:
            return 0.0
        t0 = time.perf_counter()
        guidance = self.cache_pass_guidance if self.guidance.in_attention else _PLAIN
        context_t = gen.spec.sampling.context_noise
        last = len(gen.steps) - 1
        for start in sorted(self.held):
            context = self.held[start]
            t = torch.full((1, self.fpb), float(context_t), device=gen.device)
            scale = guidance.scale_at(self.schedule(start // self.fpb, last), float(gen.flow.sigma(t[:, :1].cpu()).max()))
            gen.model.set_text(self.text_cache.guide(guidance, scale))
            gen.model(context, t, start, cache)
        _sync(gen.device)
        seconds = time.perf_counter() - t0
        self.recaches.append((block, seconds))
        return seconds

    def _hold(self, start: int, context: torch.Tensor) -> None:
        """Keep the cache pass's input of a block while the block's frames are in the cache (for a re-cache)."""
        self.held[start] = context
        self.held = self.kv_cache[0].still_held(self.held, self.fpb)

    def _position(self, kv_cache: tuple, start: int, offset: int, capacity: int) -> int:
        """The position offset for the block at latent frame `start` (see rebase_positions)."""
        new_offset, self.held = rebase_positions(self.gen, kv_cache, self.held, start, offset, self.fpb, capacity,
                                                 self.endless, "the stream")
        if new_offset != offset:
            self.rebases.append(start // self.fpb)
        return new_offset

    def _predict(self, x, t, scale: float, start: int, kv_cache: tuple, guidance: Guidance) -> torch.Tensor:
        """One denoising prediction (v, or x0 for x0-prediction models): a single guided pass, or CFG's two
        passes (each with its own caches)."""
        model, text = self.gen.model, self.text_cache
        scale = guidance.scale_at(scale, float(self.gen.flow.sigma(t[:, :1].cpu()).max()))
        if guidance.in_attention:
            model.set_text(text.guide(guidance, scale))
            return model(x, t, start, kv_cache[0])
        model.set_text(text.guide(_PLAIN))
        v_pos = model(x, t, start, kv_cache[0])
        model.set_text(self.uncond_cache.guide(_PLAIN))
        v_neg = model(x, t, start, kv_cache[1])
        return guidance.combine(v_pos, v_neg, scale)

    def _denoise_block(self, kv_cache: tuple, rng: torch.Generator, start: int, shape,
                       block: int | None = None) -> torch.Tensor:
        """start: the block's first temporal position (its latent frame less any re-base); block: its index."""
        gen = self.gen
        flow, device = gen.flow, gen.device
        block = start // self.fpb if block is None else block

        def t_of(value: float) -> torch.Tensor:
            return torch.full(shape[:1] + shape[2:3], float(value), device=device)

        x = self._initial_noise(block, shape, rng)
        x0 = x
        for step, t_value in enumerate(gen.steps):
            t = t_of(t_value)
            output = self._predict(x, t, self.schedule.at(block, step, self.guidance), start, kv_cache, self.guidance)
            x0 = flow.prediction_to_x0(output.float(), x, t, gen.prediction)
            if step + 1 < len(gen.steps):
                noise = torch.randn(shape, generator=rng, device=device, dtype=torch.float32)
                x = flow.add_noise(x0, noise, t_of(gen.steps[step + 1]))
        # Cache pass: rewrite this block's K/V from the clean prediction so later blocks see clean context.
        context_t = gen.spec.sampling.context_noise
        context = x0
        if context_t > 0:
            noise = torch.randn(shape, generator=rng, device=device, dtype=torch.float32)
            context = flow.add_noise(x0, noise, t_of(context_t))
        last = self.schedule.at(block, len(gen.steps) - 1, self.guidance)
        self._predict(context, t_of(context_t), last, start, kv_cache,
                       self.cache_pass_guidance)
        if kv_cache is self.kv_cache:
            self._hold(start, context)
        return x0
