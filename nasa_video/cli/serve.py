"""`nasa-video serve`: the live page."""
from __future__ import annotations

import sys

from ..errors import UserError
from .common import HelpFormatter, attention, count, device, dtype, gpus, port, positive_int


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
    cluster = p.add_argument_group("many GPUs and machines (Ray Serve; pip install 'nasa-video[cluster]')")
    cluster.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                         help="serve from generator replicas on a Ray cluster: no ADDRESS starts a local one; auto "
                              "joins this machine's (ray start); or HOST:PORT of a head")
    cluster.add_argument("--replicas", type=positive_int, default=None, help="fixed number of replicas (default 1)")
    cluster.add_argument("--min-replicas", type=count, default=None, help="autoscale between these (with --max)")
    cluster.add_argument("--max-replicas", type=positive_int, default=None, help="autoscale up to this many")
    cluster.add_argument("--gpus-per-replica", type=gpus, default=None,
                         help="GPUs each replica holds (default 1; 0 with --device cpu)")
    p.set_defaults(func=serve)


def check_cluster_arguments(args) -> None:
    """The cluster flags agree with each other (before anything starts)."""
    flags = [f for f, v in (("--replicas", args.replicas), ("--min-replicas", args.min_replicas),
                            ("--max-replicas", args.max_replicas), ("--gpus-per-replica", args.gpus_per_replica))
             if v is not None]
    if args.ray is None and flags:
        raise UserError(f"{flags[0]} needs --ray (the replicas run on a Ray cluster)")
    if args.replicas is not None and (args.min_replicas is not None or args.max_replicas is not None):
        raise UserError("give --replicas N (fixed) or --min-replicas / --max-replicas (autoscaling), not both")
    if args.min_replicas is not None and args.max_replicas is not None and args.min_replicas > args.max_replicas:
        raise UserError(f"--min-replicas {args.min_replicas} is above --max-replicas {args.max_replicas}")
    if args.ray not in (None, "local"):
        from ..server.address import check_address

        check_address(args.ray)


def serve(args) -> int:
    import ipaddress

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a port number (1-65535)")
    if args.max_blocks < 1:
        raise UserError("--max-blocks must be at least 1")
    check_cluster_arguments(args)  # before torch and Ray are imported (seconds)
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
    limits = Limits(max_blocks=args.max_blocks, max_streams=args.max_streams)
    if args.ray is not None:
        return serve_cluster(args, limits)
    gen = StreamingGenerator.from_config(args.model, args.checkpoint, args.wan, args.device, args.dtype,
                                         args.attention)
    print(f"nasa-video serve: model {gen.cfg.name} on {gen.device}; open http://{args.host}:{args.port}/",
          file=sys.stderr)
    run_server(gen, args.host, args.port, args.clips, limits)
    return 0


def serve_cluster(args, limits) -> int:
    """--ray: generator replicas on Ray Serve behind this process's ingress (nasa_video/server/cluster.py)."""
    try:
        from ..server.cluster import ClusterServer, start_cluster, stop_cluster
    except ImportError:
        raise UserError("--ray needs Ray Serve: pip install 'nasa-video[cluster]'") from None
    from ..server.app import run_app

    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else 0.0 if args.device == "cpu" else 1.0
    generator = dict(model=args.model, checkpoint=args.checkpoint, wan=args.wan, device=args.device, dtype=args.dtype,
                     attention_backend=args.attention)
    handle, facts, most = start_cluster(None if args.ray == "local" else args.ray, generator, limits,
                                        args.replicas or 1, args.min_replicas, args.max_replicas, gpus)
    try:
        print(f"nasa-video serve: model {facts['model']} on up to {most} Ray Serve replica(s) ({gpus:g} GPU each, "
              f"{limits.max_streams} streams each); open http://{args.host}:{args.port}/", file=sys.stderr)
        run_app(ClusterServer(handle, args.clips, limits, facts, most), args.host, args.port)
    finally:
        stop_cluster()
    return 0
