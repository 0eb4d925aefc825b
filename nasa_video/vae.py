"""Streaming decode with diffusers' AutoencoderKLWan: the decoder's causal-conv state (its feature cache)
is kept from one block to the next, so each block's pixels are final as soon as the block is decoded.

Decoding latents block by block this way gives exactly the frames of one decode of the whole video.
"""
from __future__ import annotations

import torch


def codec_strides(vae) -> tuple[int, int, int]:
    """(temporal stride, spatial stride, latent channels) of an AutoencoderKLWan or an exact codec."""
    if hasattr(vae, "decode_block"):
        return vae.temporal_stride, vae.spatial_stride, vae.z_dim
    cfg = vae.config
    return 2 ** sum(cfg.temperal_downsample), 2 ** (len(cfg.dim_mult) - 1), cfg.z_dim


class StreamingDecoder:
    """Block-by-block decoding. An AutoencoderKLWan keeps its causal-conv feature cache between blocks; a
    codec with decode_block (the bundled exact codec) is stateless but for knowing the first block."""

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        self.exact = hasattr(vae, "decode_block")
        if not self.exact:
            cfg = vae.config
            self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
            self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.reset()

    def reset(self) -> None:
        self._first = True
        if not self.exact:
            self.vae.clear_cache()  # gives the VAE a fresh, empty decoder feature cache
            self._feat_map = self.vae._feat_map

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Generator latents are per-channel standardised; the VAE wants raw latents."""
        return latents.float() * self.std.to(latents.device) + self.mean.to(latents.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, F, h, w] -> pixels [B, 3, T, H, W] in [-1, 1]; T = 1 + 4 (F - 1) for the first
        block of a video and 4 F after it."""
        if self.exact:
            out = self.vae.decode_block(latents, self._first)
            self._first = False
            return out
        param = next(self.vae.parameters())
        z = self.vae.post_quant_conv(self.denormalize(latents).to(param.dtype))
        frames = []
        for i in range(z.shape[2]):
            conv_index = [0]
            frames.append(self.vae.decoder(z[:, :, i:i + 1], feat_cache=self._feat_map, feat_idx=conv_index,
                                           first_chunk=self._first))
            self._first = False
        return torch.cat(frames, dim=2).float().clamp(-1, 1)


def one_shot_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Reference: diffusers' own whole-video decode (or the exact codec's, all blocks at once), for checking
    the streaming decoder."""
    if hasattr(vae, "decode_block"):
        with torch.no_grad():
            return vae.decode_block(latents, first=True)
    decoder = StreamingDecoder(vae)
    with torch.no_grad():
        return vae.decode(decoder.denormalize(latents).to(next(vae.parameters()).dtype)).sample.float()


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> [B, T, H, W, 3] uint8 (CPU)."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()
