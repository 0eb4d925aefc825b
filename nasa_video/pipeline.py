"""The generator: a model, its VAE and text encoder, built from a config, and what it makes of a prompt.

    encode prompts -> text cache (positive + negatives, once)
    for each block: the block loop (engine.BlockEngine): denoise with guidance inside every cross-attention,
                    one cache pass, streaming VAE decode -> a FrameChunk
    generate(): the blocks into an MP4 (or the latents into a .safetensors), written as they arrive

stream() is one video (stream.Stream), stream_batch() several in one forward (stream.StreamBatch); both run the
same block loop. With overlap_decode (the default on CUDA) block k is decoded while block k + 1 is denoised.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from . import attention
from .config import SEED_LIMIT, check_cache_holds, latent_frames_for, model_spec, pixel_frames  # noqa: F401 (re-exported)
from .engine import FrameChunk, rebase_positions  # noqa: F401 (re-exported)
from .errors import UserError
from .guidance import Guidance, ScaleSpec, default_scale, make_guidance, method_from_config  # noqa: F401 (re-exported)
from .loading import (build_generator, build_text_encoder, build_vae_and_text, check_decoder_choice, load_config,
                      resolve_device, resolve_dtype)
from .memory import check_fits
from .model.graphs import resolve_cuda_graphs
from .schedule import prediction_of, sampling_schedule
from .request import (EMBEDS, LATENT_LIMIT, Negative, VideoRequest, check_embeds,  # noqa: F401 (re-exported)
                      check_prompt, check_seed, embeds_length, negative_embeds_items)
from .stream import Stream, StreamBatch
from .vae import as_codec, resolve_vae_dtype, set_codec_dtype


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


def resolve_compile(compile: bool | None, device) -> bool:
    """The compile switch: None means on for CUDA (where it pays), off for the CPU (where compiling a video's few
    shapes costs more than it saves); True / False as given."""
    if compile is None:
        return torch.device(device).type == "cuda"
    return bool(compile)


class StreamingGenerator:
    """Text-to-video with negative prompts, streamed block by block. Build with from_config()."""

    def __init__(self, cfg: DictConfig, model, vae, text_encoder, device, dtype, vae_dtype=None,
                 overlap_decode: bool | None = None):
        """vae_dtype: auto (None) = bf16 on CUDA, fp32 elsewhere (vae.BF16_DECODE_TOLERANCE); overlap_decode:
        decode block k while block k + 1 is denoised (None = on for CUDA)."""
        self.cfg, self.model, self.vae, self.text = cfg, model, vae, text_encoder
        self.spec = model_spec(cfg)  # the config's sections, typed and read once
        self.device, self.dtype = torch.device(device), dtype
        self.flow, self.steps = sampling_schedule(self.spec)
        self.prediction = prediction_of(self.spec)  # what the network outputs
        self.codec = as_codec(vae)
        self.vae_dtype = set_codec_dtype(self.codec, resolve_vae_dtype(vae_dtype, self.device))
        self.overlap_decode = self.device.type == "cuda" if overlap_decode is None else bool(overlap_decode)
        self.decoder = self.codec.streaming_decoder()
        self.temporal_stride, self.spatial_stride, z_dim = (self.codec.temporal_stride, self.codec.spatial_stride,
                                                            self.codec.z_dim)
        if z_dim != model.config.in_channels:
            raise UserError(f"VAE has {z_dim} latent channels but the generator takes {model.config.in_channels}")

    @classmethod
    def from_config(cls, model: "str | DictConfig" = "toy", checkpoint: str | None = None, wan: str | None = None,
                    device: str | None = None, dtype: str | None = None, attention_backend: str = "auto",
                    overrides: dict | None = None, check_memory: bool = True,
                    compile: bool | None = None, vae_dtype: str | None = None,
                    overlap_decode: bool | None = None, vae: str = "auto",
                    tae: str | os.PathLike | None = None, cuda_graphs: bool | None = None,
                    fp8: bool = False) -> "StreamingGenerator":
        """compile: torch.compile the generator's repeated block (one compiled code for all layers; see
        CausalWanTransformer.compile_blocks). None: on for CUDA, off elsewhere; True also works on the CPU
        (inductor). The first block of each cache length pays the compile: warm up before timing.
        vae_dtype: auto (None) = bf16 on CUDA, fp32 elsewhere; overlap_decode: decode block k while block k + 1
        is denoised (None = on for CUDA). vae: "auto" (the config's codec) or "tae": the tiny Wan 2.1 decoder
        (TAEHV taew2_1, weights at `tae`; see nasa_video/tae.py), for Wan-latent models. cuda_graphs: replay
        captured CUDA graphs for the cached forwards (set_cuda_graphs; None = off until a GPU bench shows they
        win). fp8: the DiT's linear layers in float8 (nasa_video.fp8; CUDA, compute capability 8.9+, torchao)."""
        cfg = model if isinstance(model, DictConfig) else load_config(model, overrides)  # a config read once
        if isinstance(model, DictConfig) and overrides:
            raise UserError("give overrides with a config name or path, not with a loaded config")
        spec = model_spec(cfg)
        device_ = resolve_device(device)
        dtype_ = resolve_dtype(dtype, device_)
        attention.set_backend(attention_backend)
        checkpoint = checkpoint or spec.weights.checkpoint
        if checkpoint is None and spec.weights.source not in ("random", "bundled"):
            raise UserError(f"model {spec.name} needs its generator weights: pass --checkpoint PATH")
        if checkpoint is not None and not os.path.exists(checkpoint):
            raise UserError(f"checkpoint not found: {checkpoint}")
        check_decoder_choice(vae, tae)
        if fp8:
            from .fp8 import check_fp8

            check_fp8(device_)
        if vae == "tae":
            from .model.interface import generator_section
            from .tae import Z_DIM, load_tiny_decoder

            channels = int(generator_section(cfg)[1].get("in_channels", 0))
            if channels != Z_DIM:
                raise UserError(f"the tiny decoder decodes Wan 2.1 latents ({Z_DIM} channels); model {spec.name} makes "
                                f"{channels}: drop --vae tae, or use a Wan model (causvid, self-forcing)")
        if check_memory:
            check_fits(cfg, device_, dtype_)
        if vae == "tae":
            vae = load_tiny_decoder(tae, device_)  # its dtype is set with vae_dtype, as the Wan VAE's
            text = build_text_encoder(cfg, device_, dtype_, wan)
        else:
            vae, text = build_vae_and_text(cfg, device_, dtype_, wan)
        generator = build_generator(cfg, device_, dtype_, checkpoint)
        if fp8:
            from .fp8 import quantize_fp8

            quantize_fp8(generator)
        gen = cls(cfg, generator, vae, text, device_, dtype_, vae_dtype, overlap_decode)
        gen.set_compile(compile)
        gen.set_cuda_graphs(cuda_graphs)
        return gen

    def set_compile(self, enable: bool | None = None) -> bool:
        """Compile the generator's blocks (True), run them eagerly (False), or the default for the device (None:
        on for CUDA). Returns whether the blocks are now compiled. What `--compile/--no-compile` maps to."""
        return self._model_switch("compile_blocks", resolve_compile(enable, self.device), "use compile=False")

    @property
    def compiled(self) -> bool:
        return bool(getattr(self.model, "compiled", False))

    def set_cuda_graphs(self, enable: bool | None = None) -> bool:
        """Replay captured CUDA graphs for the cached forwards (True), or run them eagerly (False; None: the
        default, off). On a CPU, True runs the static-buffer path eagerly. What `--cuda-graphs` maps to."""
        return self._model_switch("use_cuda_graphs", resolve_cuda_graphs(enable, self.device), "drop --cuda-graphs")

    def _model_switch(self, method: str, enable: bool, fix: str) -> bool:
        """Call the generator's on/off method (compile_blocks, use_cuda_graphs); one line if it has none and on is
        asked. Returns whether it is now on."""
        switch = getattr(self.model, method, None)
        if switch is None:
            if enable:
                raise UserError(f"generator {type(self.model).__name__} has no {method}(); {fix}")
            return False
        switch(enable)
        return enable

    @property
    def cuda_graphs(self) -> bool:
        return getattr(self.model, "graphs", None) is not None

    # ---- the stream -------------------------------------------------------------------------------------
    def stream(self, prompt: str | VideoRequest | None, negative=None, scale: ScaleSpec | None = None,
               guidance: str | Guidance | None = None, frames: int | None = None, seed: int | None = None,
               rolling: bool | None = None, decode: bool = True, *, prompt_embeds: torch.Tensor | None = None,
               negative_prompt_embeds=None, latents=None, generator: torch.Generator | None = None,
               prompt_at: dict[int, str] | None = None, recache: bool = False,
               overlap_decode: bool | None = None) -> Stream:
        """An iterator of FrameChunk, one per block. frames=None: the config's length (unbounded if rolling).
        prompt may be a request.VideoRequest holding every per-video argument (then give none of them here).

        Research inputs (diffusers' names): prompt_embeds [1, L, text_dim] instead of the prompt's text (the text
        encoder's output; prompt may then be None or a label); negative_prompt_embeds: a tensor, a list of tensors
        or of (tensor, weight) pairs, added to the text negatives; latents: the initial noise of every block, a
        tensor [1, C, F, h, w] covering the video (block i takes frames [i*fpb, (i+1)*fpb)) or a list of per-block
        tensors [1, C, fpb, h, w]; generator: a torch.Generator on the device for all random draws instead of
        `seed` (with latents, it draws only the re-noising and context noise). prompt_at: {block: prompt}
        switches the positive prompt from that block on (set_prompt), re-caching the window at each switch when
        recache. decode=False: no VAE; each FrameChunk still carries its latents."""
        given = dict(negative=negative, scale=scale, method=guidance, frames=frames, seed=seed, rolling=rolling,
                     prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, latents=latents,
                     generator=generator, prompt_at=prompt_at)
        if isinstance(prompt, VideoRequest):
            extra = sorted(k for k, v in given.items() if v is not None) + (["recache"] if recache else [])
            if extra:
                raise UserError(f"a VideoRequest holds every per-video argument: set {extra[0]} on it, not here")
            request = prompt
        else:
            request = VideoRequest(prompt=prompt, recache=recache, **given)
        return Stream(self, request, decode, overlap_decode)

    def stream_batch(self, specs, guidance: str | Guidance | None = None, frames: int | None = None,
                     rolling: bool | None = None, decode: bool = True, overlap_decode: bool = False) -> StreamBatch:
        """Several streams in one forward per step; see StreamBatch. specs: dicts of Stream's per-video arguments
        (prompt, negative, scale, seed, prompt_embeds, negative_prompt_embeds, latents, generator, frames, method)."""
        return StreamBatch(self, specs, guidance, frames, rolling, decode, overlap_decode)

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
        stream = self.stream(prompt, negative, scale, guidance, frames, seed, rolling, prompt_at=prompt_at,
                             recache=recache, **inputs)  # the stream switches its prompt at each prompt_at block
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
        stream = self.stream(prompt, negative, scale, guidance, frames, seed, rolling, decode=False,
                             prompt_at=prompt_at, recache=recache, **inputs)
        start, first, latents, recache_seconds, recaches = time.perf_counter(), 0.0, [], 0.0, 0
        for chunk in stream:
            latents.append(chunk.latents)
            if len(latents) == 1:
                first = time.perf_counter() - start
            recache_seconds += chunk.recache_seconds
            recaches += chunk.recache_seconds > 0
        video = torch.cat(latents, dim=2).contiguous()
        tmp = f"{out}.partial"
        save_file({"latents": video}, tmp, metadata={"prompt": stream.prompt, "seed": str(stream.seed),
                                                     "frames_per_block": str(stream.fpb)})
        os.replace(tmp, out)
        return GenerationResult(str(out), video.shape[2], len(latents), time.perf_counter() - start, first, False,
                                recache_seconds, recaches)
