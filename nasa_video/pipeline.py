"""The streaming loop: the one place that knows the order of things.

    encode prompts -> text cache (positive + negatives, once)
    for each block of latent frames:
        for each step t_i:  x0 = G(x_t, t_i)   [guidance inside every cross-attention]
                            x_{t_{i+1}} = (1 - s) x0 + s * fresh noise      (not after the last step)
        one cache pass over the clean x0 at t = context_noise (writes the K/V later blocks read)
        streaming VAE decode -> uint8 frames, yielded at once
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from omegaconf import DictConfig

from . import attention
from .errors import UserError
from .guidance import Guidance, NoGuidance, ScaleSchedule, ScaleSpec, make_guidance, parse_negatives
from .loading import build_generator, build_vae_and_text, load_config, resolve_device, resolve_dtype
from .model.cache import SelfAttentionCache, TextCache
from .schedule import FlowSchedule, prediction_of
from .vae import StreamingDecoder, codec_strides, to_uint8


@dataclass
class FrameChunk:
    """One block's output. frames: [T, H, W, 3] uint8 (None when decode=False)."""

    block: int
    first_frame: int  # index in the video of frames[0]
    latent_frames: tuple[int, int]  # [start, end) latent frames of this block
    frames: np.ndarray | None
    latents: torch.Tensor  # [1, C, F, h, w] on the CPU, float32
    negative: list[tuple[str, float]]
    scale: float
    denoise_seconds: float
    decode_seconds: float


@dataclass
class GenerationResult:
    path: str | None
    frames: int
    blocks: int
    seconds: float
    first_block_seconds: float
    interrupted: bool = False


_PLAIN = NoGuidance()


def pixel_frames(latent_frames: int, temporal_stride: int = 4) -> int:
    return 1 + temporal_stride * (latent_frames - 1)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StreamingGenerator:
    """Text-to-video with negative prompts, streamed block by block. Build with from_config()."""

    def __init__(self, cfg: DictConfig, model, vae, text_encoder, device, dtype):
        self.cfg, self.model, self.vae, self.text = cfg, model, vae, text_encoder
        self.device, self.dtype = torch.device(device), dtype
        self.flow = FlowSchedule(float(cfg.sampling.shift), int(cfg.sampling.num_train_timesteps))
        self.steps = self.flow.step_list(list(cfg.sampling.steps), bool(cfg.sampling.warp))
        self.prediction = prediction_of(cfg)  # what the network outputs
        self.decoder = StreamingDecoder(vae)
        self.temporal_stride, self.spatial_stride, z_dim = codec_strides(vae)
        if z_dim != model.config.in_channels:
            raise UserError(f"VAE has {z_dim} latent channels but the generator takes {model.config.in_channels}")

    @classmethod
    def from_config(cls, model: str = "toy", checkpoint: str | None = None, wan: str | None = None,
                    device: str | None = None, dtype: str | None = None, attention_backend: str = "auto",
                    overrides: dict | None = None, check_memory: bool = True) -> "StreamingGenerator":
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
        return cls(cfg, generator, vae, text, device_, dtype_)

    # ---- the stream -------------------------------------------------------------------------------------
    def stream(self, prompt: str, negative=None, scale: ScaleSpec | None = None, guidance: str | Guidance | None = None,
               frames: int | None = None, seed: int = 0, rolling: bool | None = None, decode: bool = True) -> "Stream":
        """An iterator of FrameChunk, one per block. frames=None: the config's length (unbounded if rolling)."""
        return Stream(self, prompt, negative, scale, guidance, frames, seed, rolling, decode)

    def generate(self, prompt: str, out: str | os.PathLike, negative=None, scale: ScaleSpec | None = None,
                 guidance: str | Guidance | None = None, frames: int | None = None, seed: int = 0,
                 rolling: bool | None = None, progress: bool = True) -> GenerationResult:
        """Write an MP4 as the blocks arrive (temp file, renamed at the end). Ctrl-C keeps the finished blocks."""
        from tqdm import tqdm

        from .video_io import Mp4Writer

        writer = Mp4Writer(out, fps=int(self.cfg.video.fps))
        zoom = int(self.cfg.video.get("display_scale", 1))  # small models' frames, enlarged for viewing
        stream = self.stream(prompt, negative, scale, guidance, frames, seed, rolling)
        bar = tqdm(total=getattr(stream, "num_blocks", None), unit="block", disable=not progress, desc="generating")
        start, first, written, blocks = time.perf_counter(), 0.0, 0, 0
        interrupted = False
        try:
            for chunk in stream:
                writer.write(chunk.frames.repeat(zoom, axis=1).repeat(zoom, axis=2) if zoom > 1 else chunk.frames)
                written += len(chunk.frames)
                blocks += 1
                if blocks == 1:
                    first = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(frames=written)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
            if written:
                writer.close()
            else:
                writer.abort()
        return GenerationResult(str(out) if written else None, written, blocks, time.perf_counter() - start,
                                first, interrupted)


class Stream:
    """One video in progress. set_negative() / set_scale() take effect from the next block: only the
    negative text K/V are rebuilt, the self-attention cache (the video so far) is kept."""

    def __init__(self, gen: StreamingGenerator, prompt, negative, scale, guidance, frames, seed, rolling, decode):
        cfg = gen.cfg
        self.gen, self.decode = gen, decode
        self.fpb = int(cfg.video.frames_per_block)
        self.rolling = bool(cfg.cache.rolling) if rolling is None else rolling
        if frames is None:
            self.latent_total = None if self.rolling else int(cfg.video.latent_frames)
        else:
            self.latent_total = latent_frames_for(int(frames), self.fpb, gen.temporal_stride)
        self.guidance = make_guidance(cfg.guidance.method if guidance is None else guidance) \
            if not isinstance(guidance, Guidance) else guidance
        self.uncond_cache: TextCache | None = None  # CFG: the negative (or empty) prompt as its own context
        # CFG always refreshes both caches with their own contexts; attention methods follow the config.
        in_cache = bool(cfg.guidance.in_cache_pass) or not self.guidance.in_attention
        self.cache_pass_guidance = self.guidance if in_cache else _PLAIN
        self.seed = seed
        self.latent_hw = (int(cfg.video.height) // gen.spatial_stride, int(cfg.video.width) // gen.spatial_stride)
        with torch.no_grad():
            self.text_cache = TextCache(gen.model, gen.text.encode(prompt))
        self._pending: tuple | None = None
        self.negatives: list[tuple[str, float]] = []
        self.schedule = ScaleSchedule(float(cfg.guidance.scale))
        self.set_negative(negative, cfg.guidance.scale if scale is None else scale)
        self._apply_pending()

    @property
    def num_blocks(self) -> int | None:
        return None if self.latent_total is None else self.latent_total // self.fpb

    def set_negative(self, negative, scale: ScaleSpec | None = None) -> None:
        """Replace the negative prompt(s) (str, list of str, or (text, weight) pairs) from the next block."""
        negatives = parse_negatives(negative)
        self.guidance.check_negatives(len(negatives))
        schedule = self.schedule if scale is None else ScaleSchedule(scale)
        for value in schedule.values():
            self.guidance.check_scale(value)
        for text, _ in negatives:
            self.gen.text.encode(text)  # fail now (e.g. too many tokens), not in the middle of a block
        self._pending = (negatives, schedule)

    def set_scale(self, scale: ScaleSpec) -> None:
        self.set_negative(self.negatives if self._pending is None else self._pending[0], scale)

    def _apply_pending(self) -> None:
        if self._pending is None:
            return
        negatives, self.schedule = self._pending
        self._pending = None
        texts, weights = [t for t, _ in negatives], [w for _, w in negatives]
        if texts != self.text_cache.negative_texts:
            with torch.no_grad():
                self.text_cache.set_negatives(texts, weights, [self.gen.text.encode(t) for t in texts],
                                              [self.gen.text.token_count(t) for t in texts])
                if not self.guidance.in_attention:
                    self.uncond_cache = TextCache(self.gen.model, self.gen.text.encode(texts[0] if texts else ""))
        if not self.guidance.in_attention and self.uncond_cache is None:
            with torch.no_grad():
                self.uncond_cache = TextCache(self.gen.model, self.gen.text.encode(""))
        self.text_cache.weights = weights
        self.negatives = negatives

    def __iter__(self) -> Iterator[FrameChunk]:
        return self._run()

    @torch.no_grad()
    def _run(self) -> Iterator[FrameChunk]:
        gen, cfg = self.gen, self.gen.cfg
        model, device = gen.model, gen.device
        h, w = self.latent_hw
        capacity = int(cfg.cache.capacity_frames)
        if self.latent_total is not None and not self.rolling and self.latent_total > capacity:
            raise UserError(f"{pixel_frames(self.latent_total, gen.temporal_stride)} frames need {self.latent_total} "
                            f"latent frames but the cache holds {capacity}; use --rolling or fewer frames")
        # CFG's unconditional pass needs its own self-attention cache, refreshed with its own context.
        kv_cache = tuple(model.new_kv_cache(1, capacity, h, w, self.rolling, int(cfg.cache.sink_frames), gen.dtype,
                                            device) for _ in range(1 if self.guidance.in_attention else 2))
        rng = torch.Generator(device=device).manual_seed(int(self.seed))
        channels = model.config.in_channels
        gen.decoder.reset()
        block, first_frame = 0, 0
        while self.num_blocks is None or block < self.num_blocks:
            self._apply_pending()
            start = block * self.fpb
            t0 = time.perf_counter()
            x0 = self._denoise_block(kv_cache, rng, start, (1, channels, self.fpb, h, w))
            _sync(device)
            t1 = time.perf_counter()
            frames = None
            if self.decode:
                frames = to_uint8(gen.decoder.decode(x0))[0].numpy()
            t2 = time.perf_counter()
            yield FrameChunk(block, first_frame, (start, start + self.fpb), frames, x0.float().cpu(),
                             list(self.negatives), self.schedule(block, len(gen.steps) - 1), t1 - t0, t2 - t1)
            first_frame += 0 if frames is None else len(frames)
            block += 1

    def _predict(self, x, t, scale: float, start: int, kv_cache: tuple, guidance: Guidance) -> torch.Tensor:
        """One denoising prediction (v, or x0 for x0-prediction models): a single guided pass, or CFG's two
        passes (each with its own caches)."""
        model, text = self.gen.model, self.text_cache
        scale = guidance.scale_at(scale, float(self.gen.flow.sigma(t[:, :1].cpu()).max()))
        if guidance.in_attention:
            return model(x, t, text.layers, guidance, text.alphas(scale), start, kv_cache[0])
        v_pos = model(x, t, text.layers, _PLAIN, (), start, kv_cache[0])
        v_neg = model(x, t, self.uncond_cache.layers, _PLAIN, (), start, kv_cache[1])
        return guidance.combine(v_pos, v_neg, scale)

    def _denoise_block(self, kv_cache: tuple, rng: torch.Generator, start: int, shape) -> torch.Tensor:
        gen = self.gen
        flow, device = gen.flow, gen.device
        block = start // self.fpb

        def t_of(value: float) -> torch.Tensor:
            return torch.full(shape[:1] + shape[2:3], float(value), device=device)

        x = torch.randn(shape, generator=rng, device=device, dtype=torch.float32)
        x0 = x
        for step, t_value in enumerate(gen.steps):
            t = t_of(t_value)
            output = self._predict(x, t, self.schedule(block, step), start, kv_cache, self.guidance)
            x0 = flow.prediction_to_x0(output.float(), x, t, gen.prediction)
            if step + 1 < len(gen.steps):
                noise = torch.randn(shape, generator=rng, device=device, dtype=torch.float32)
                x = flow.add_noise(x0, noise, t_of(gen.steps[step + 1]))
        # Cache pass: rewrite this block's K/V from the clean prediction so later blocks see clean context.
        context_t = float(gen.cfg.sampling.context_noise)
        context = x0
        if context_t > 0:
            noise = torch.randn(shape, generator=rng, device=device, dtype=torch.float32)
            context = flow.add_noise(x0, noise, t_of(context_t))
        self._predict(context, t_of(context_t), self.schedule(block, len(gen.steps) - 1), start, kv_cache,
                       self.cache_pass_guidance)
        return x0


# ---- memory -----------------------------------------------------------------------------------------------
def memory_estimate(cfg: DictConfig, dtype: torch.dtype, negatives: int = 1, kv_caches: int = 1) -> dict[str, int]:
    """Bytes the generator needs: weights, self-attention cache(s), text cache and the largest activations."""
    from .model.causal_wan import parameter_count

    g = cfg.generator
    dim = g.num_attention_heads * g.attention_head_dim
    stride = cfg.video.vae_stride[1]
    tokens_per_frame = (cfg.video.height // stride // g.patch_size[1]) * (cfg.video.width // stride // g.patch_size[2])
    block_tokens = tokens_per_frame * cfg.video.frames_per_block
    text_tokens = cfg.weights.text_max_length
    generator = {k: tuple(v) if k == "patch_size" else v for k, v in dict(g).items()}
    return {
        "weights": parameter_count(generator) * dtype.itemsize,
        "kv_cache": kv_caches * SelfAttentionCache.nbytes_for(g.num_layers, 1, cfg.cache.capacity_frames,
                                                              tokens_per_frame, g.num_attention_heads,
                                                              g.attention_head_dim, dtype),
        "text_cache": 2 * g.num_layers * (1 + negatives) * text_tokens * dim * dtype.itemsize,
        "activations": 6 * block_tokens * max(g.ffn_dim, 4 * dim) * 4,
    }


def available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(cfg: DictConfig, device: torch.device, dtype: torch.dtype, negatives: int = 1) -> dict[str, int]:
    estimate = memory_estimate(cfg, dtype, negatives)
    free = available_memory(device)
    total = sum(estimate.values())
    if free is not None and total > free:
        parts = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in estimate.items())
        raise UserError(f"{cfg.name} needs about {total / 2**30:.1f} GiB on {device} ({parts}) but "
                        f"{free / 2**30:.1f} GiB is free; use --dtype bf16, fewer frames, or a larger device")
    return estimate
