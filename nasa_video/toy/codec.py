"""The bundled model's codec: an exact, invertible space/time-to-channel rearrangement.

Why not a trained AutoencoderKLWan: tiny Wan VAEs trained here for the time this CPU allows blurred the
shapes (the detector agreed with the ground truth on only 82-91% of frame decisions on their
reconstructions) or collapsed to the background. An exact codec has the same interface where it matters:
latents [B, C, L, h, w] with 2x temporal and 2x spatial compression (first latent frame = first video
frame, then 2 frames per latent, like Wan's 1 + 4k), per-channel standardisation, and block-by-block
streaming decode whose output equals one-shot decode. The real AutoencoderKLWan streaming path is
exercised by the tests with a tiny Wan VAE and by every CausVid / Self-Forcing run.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


class ShuffleCodec(torch.nn.Module):
    temporal_stride = 2
    spatial_stride = 2

    def __init__(self, channels: int = 3, latents_mean=None, latents_std=None):
        super().__init__()
        self.channels = channels
        self.z_dim = channels * self.temporal_stride * self.spatial_stride ** 2
        self.register_buffer("latents_mean", torch.tensor(latents_mean or [0.0] * self.z_dim).view(1, -1, 1, 1, 1))
        self.register_buffer("latents_std", torch.tensor(latents_std or [1.0] * self.z_dim).view(1, -1, 1, 1, 1))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1 + 2k, H, W] in [-1, 1] -> standardised latents [B, z_dim, 1 + k, H/2, W/2]."""
        b, c, t, h, w = pixels.shape
        if (t - 1) % self.temporal_stride:
            raise ValueError(f"the codec encodes 1 + {self.temporal_stride}k frames, got {t}")
        x = torch.cat([pixels[:, :, :1], pixels], 2)  # the first frame fills its latent frame twice
        s, ts = self.spatial_stride, self.temporal_stride
        x = x.reshape(b, c, -1, ts, h // s, s, w // s, s).permute(0, 1, 3, 5, 7, 2, 4, 6)
        z = x.reshape(b, self.z_dim, -1, h // s, w // s)
        return (z - self.latents_mean) / self.latents_std

    def decode_block(self, latents: torch.Tensor, first: bool) -> torch.Tensor:
        """Standardised latents [B, z_dim, L, h, w] -> pixels [B, 3, T, H, W]; the first block of a video
        gives 1 + 2 (L - 1) frames, later blocks 2 L."""
        z = latents.float() * self.latents_std + self.latents_mean
        b, _, l, h, w = z.shape
        s, ts = self.spatial_stride, self.temporal_stride
        x = z.reshape(b, self.channels, ts, s, s, l, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, self.channels, l * ts, h * s, w * s)
        return (x[:, :, 1:] if first else x).clamp(-1, 1)

    # ---- the VideoCodec protocol (nasa_video.vae): what the pipeline's streaming decode needs -------------
    def streaming_decoder(self) -> "ShuffleBlockDecoder":
        return ShuffleBlockDecoder(self)

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.decode_block(latents, first=True)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "codec.json").write_text(json.dumps({
            "type": "shuffle", "channels": self.channels,
            "latents_mean": self.latents_mean.flatten().tolist(), "latents_std": self.latents_std.flatten().tolist()}))

    @classmethod
    def load(cls, folder: Path) -> "ShuffleCodec":
        cfg = json.loads((Path(folder) / "codec.json").read_text())
        return cls(cfg["channels"], cfg["latents_mean"], cfg["latents_std"])


class ShuffleBlockDecoder:
    """Stateless but for knowing the first block of a video (it gives one frame fewer)."""

    def __init__(self, codec: ShuffleCodec):
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        self._first = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = self.codec.decode_block(latents, self._first)
        self._first = False
        return out
