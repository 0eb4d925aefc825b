"""`nasa-video bench flops | speed`: the cost of each guidance method."""
from __future__ import annotations

import argparse

from .common import all_methods, attention, device, dtype, json_path, method_argument, positive_int


def register(sub) -> None:
    bench = sub.add_parser("bench", help="cost of the guidance methods")
    kind = bench.add_subparsers(dest="kind", required=True)
    flops = kind.add_parser("flops", help="FLOPs and memory per video, counted on the meta device")
    flops.add_argument("--model", default="causvid", help="a model config (counted at its full size)")
    method_argument(flops, "--methods", nargs="+", default=None)  # None: every method
    flops.add_argument("--json", default=None, type=json_path, help="also write the report as JSON")
    flops.set_defaults(func=bench_flops)
    speed = kind.add_parser("speed", help="wall time per video, interleaved runs, ratio to none")
    speed.add_argument("--model", default="tiny", help="tiny | mid (a mid-size random config) | causvid | ...")
    method_argument(speed, "--methods", nargs="+", default=None)  # None: every method
    speed.add_argument("--repeats", type=positive_int, default=5, help="interleaved rounds per method")
    speed.add_argument("--device", type=device, default="auto")
    speed.add_argument("--dtype", type=dtype, default="auto")
    speed.add_argument("--attention", type=attention, default="auto")
    speed.add_argument("--decode", action="store_true", help="include the VAE decode")
    speed.add_argument("--vae-dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    speed.add_argument("--overlap-decode", action=argparse.BooleanOptionalAction, default=None,
                       help="decode block k while block k+1 is denoised (default: on for CUDA)")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the repeated block (default: on for CUDA); the warm-up is reported apart")
    speed.add_argument("--vae", choices=("auto", "tae"), default="auto",
                       help="decoder with --decode: the model's (auto) or the tiny Wan 2.1 decoder (tae, random weights)")
    speed.add_argument("--cuda-graphs", action="store_true",
                       help="replay CUDA graphs for the cached forwards; reports their latents' error against eager")
    speed.add_argument("--fp8", action="store_true",
                       help="the blocks' linear layers in float8 (torchao); reports the error against bf16")
    speed.add_argument("--profile", default=None, metavar="PATH", type=json_path,
                       help="also write one block's top kernels per method, grouped (JSON at PATH, markdown beside)")
    speed.add_argument("--json", default=None, type=json_path, help="also write the report as JSON")
    speed.set_defaults(func=bench_speed)


def bench_flops(args) -> int:
    from ..bench import flops_report, flops_table
    from ..video_io import write_json

    methods = list(dict.fromkeys(["none"] + (args.methods or all_methods())))
    report = flops_report(args.model, methods)
    print(flops_table(report))
    if args.json:
        write_json(args.json, report)
    return 0


def bench_speed(args) -> int:
    from ..bench import run_speed

    run_speed(args.model, args.methods or all_methods(), args.repeats, args.device, args.dtype, args.attention,
              args.decode, args.json, args.profile, args.vae_dtype, args.overlap_decode, vae=args.vae,
              cuda_graphs=args.cuda_graphs, fp8=args.fp8, compile=args.compile)
    return 0
