"""The tiny Wan 2.1 decoder (TAEHV taew2_1) against the Wan 2.1 VAE: decode FLOPs per 81 frames at 480x832,
counted on the meta device (nothing allocated), and the wall-time ratio of a small decode on this machine, both
block by block as the stream decodes (random weights: the cost does not depend on them).

    PYTHONPATH=. python scripts/tiny_decoder_bench.py [--frames 21] [--size 128] [--repeats 3]
    PYTHONPATH=. python scripts/tiny_decoder_bench.py --device cuda --dtype bf16 --size 480 832   # on a GPU
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from nasa_video.tae import TinyDecoderCodec, TinyWanDecoder
from nasa_video.vae import WanVAECodec


def wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan()  # diffusers' defaults are the Wan 2.1 VAE (z_dim 16, base_dim 96)


def decode_blocks(codec, latents: torch.Tensor, fpb: int = 3) -> None:
    decoder = codec.streaming_decoder()
    with torch.no_grad():
        for start in range(0, latents.shape[2], fpb):
            decoder.decode(latents[:, :, start:start + fpb])


def flops(make, latent_frames: int, h: int, w: int) -> int:
    with torch.device("meta"):
        codec = make()
        latents = torch.zeros(1, 16, latent_frames, h, w)
    with FlopCounterMode(display=False) as counter:
        decode_blocks(codec, latents)
    return counter.get_total_flops()


def seconds(codec, latents: torch.Tensor, repeats: int) -> float:
    def sync():
        if latents.is_cuda:
            torch.cuda.synchronize(latents.device)

    decode_blocks(codec, latents)  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        decode_blocks(codec, latents)
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=21, help="latent frames of the timed decode (21: 81 frames)")
    p.add_argument("--size", type=int, nargs="+", default=[128], help="pixel height [and width] of the timed decode")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    height, width = args.size[0], args.size[-1]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tiny = lambda: TinyDecoderCodec(TinyWanDecoder())  # noqa: E731
    wan = lambda: WanVAECodec(wan_vae())  # noqa: E731
    f_tiny, f_wan = flops(tiny, 21, 60, 104), flops(wan, 21, 60, 104)
    print(f"decode FLOPs per 81 frames at 480x832 (21 latent frames, block by block): tiny {f_tiny / 1e12:.2f} T, "
          f"Wan VAE {f_wan / 1e12:.2f} T, ratio {f_wan / f_tiny:.1f}x")
    torch.manual_seed(0)
    latents = torch.randn(1, 16, args.frames, height // 8, width // 8, device=args.device)
    timed = {}
    for name, make in (("tiny", tiny), ("wan", wan)):
        codec = make()
        codec.set_dtype(dtype)
        getattr(codec, "model", getattr(codec, "vae", None)).to(args.device)
        timed[name] = seconds(codec, latents, args.repeats)
    frames = 1 + 4 * (args.frames - 1)
    where = f"{torch.get_num_threads()} CPU threads" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"wall time, {frames} frames at {height}x{width} on {where} ({args.dtype}, best of {args.repeats}): "
          f"tiny {timed['tiny']:.3f} s, Wan VAE {timed['wan']:.3f} s, ratio {timed['wan'] / timed['tiny']:.1f}x")
    if args.json:
        import json

        figures = {"flops_per_81_frames_480x832": {"tiny": f_tiny, "wan": f_wan}, "frames": frames,
                   "size": [height, width], "device": where, "dtype": args.dtype, "seconds": timed}
        with open(args.json, "w") as f:
            json.dump(figures, f)


if __name__ == "__main__":
    main()
