"""`nasa-video generate`: an MP4 from a prompt and negative prompt(s)."""
from __future__ import annotations

import argparse
import sys
import time

from ..errors import UserError
from .common import (HelpFormatter, attention, device, dtype, finite, method_argument, nonempty, positive_int,
                     prompt_at, seed, setting, weight)

DEFAULT_OUT = "outputs/nasa-video.mp4"
MAX_HOURS = 24  # a longer --frames is a typo or a wish for an endless stream (--rolling without --frames)


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate an MP4 from a prompt, with negative prompt(s)",
                       formatter_class=HelpFormatter)
    p.add_argument("--prompt", required=True, type=nonempty, help="what the video shows")
    p.add_argument("--prompt-at", action="append", default=[], type=prompt_at, metavar="BLOCK:TEXT",
                   help="switch the prompt to TEXT from block BLOCK on (>= 1); repeat for a schedule")
    p.add_argument("--recache", action="store_true",
                   help="at each --prompt-at switch, recompute the cached frames' self-attention K/V under the new "
                        "prompt (one forward per cached block; the time is reported)")
    p.add_argument("--negative", action="append", default=[], type=nonempty,
                   help="negative prompt; repeat for several (summed: Z+ - sum_i w_i alpha Z-_i)")
    p.add_argument("--negative-weight", type=weight, action="append", default=[],
                   help="weight w_i of each --negative, in order (default: 1 each)")
    p.add_argument("--scale", type=finite, default=None,
                   help="guidance scale (default: the model config's): alpha for nasa, nag_scale s for nag (s > 1), "
                        "s for vsf, w for cfg")
    method_argument(p, "--guidance", default=None, help="the guidance method (default: the model config's)")
    p.add_argument("--guidance-setting", type=setting, action="append", default=[], metavar="KEY=VALUE",
                   help="a method's own setting, over the config's guidance.settings: tau, blend, sigma_end (nag); "
                        "bias (vsf)")
    p.add_argument("--model", default="toy", help="toy (the bundled shapes-world model) | toy-nasa-t | causvid | "
                                                  "self-forcing | tiny (random weights) | a config YAML")
    p.add_argument("--checkpoint", default=None, help="generator weights: CausVid / Self-Forcing .pt, Wan or diffusers")
    p.add_argument("--wan", default=None, help="Diffusers-format Wan2.1-T2V-1.3B folder or hub id (VAE, umT5)")
    p.add_argument("--vae", choices=("auto", "tae"), default="auto",
                   help="decoder: the model's own (auto) or the tiny Wan 2.1 decoder TAEHV taew2_1 (tae, needs --tae)")
    p.add_argument("--tae", default=None, metavar="PATH",
                   help="taew2_1.pth or taew2_1.safetensors (github.com/madebyollin/taehv), for --vae tae")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="video frames: 12k - 3 for Wan (81 = 7 blocks; default: the config's)")
    p.add_argument("--seed", type=seed, default=0, help="random seed, in [0, 2^63)")
    p.add_argument("--out", default=DEFAULT_OUT, help="the MP4 to write")
    p.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda | cuda:N (auto: cuda if visible)")
    p.add_argument("--dtype", type=dtype, default="auto", help="fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--attention", type=attention, default="auto", help="auto | sdpa | flash2 | flash3")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the repeated block (default: on for CUDA, off for the CPU)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay captured CUDA graphs for the denoising steps and cache passes (default: off)")
    p.add_argument("--fp8", action="store_true",
                   help="the DiT's linear layers in float8 (CUDA, compute capability 8.9+, needs torchao)")
    p.add_argument("--rolling", action="store_true", help="rolling self-attention cache (streams past the cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=generate)


def check_arguments(args):
    """Everything that can be checked before the generator loads: counts, the model's config, the frame count,
    the output path, ffmpeg, and the method with its settings, scale and weights. Returns the method."""
    from ..config import check_cache_holds, latent_frames_for, model_spec
    from ..loading import check_decoder_choice, load_config
    from ..video_io import check_output_path, ffmpeg_exe

    if args.negative_weight and len(args.negative_weight) != len(args.negative):
        raise UserError(f"{len(args.negative_weight)} --negative-weight for {len(args.negative)} --negative; "
                        f"give one weight per negative prompt or none")
    cfg = load_config(args.model)
    spec = model_spec(cfg)
    video, cache = spec.video, spec.cache
    latent = video.latent_frames
    if args.frames is not None and args.frames > MAX_HOURS * 3600 * video.fps:
        raise UserError(f"--frames {args.frames} is {args.frames / video.fps / 86400:,.0f} days of video; "
                        f"for a stream that runs until stopped use --rolling without --frames, or ask for at most "
                        f"{MAX_HOURS} hours")
    if args.frames is not None:
        stride = spec.temporal_stride
        latent = latent_frames_for(args.frames, video.frames_per_block, stride)
        check_cache_holds(latent, cache.capacity_frames, args.rolling or cache.rolling, stride)
    blocks = [block for block, _ in args.prompt_at]
    repeated = sorted({b for b in blocks if blocks.count(b) > 1})
    if repeated:
        raise UserError(f"--prompt-at names block {repeated[0]} more than once: one prompt per block")
    endless = args.frames is None and (args.rolling or cache.rolling)
    total = latent // video.frames_per_block
    late = [b for b in blocks if b >= total]
    if late and not endless:
        raise UserError(f"--prompt-at {late[0]}: the video has {total} blocks (0..{total - 1}); "
                        f"use an earlier block or more --frames")
    if args.wan and spec.weights.source != "wan":
        raise UserError(f"--wan has no effect with --model {args.model}: its VAE and text encoder are "
                        f"{spec.weights.source}, not Wan's; drop --wan, or use --model causvid")
    if args.guidance == "none" and (args.negative or args.scale is not None):
        given = "--negative" if args.negative else "--scale"
        raise UserError(f"{given} has no effect with --guidance none: drop it, or pick a method "
                        f"(nasa, nag, vsf, cfg)")
    check_decoder_choice(args.vae, args.tae)
    if args.fp8:
        from ..fp8 import check_fp8
        from ..loading import resolve_device

        check_fp8(resolve_device(args.device))
    if args.recache and not args.prompt_at:
        raise UserError("--recache acts at a prompt switch: add --prompt-at BLOCK:TEXT, or drop --recache")
    check_output_path(args.out, create_parent=args.out == DEFAULT_OUT)
    ffmpeg_exe()
    return check_guidance(args, spec), cfg


def check_guidance(args, spec):
    """The method, its settings, the scale and the negatives' weights, as the stream will check them, but before
    the generator loads (seconds, not the minute a real model takes)."""
    from ..guidance import default_scale, method_from_config

    method = method_from_config(spec, args.guidance, **dict(args.guidance_setting))
    if args.scale is not None and not args.negative and method.in_attention:
        raise UserError(f"--scale {args.scale:g} has no effect without a negative prompt ({method.name} steers away "
                        f"from it): add --negative TEXT, or drop --scale")
    scale = default_scale(spec, method) if args.scale is None else args.scale
    method.check_scale(scale)
    method.check_negatives(len(args.negative))
    if args.negative:
        method.check_weights(args.negative_weight or [1.0] * len(args.negative), [scale])
    return method


def _stop_like_ctrl_c(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a job scheduler, `kill`): keep the finished blocks, as Ctrl-C does


def generate(args) -> int:
    import signal

    method, cfg = check_arguments(args)  # the model's config, read and checked once
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    from ..pipeline import StreamingGenerator, VideoRequest, default_scale

    weights = args.negative_weight or [1.0] * len(args.negative)
    negatives = list(zip(args.negative, weights))
    request = VideoRequest(prompt=args.prompt, negative=negatives, scale=args.scale, method=method,
                           frames=args.frames, seed=args.seed, rolling=args.rolling or None,
                           prompt_at=dict(args.prompt_at), recache=args.recache)
    started = time.perf_counter()
    gen = StreamingGenerator.from_config(cfg, args.checkpoint, args.wan, args.device, args.dtype,
                                         args.attention, compile=args.compile, vae=args.vae, tae=args.tae,
                                         cuda_graphs=args.cuda_graphs, fp8=args.fp8)
    loaded = time.perf_counter() - started
    result = gen.generate(request, args.out, progress=not args.quiet)
    scale = default_scale(gen.spec, method) if args.scale is None else args.scale
    guided = method.name != "none" and (negatives or not method.in_attention)
    how = f"with {method.name} scale={scale:g}" if guided else "without guidance (no negative prompt)" \
        if method.name != "none" else "without guidance"
    summary = (f"{result.frames} frames ({result.blocks} blocks) {how}; load {loaded:.1f}s, "
               f"first block {result.first_block_seconds:.1f}s, generation {result.seconds:.1f}s")
    if args.prompt_at:
        summary += f"; {len(args.prompt_at)} prompt switch{'es' if len(args.prompt_at) > 1 else ''}"
        if args.recache:
            summary += f", re-cache {result.recache_seconds:.2f}s in all ({result.recaches} re-cache" \
                       f"{'s' if result.recaches != 1 else ''})"
    if result.interrupted:
        if result.path:
            print(f"interrupted: kept the {result.blocks} finished blocks in {result.path} ({summary})")
        else:
            print("interrupted before the first block finished: nothing written")
        return 130
    print(f"wrote {result.path}: {summary}")
    if gen.spec.weights.source == "random":
        print(f"note: model '{gen.spec.name}' has RANDOM weights (untrained): the video is noise. "
              f"Pass --model causvid --checkpoint ... for the real model.")
    return 0
