"""`nasa-video generate`: an MP4 from a prompt and negative prompt(s)."""
from __future__ import annotations

import argparse
import sys
import time

from ..errors import UserError
from .common import method_argument

DEFAULT_OUT = "outputs/nasa-video.mp4"


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate an MP4 from a prompt, with negative prompt(s)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", action="append", default=[],
                   help="negative prompt; repeat for several (summed: Z+ - sum_i w_i alpha Z-_i)")
    p.add_argument("--negative-weight", type=float, action="append", default=[],
                   help="weight of each --negative, in order (default 1 each)")
    p.add_argument("--scale", type=float, default=None, help="guidance scale alpha (default: the model config's)")
    method_argument(p, "--guidance", default=None,
                    help="default: the model config's. --scale is alpha for nasa, nag_scale s for nag (s > 1), "
                         "s for vsf, w for cfg")
    p.add_argument("--model", default="toy", help="toy (the bundled shapes-world model) | toy-nasa-t | causvid | "
                                                  "self-forcing | tiny (random weights) | a config YAML")
    p.add_argument("--checkpoint", default=None, help="generator weights: CausVid / Self-Forcing .pt, Wan or diffusers")
    p.add_argument("--wan", default=None, help="Diffusers-format Wan2.1-T2V-1.3B folder or hub id (VAE, umT5)")
    p.add_argument("--frames", type=int, default=None, help="video frames: 12k - 3 for Wan (81 = 7 blocks; default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--attention", default="auto", help="auto | sdpa | flash2 | flash3")
    p.add_argument("--rolling", action="store_true", help="rolling self-attention cache (streams past the cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=generate)


def generate(args) -> int:
    from ..pipeline import StreamingGenerator
    from ..video_io import check_output_path, ffmpeg_exe

    ffmpeg_exe()
    check_output_path(args.out, create_parent=args.out == DEFAULT_OUT)
    if args.negative_weight and len(args.negative_weight) != len(args.negative):
        raise UserError(f"{len(args.negative_weight)} --negative-weight for {len(args.negative)} --negative; "
                        f"give one weight per negative prompt or none")
    weights = args.negative_weight or [1.0] * len(args.negative)
    negatives = list(zip(args.negative, weights))
    started = time.perf_counter()
    gen = StreamingGenerator.from_config(args.model, args.checkpoint, args.wan, args.device, args.dtype,
                                         args.attention)
    if gen.cfg.weights.source == "random":
        print(f"note: model '{gen.cfg.name}' has RANDOM weights (untrained): the video is noise. "
              f"Pass --model causvid --checkpoint ... for the real model.", file=sys.stderr)
    loaded = time.perf_counter() - started
    result = gen.generate(args.prompt, args.out, negatives, args.scale, args.guidance, args.frames, args.seed,
                          args.rolling or None, progress=not args.quiet)
    guidance = args.guidance or gen.cfg.guidance.method
    scale = gen.cfg.guidance.scale if args.scale is None else args.scale
    summary = (f"{result.frames} frames ({result.blocks} blocks) with {guidance}"
               f"{f' alpha={scale}' if negatives and guidance != 'none' else ''}; load {loaded:.1f}s, "
               f"first block {result.first_block_seconds:.1f}s, generation {result.seconds:.1f}s")
    if result.interrupted:
        if result.path:
            print(f"interrupted: kept the {result.blocks} finished blocks in {result.path} ({summary})")
        else:
            print("interrupted before the first block finished: nothing written")
        return 130
    print(f"wrote {result.path}: {summary}")
    return 0
