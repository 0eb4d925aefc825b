"""`nasa-video serve`: the live page."""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError


def register(sub) -> None:
    p = sub.add_parser("serve", help="a live page: stream a video, change the negative prompt while it plays",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="toy", help="as for generate")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--wan", default=None)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback exposes the server")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--clips", default="outputs/clips", help="server-side folder for saved MP4s")
    p.add_argument("--max-blocks", type=int, default=60, help="longest finite video a client may ask for")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attention", default="auto")
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
    run_server(gen, args.host, args.port, args.clips, Limits(max_blocks=args.max_blocks))
    return 0
