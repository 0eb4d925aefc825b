"""Video codecs and streaming decode.

The pipeline needs three things of a codec (the `VideoCodec` protocol): its strides and latent channels, a
block-by-block decoder whose output equals one decode of the whole video, and that one-shot decode as the
reference. diffusers' AutoencoderKLWan is adapted by `WanVAECodec`: its decoder's causal-conv state (its
feature cache) is kept from one block to the next, so each block's pixels are final as soon as the block is
decoded. Other codecs (the bundled model's) implement the protocol themselves.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


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


def codec_strides(vae) -> tuple[int, int, int]:
    """(temporal stride, spatial stride, latent channels)."""
    codec = as_codec(vae)
    return codec.temporal_stride, codec.spatial_stride, codec.z_dim


def one_shot_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Reference: the codec's whole-video decode, for checking the streaming decoder."""
    with torch.no_grad():
        return as_codec(vae).decode_video(latents)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> [B, T, H, W, 3] uint8 (CPU)."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()
