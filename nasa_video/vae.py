"""Video codecs and streaming decode.

The pipeline needs three things of a codec (the `VideoCodec` protocol): its strides and latent channels, a
block-by-block decoder whose output equals one decode of the whole video, and that one-shot decode as the
reference. diffusers' AutoencoderKLWan is adapted by `WanVAECodec`: its decoder's causal-conv state (its
feature cache) is kept from one block to the next, so each block's pixels are final as soon as the block is
decoded. Other codecs (the bundled model's) implement the protocol themselves.
"""
from __future__ import annotations

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .errors import UserError

# bf16 decode is the default on CUDA because its output stays within this distance of the fp32 decode, in
# pixel units of the [-1, 1] range (1 uint8 level = 2/255 = 0.0078), measured on random Wan VAE weights
# (tests/test_decode.py pins the tiny VAE; scripts/vae_precision.py and scripts/bench_gpu.sh measure the
# full-width one). fp32 stays selectable (vae_dtype="fp32", --vae-dtype fp32).
BF16_DECODE_TOLERANCE = {"max_abs": 0.125, "mean_abs": 0.01}
VAE_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class BlockDecoder(Protocol):
    def reset(self) -> None:
        """Start a new video."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, F, h, w] of the next block -> pixels [B, 3, T, H, W] in [-1, 1]."""


@runtime_checkable
class VideoCodec(Protocol):
    temporal_stride: int
    spatial_stride: int
    z_dim: int

    def streaming_decoder(self) -> BlockDecoder:
        """A fresh block-by-block decoder."""

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Reference: every block at once -> pixels [B, 3, T, H, W] in [-1, 1]."""


class WanVAECodec:
    """diffusers' AutoencoderKLWan as a VideoCodec (generator latents are per-channel standardised)."""

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.temporal_stride = 2 ** sum(cfg.temperal_downsample)
        self.spatial_stride = 2 ** (len(cfg.dim_mult) - 1)
        self.z_dim = cfg.z_dim
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Decode in this dtype (the latents are de-normalised in fp32, then cast; the pixels come back fp32)."""
        from diffusers.utils import logging

        verbosity = logging.get_verbosity()  # quiet diffusers' "keep in float32" notice: the Wan VAE lists none
        logging.set_verbosity_error()
        try:
            self.vae.to(dtype)
        finally:
            logging.set_verbosity(verbosity)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Generator latents are per-channel standardised; the VAE wants raw latents."""
        return latents.float() * self.std.to(latents.device) + self.mean.to(latents.device)

    def streaming_decoder(self) -> "WanStreamingDecoder":
        return WanStreamingDecoder(self)

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.denormalize(latents).to(next(self.vae.parameters()).dtype)).sample.float()


class WanStreamingDecoder:
    """Block-by-block decoding that keeps the Wan VAE decoder's causal-conv feature cache between blocks."""

    def __init__(self, codec: WanVAECodec):
        self.codec, self.vae = codec, codec.vae
        self.reset()

    def reset(self) -> None:
        self._first = True
        self.vae.clear_cache()  # gives the VAE a fresh, empty decoder feature cache
        self._feat_map = self.vae._feat_map

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """T = 1 + 4 (F - 1) frames for the first block of a video and 4 F after it."""
        param = next(self.vae.parameters())
        z = self.vae.post_quant_conv(self.codec.denormalize(latents).to(param.dtype))
        frames = []
        for i in range(z.shape[2]):
            conv_index = [0]
            frames.append(self.vae.decoder(z[:, :, i:i + 1], feat_cache=self._feat_map, feat_idx=conv_index,
                                           first_chunk=self._first))
            self._first = False
        return torch.cat(frames, dim=2).float().clamp(-1, 1)


def as_codec(vae) -> VideoCodec:
    """A codec as the pipeline uses it: a VideoCodec as it is, an AutoencoderKLWan adapted."""
    return vae if isinstance(vae, VideoCodec) else WanVAECodec(vae)


def streaming_decoder(vae) -> BlockDecoder:
    return as_codec(vae).streaming_decoder()


def one_shot_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Reference: the codec's whole-video decode, for checking the streaming decoder."""
    with torch.no_grad():
        return as_codec(vae).decode_video(latents)


def resolve_vae_dtype(name, device) -> torch.dtype:
    """auto (None): bf16 on CUDA (within BF16_DECODE_TOLERANCE of fp32), fp32 elsewhere (CPU bf16 convolutions
    are slower than fp32 on many CPUs, and the CPU is where exact reference runs happen)."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in VAE_DTYPES:
        raise UserError(f"unknown VAE dtype {name!r}; use auto, fp32 or bf16")
    return VAE_DTYPES[name]


def set_codec_dtype(codec, dtype: torch.dtype) -> torch.dtype | None:
    """Cast a codec's weights to dtype; returns the dtype it decodes in, or None for a codec without a
    set_dtype (the bundled model's exact rearrangement has no weights to cast)."""
    if hasattr(codec, "set_dtype"):
        codec.set_dtype(dtype)
        return dtype
    return None


@torch.no_grad()
def decode_precision(vae, latents: torch.Tensor, frames_per_block: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """How far a streaming decode in `dtype` lands from the fp32 one, on these latents [1, C, L, h, w] decoded
    block by block (the pipeline's path). Pixel errors in the [-1, 1] range; uint8 levels as frames are saved."""
    outputs = {}
    for name, d in (("fp32", torch.float32), ("test", dtype)):
        codec = copy.deepcopy(as_codec(vae))
        set_codec_dtype(codec, d)
        decoder = codec.streaming_decoder()
        decoder.reset()
        outputs[name] = torch.cat([decoder.decode(latents[:, :, i:i + frames_per_block]).float()
                                   for i in range(0, latents.shape[2], frames_per_block)], dim=2)
    diff = (outputs["test"] - outputs["fp32"]).abs()
    levels = (to_uint8(outputs["test"]).int() - to_uint8(outputs["fp32"]).int()).abs()
    report = {"dtype": str(dtype).replace("torch.", ""), "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
              "max_uint8": int(levels.max()), "mean_uint8": float(levels.float().mean()),
              "reference_std": float(outputs["fp32"].std()), "tolerance": dict(BF16_DECODE_TOLERANCE)}
    report["within_tolerance"] = (report["max_abs"] <= BF16_DECODE_TOLERANCE["max_abs"]
                                  and report["mean_abs"] <= BF16_DECODE_TOLERANCE["mean_abs"])
    return report


def decode_now(decoder: BlockDecoder, latents: torch.Tensor) -> tuple[np.ndarray, float]:
    """Decode one block where the loop runs: (uint8 frames [T, H, W, 3], seconds)."""
    start = time.perf_counter()
    with torch.no_grad():
        frames = to_uint8(decoder.decode(latents))[0].numpy()
    return frames, time.perf_counter() - start


class OverlappedDecoder:
    """A BlockDecoder run beside the denoising loop, so block k decodes while block k+1 is denoised.

    One worker thread: blocks are decoded one at a time and in the order submitted, which the decoder's
    causal state needs. On CUDA the worker has its own stream, made to wait on an event recorded on the
    submitting thread's stream (the latents are ready on the GPU before the decode reads them); the frames'
    copy to the host only synchronises that side stream, never the denoising one. On the CPU the worker's
    torch ops release the GIL and run beside the loop's. submit() -> a Future of (frames, seconds)."""

    def __init__(self, decoder: BlockDecoder | None, device):
        """decoder: the one decoder it serves, or None when each submit names its own (a batch's videos)."""
        self.decoder, self.device = decoder, torch.device(device)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="nasa-video-decode")
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def submit(self, latents: torch.Tensor, decoder: BlockDecoder | None = None) -> Future:
        event = None
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        return self.pool.submit(self._decode, decoder or self.decoder, latents, event)

    def _decode(self, decoder: BlockDecoder, latents: torch.Tensor, event) -> tuple[np.ndarray, float]:
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            if event is not None:
                self.stream.wait_event(event)
            return decode_now(decoder, latents)

    def close(self) -> None:
        """Let a decode in flight finish (the decoder's state stays whole), then stop the worker."""
        self.pool.shutdown(wait=True)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> [B, T, H, W, 3] uint8 (CPU)."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()
