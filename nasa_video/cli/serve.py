"""`nasa-video serve`: the live page."""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from .common import HelpFormatter, attention, device, dtype, port, positive_int


def register(sub) -> None:
    p = sub.add_parser("serve", help="a live page: stream a video, change the negative prompt while it plays",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", default="toy", help="as for generate")
    p.add_argument("--checkpoint", default=None, help="as for generate")
    p.add_argument("--wan", default=None, help="as for generate")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback exposes the server")
    p.add_argument("--port", type=port, default=7860, help="port to listen on")
    p.add_argument("--clips", default="outputs/clips", help="server-side folder for saved MP4s")
    p.add_argument("--max-blocks", type=positive_int, default=60, help="longest finite video a client may ask for")
    p.add_argument("--max-streams", type=positive_int, default=4,
                   help="videos generated at once, in one batched forward per step (NASA / none); later ones queue")
    p.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", type=dtype, default="auto", help="fp32 | bf16 | fp16 (auto: bf16 on CUDA)")
    p.add_argument("--attention", type=attention, default="auto", help="auto | sdpa | flash2 | flash3")
    p.set_defaults(func=serve)


def serve(args) -> int:
    import ipaddress

    from ..pipeline import StreamingGenerator
    from ..server import Limits
    from ..server import serve as run_server
    from ..video_io import ffmpeg_exe

    ffmpeg_exe()
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"warning: binding {args.host}: anyone who can reach this machine can run generations on it "
              f"(no authentication)", file=sys.stderr)
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a port number (1-65535)")
    if args.max_blocks < 1:
        raise UserError("--max-blocks must be at least 1")
    gen = StreamingGenerator.from_config(args.model, args.checkpoint, args.wan, args.device, args.dtype,
                                         args.attention)
    print(f"nasa-video serve: model {gen.cfg.name} on {gen.device}; open http://{args.host}:{args.port}/",
          file=sys.stderr)
    run_server(gen, args.host, args.port, args.clips, Limits(max_blocks=args.max_blocks, max_streams=args.max_streams))
    return 0
