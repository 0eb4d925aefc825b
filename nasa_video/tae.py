"""The tiny Wan 2.1 decoder (TAEHV's `taew2_1`, madebyollin/taehv) as a VideoCodec, decoding block by block.

The published checkpoints (`taew2_1.pth`, `safetensors/taew2_1.safetensors` in github.com/madebyollin/taehv) hold an
encoder and a decoder, each an nn.Sequential; the modules below are written to that layout (its key names and
shapes, every key loaded strictly), from its published architecture:

    decoder: clamp (3 tanh(x / 3)), 3x3 conv 16 -> 256, ReLU, then three stages of
             [3 MemBlocks, 2x nearest upsample, TGrow (time x1, x2, x2), 3x3 conv to the next width (no bias)]
             at widths 256, 128, 64, then ReLU and a 3x3 conv to RGB in [0, 1]
    MemBlock(x, past): ReLU(conv3(ReLU(conv2(ReLU(conv1([x; past]))))) + x), past = the same layer's input one
             output frame earlier (zeros before the first)
    TGrow(s): a 1x1 conv to s x the channels, read as s consecutive frames

It takes the generator's latents as they are (no per-channel de-normalisation, unlike the Wan VAE) and makes 4
frames per latent frame, the first 3 of a video dropped: 1 + 4 (F - 1) frames, as the Wan VAE. Streaming keeps
each MemBlock's last input frame between blocks, so a video decoded block by block equals its one-shot decode.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .loading import TAE_PUBLISHED as PUBLISHED
Z_DIM, WIDTHS, TIME_GROW = 16, (256, 128, 64, 64), (1, 2, 2)


def _conv3(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """A residual block that also sees its input one frame earlier (`past`)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv3(2 * n_in, n_out), nn.ReLU(), _conv3(n_out, n_out), nn.ReLU(),
                                  _conv3(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x, past):
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """Encoder: `stride` consecutive frames folded into one (1x1 conv over their stacked channels)."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride, self.conv = stride, nn.Conv2d(n * stride, n, 1, bias=False)

    def forward(self, x):
        return self.conv(x.reshape(-1, self.stride * x.shape[1], *x.shape[2:]))


class TGrow(nn.Module):
    """Decoder: each frame becomes `stride` consecutive frames (1x1 conv to stride x the channels)."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride, self.conv = stride, nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x):
        return self.conv(x).reshape(-1, x.shape[1], *x.shape[2:])


def _encoder() -> nn.Sequential:
    """Only so the checkpoint loads strictly (decoding never runs it): time pooled x2 twice, space /8."""
    layers = [_conv3(3, 64), nn.ReLU()]
    for stride in (2, 2, 1):
        layers += [TPool(64, stride), _conv3(64, 64, stride=2, bias=False)] + [MemBlock(64, 64) for _ in range(3)]
    return nn.Sequential(*layers, _conv3(64, Z_DIM))


def _decoder() -> nn.Sequential:
    layers = [Clamp(), _conv3(Z_DIM, WIDTHS[0]), nn.ReLU()]
    for stage, grow in enumerate(TIME_GROW):
        n, n_next = WIDTHS[stage], WIDTHS[stage + 1]
        layers += [MemBlock(n, n) for _ in range(3)]
        layers += [nn.Upsample(scale_factor=2), TGrow(n, grow), _conv3(n, n_next, bias=False)]
    return nn.Sequential(*layers, nn.ReLU(), _conv3(WIDTHS[-1], 3))


class TinyWanDecoder(nn.Module):
    """TAEHV for Wan 2.1 latents: `encoder` and `decoder` in the published layout."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = _encoder(), _decoder()

    @property
    def frames_to_trim(self) -> int:
        return self.temporal_stride - 1

    @property
    def temporal_stride(self) -> int:
        return math.prod(TIME_GROW)

    def run(self, frames: torch.Tensor, memory: list | None) -> torch.Tensor:
        """The decoder over latent frames [T, C, h, w] (one video, time on the batch axis) -> [T * 4, 3, H, W] in
        [0, 1]. memory: per layer, the MemBlocks' last input frame of the previous call (None entries at the
        start of a video), updated in place; None: a whole video at once (zeros before its first frame)."""
        x = frames
        for i, layer in enumerate(self.decoder):
            if isinstance(layer, MemBlock):
                before = memory[i] if memory is not None and memory[i] is not None else torch.zeros_like(x[:1])
                past = torch.cat([before, x[:-1]])
                if memory is not None:
                    memory[i] = x[-1:]
                x = layer(x, past)
            else:
                x = layer(x)
        return x.clamp(0, 1)

    def load_published(self, path: str | Path) -> None:
        """Weights from a published checkpoint (.pth or .safetensors), every key, strictly; one line otherwise."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tiny decoder weights not found: {path}; download taew2_1 from {PUBLISHED}")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated download, an LFS pointer, a pickle that is not weights
            raise UserError(f"cannot read tiny decoder weights {path}: {str(error).splitlines()[0][:200]}; "
                            f"download taew2_1 from {PUBLISHED}") from None
        if not isinstance(state, dict):
            raise UserError(f"{path} holds a {type(state).__name__}, not a state dict; download taew2_1 from "
                            f"{PUBLISHED}")
        state = self._fit_time_grow(state)
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
        if missing or unexpected or wrong:
            parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                     f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                     f"{len(wrong)} of another shape (e.g. {wrong[0]}: {list(state[wrong[0]].shape)}, "
                     f"want {list(own[wrong[0]].shape)})" if wrong else ""]
            raise UserError(f"{path} is not a taew2_1 checkpoint: {', '.join(p for p in parts if p)} keys; it takes "
                            f"the Wan 2.1 tiny decoder from {PUBLISHED}")
        self.load_state_dict(state)

    def _fit_time_grow(self, state: dict) -> dict:
        """A TGrow kept at time x1 reads the last frame's channels of a checkpoint trained at x2 (the published
        files store every TGrow at x2)."""
        state = dict(state)
        for i, layer in enumerate(self.decoder):
            key = f"decoder.{i}.conv.weight"
            if isinstance(layer, TGrow) and key in state and state[key].shape[0] > layer.conv.weight.shape[0]:
                state[key] = state[key][-layer.conv.weight.shape[0]:]
        return state


class TinyDecoderCodec:
    """The tiny decoder as a VideoCodec: latents [B, 16, F, h, w] as the generator makes them -> pixels in [-1, 1]."""

    spatial_stride = 8
    z_dim = Z_DIM

    def __init__(self, model: TinyWanDecoder):
        self.model = model.eval().requires_grad_(False)
        self.temporal_stride = model.temporal_stride

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def set_dtype(self, dtype: torch.dtype) -> None:
        self.model.to(dtype)

    def streaming_decoder(self) -> "TinyStreamingDecoder":
        return TinyStreamingDecoder(self)

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Every latent frame at once (zeros before the first): the reference the streaming decode must equal."""
        videos = [self.model.run(self._frames(z), None)[self.model.frames_to_trim:] for z in latents]
        return torch.stack([self._pixels(v) for v in videos])

    def _frames(self, z: torch.Tensor) -> torch.Tensor:
        """One video's latents [C, F, h, w] -> frames on the batch axis [F, C, h, w], in the decoder's dtype."""
        return z.permute(1, 0, 2, 3).to(self.dtype)

    @staticmethod
    def _pixels(frames: torch.Tensor) -> torch.Tensor:
        """[T, 3, H, W] in [0, 1] -> [3, T, H, W] in [-1, 1], float32."""
        return (frames.float() * 2 - 1).permute(1, 0, 2, 3)


class TinyStreamingDecoder:
    """Block by block: each MemBlock's last input frame is kept between blocks; the video's first 3 frames go."""

    def __init__(self, codec: TinyDecoderCodec):
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        self._memory: list | None = None  # per video of the batch: per layer, the last input frame

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 16, F, h, w] of the next block -> pixels [B, 3, T, H, W]: T = 4 F - 3 for a video's first
        block, 4 F after it."""
        model, first = self.codec.model, self._memory is None
        if first:
            self._memory = [[None] * len(model.decoder) for _ in range(latents.shape[0])]
        videos = []
        for z, memory in zip(latents, self._memory):
            frames = model.run(self.codec._frames(z), memory)
            videos.append(self.codec._pixels(frames[model.frames_to_trim:] if first else frames))
        return torch.stack(videos)


def load_tiny_decoder(path: str | Path, device, dtype: torch.dtype = torch.float32) -> TinyDecoderCodec:
    """The published taew2_1 weights as a codec on `device`."""
    model = TinyWanDecoder()
    model.load_published(path)
    return TinyDecoderCodec(model.to(device=device, dtype=dtype))
