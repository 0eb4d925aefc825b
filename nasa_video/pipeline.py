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
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from omegaconf import DictConfig

from . import attention
from .errors import UserError
from .guidance import Guidance, NoGuidance, ScaleSchedule, ScaleSpec, make_guidance, parse_negatives
from .loading import build_generator, build_vae_and_text, load_config, resolve_device, resolve_dtype
from .config import latent_frames_for, model_spec, pixel_frames  # noqa: F401 (re-exported)
from .memory import check_fits
from .model.cache import TextCache
from .schedule import FlowSchedule, prediction_of
from .vae import as_codec, to_uint8


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


def check_prompt(prompt, what: str = "prompt") -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"the {what} is empty: give some text")


SEED_LIMIT = 2 ** 63  # torch.Generator seeds are signed 64-bit


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise UserError(f"--seed {seed} is out of range: use a whole number in [0, 2^63)")


def method_from_config(cfg: DictConfig, name: str | None = None, **settings) -> Guidance:
    """The guidance method a config asks for (or `name`), with its own settings from the config's
    guidance.settings.<method> (NAG's tau, blend, sigma_end; VSF's bias), overridden by `settings`."""
    from omegaconf import OmegaConf

    name = str(cfg.guidance.method if name is None else name)
    section = (cfg.guidance.get("settings") or {}).get(name) or {}
    configured = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)
    return make_guidance(name, **{**configured, **{k: v for k, v in settings.items() if v is not None}})


def resolve_compile(compile: bool | None, device) -> bool:
    """The compile switch: None means on for CUDA (where it pays), off for the CPU (where compiling a video's few
    shapes costs more than it saves); True / False as given."""
    if compile is None:
        return torch.device(device).type == "cuda"
    return bool(compile)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StreamingGenerator:
    """Text-to-video with negative prompts, streamed block by block. Build with from_config()."""

    def __init__(self, cfg: DictConfig, model, vae, text_encoder, device, dtype):
        self.cfg, self.model, self.vae, self.text = cfg, model, vae, text_encoder
        self.spec = model_spec(cfg)  # the config's sections, typed and read once
        self.device, self.dtype = torch.device(device), dtype
        sampling = self.spec.sampling
        self.flow = FlowSchedule(sampling.shift, sampling.num_train_timesteps)
        self.steps = self.flow.step_list(list(sampling.steps), sampling.warp)
        self.prediction = prediction_of(cfg)  # what the network outputs
        self.codec = as_codec(vae)
        self.decoder = self.codec.streaming_decoder()
        self.temporal_stride, self.spatial_stride, z_dim = (self.codec.temporal_stride, self.codec.spatial_stride,
                                                            self.codec.z_dim)
        if z_dim != model.config.in_channels:
            raise UserError(f"VAE has {z_dim} latent channels but the generator takes {model.config.in_channels}")

    @classmethod
    def from_config(cls, model: str = "toy", checkpoint: str | None = None, wan: str | None = None,
                    device: str | None = None, dtype: str | None = None, attention_backend: str = "auto",
                    overrides: dict | None = None, check_memory: bool = True,
                    compile: bool | None = None) -> "StreamingGenerator":
        """compile: torch.compile the generator's repeated block (one compiled code for all layers; see
        CausalWanTransformer.compile_blocks). None: on for CUDA, off elsewhere; True also works on the CPU
        (inductor). The first block of each cache length pays the compile: warm up before timing."""
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
        gen = cls(cfg, generator, vae, text, device_, dtype_)
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

        writer = Mp4Writer(out, fps=self.spec.video.fps)
        zoom = self.spec.video.display_scale  # small models' frames, enlarged for viewing
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
                                first, interrupted)


class Stream:
    """One video in progress. set_negative() / set_scale() take effect from the next block: only the
    negative text K/V are rebuilt, the self-attention cache (the video so far) is kept."""

    def __init__(self, gen: StreamingGenerator, prompt, negative, scale, guidance, frames, seed, rolling, decode):
        cfg, spec = gen.cfg, gen.spec
        check_prompt(prompt)
        check_seed(seed)
        self.gen, self.decode = gen, decode
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
        self.seed = seed
        self.latent_hw = (spec.video.height // gen.spatial_stride, spec.video.width // gen.spatial_stride)
        gen.text.check_readable(prompt)
        with torch.no_grad():
            self.text_cache = TextCache(gen.model, gen.text.encode(prompt))
        self._pending: tuple | None = None
        self.negatives: list[tuple[str, float]] = []
        self.schedule = ScaleSchedule(spec.guidance.scale)
        self.set_negative(negative, spec.guidance.scale if scale is None else scale)
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
        for text, weight in negatives:
            if weight != 1.0:
                self.guidance.check_weight(weight, schedule.values())
            self.gen.text.check_readable(text, "negative prompt")
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
        gen, spec = self.gen, self.gen.spec
        model, device = gen.model, gen.device
        h, w = self.latent_hw
        capacity = spec.cache.capacity_frames
        if self.latent_total is not None and not self.rolling and self.latent_total > capacity:
            raise UserError(f"{pixel_frames(self.latent_total, gen.temporal_stride)} frames need {self.latent_total} "
                            f"latent frames but the cache holds {capacity}; use --rolling or fewer frames")
        # CFG's unconditional pass needs its own self-attention cache, refreshed with its own context.
        kv_cache = tuple(model.new_kv_cache(1, capacity, h, w, self.rolling, spec.cache.sink_frames, gen.dtype,
                                            device) for _ in range(1 if self.guidance.in_attention else 2))
        rng = torch.Generator(device=device).manual_seed(int(self.seed))
        channels = model.config.in_channels
        gen.decoder.reset()
        block, first_frame = 0, 0
        offset = 0  # positions taken off by re-bases so far: the block at latent frame `start` sits at start - offset
        while self.num_blocks is None or block < self.num_blocks:
            self._apply_pending()
            start = block * self.fpb
            offset = self._position(kv_cache, start, offset, capacity)
            t0 = time.perf_counter()
            x0 = self._denoise_block(kv_cache, rng, start - offset, (1, channels, self.fpb, h, w), block)
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

    def _position(self, kv_cache: tuple, start: int, offset: int, capacity: int) -> int:
        """The position offset for the block at latent frame `start`. When the block would pass the RoPE table, a
        rolling stream re-bases: the cached non-sink frames move back by delta = position - (capacity - fpb), so
        the window left after this block's eviction sits right after the sink frames, as when the cache first
        filled, and the block goes at capacity - fpb. Relative positions inside the window are unchanged; the
        sinks keep positions 0..sink-1, so only the sink-to-window distance changes (back to what it was then).
        A fixed cache (or a generator without shift_positions) stops here with one line."""
        position = start - offset
        if position + self.fpb <= self.max_latent_frames:
            return offset
        if not self.endless or capacity > self.max_latent_frames:
            raise UserError(f"the stream reached latent frame {start}, the last position {self.gen.cfg.name} "
                            f"encodes ({self.max_latent_frames}); it ends here")
        delta = position - (capacity - self.fpb)
        for cache in kv_cache:
            self.gen.model.shift_positions(cache, delta)
        self.rebases.append(start // self.fpb)
        return offset + delta

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
        context_t = gen.spec.sampling.context_noise
        context = x0
        if context_t > 0:
            noise = torch.randn(shape, generator=rng, device=device, dtype=torch.float32)
            context = flow.add_noise(x0, noise, t_of(context_t))
        self._predict(context, t_of(context_t), self.schedule(block, len(gen.steps) - 1), start, kv_cache,
                       self.cache_pass_guidance)
        return x0
