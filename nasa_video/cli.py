"""`nasa-video generate ...`: thin over the library. Bad input ends in one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import UserError
from .guidance import METHODS


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate an MP4 from a prompt, with negative prompt(s)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", action="append", default=[],
                   help="negative prompt; repeat for several (summed: Z+ - sum_i w_i alpha Z-_i)")
    p.add_argument("--negative-weight", type=float, action="append", default=[],
                   help="weight of each --negative, in order (default 1 each)")
    p.add_argument("--scale", type=float, default=None, help="guidance scale alpha (default: the model config's)")
    p.add_argument("--guidance", choices=sorted(METHODS), default=None,
                   help="default: the model config's. --scale is alpha for nasa, nag_scale s for nag (s > 1), "
                        "s for vsf, w for cfg")
    p.add_argument("--model", default="toy", help="toy (the bundled shapes-world model) | toy-nasa-t | causvid | "
                                                  "self-forcing | tiny (random weights) | a config YAML")
    p.add_argument("--checkpoint", default=None, help="generator weights: CausVid / Self-Forcing .pt, Wan or diffusers")
    p.add_argument("--wan", default=None, help="Diffusers-format Wan2.1-T2V-1.3B folder or hub id (VAE, umT5)")
    p.add_argument("--frames", type=int, default=None, help="video frames: 12k - 3 for Wan (81 = 7 blocks; default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/nasa-video.mp4")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--attention", default="auto", help="auto | sdpa | flash2 | flash3")
    p.add_argument("--rolling", action="store_true", help="rolling self-attention cache (streams past the cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def generate(args) -> int:
    from .pipeline import StreamingGenerator
    from .video_io import check_output_path, ffmpeg_exe

    ffmpeg_exe()
    check_output_path(args.out, create_parent=args.out == "outputs/nasa-video.mp4")
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


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate negative guidance", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_subparsers(dest="what", required=True)
    r = what.add_parser("removal", help="removal benchmark with ground truth on the bundled model",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--model", default="toy", help="toy / toy-nasa-t: the bundled world with its exact detector; "
                                                  "causvid / self-forcing / a YAML: the CLIP-judged pairs (needs --out)")
    r.add_argument("--json", required=True, help="results as JSON")
    r.add_argument("--checkpoint", default=None)
    r.add_argument("--wan", default=None)
    r.add_argument("--dtype", default="auto")
    r.add_argument("--out", default=None, help="real models: folder for the videos (resumable, sharded with torchrun)")
    r.add_argument("--samples", type=int, default=4, help="real models: videos per pair and method")
    r.add_argument("--clip", default=None, help="real models: CLIP ViT-L/14 folder (default $NASA_VIDEO_CLIP or "
                                                "~/.cache/nasa-video/clip-vit-large-patch14)")
    r.add_argument("--threshold", type=float, default=0.5, help="real models: the judge's threshold (calibrate "
                                                               "with `eval calibrate`)")
    r.add_argument("--table", default=None, help="markdown table (default: beside the JSON)")
    r.add_argument("--plot", default=None, help="PNG of success and retention against alpha (default: beside the JSON)")
    r.add_argument("--methods", nargs="+", default=["none", "nasa"], choices=sorted(METHODS),
                   help="methods to compare; --scales applies to each guided method (check its range)")
    r.add_argument("--scales", nargs="+", type=float, default=[0.25, 0.5, 1.0, 1.5, 2.0, 3.0])
    r.add_argument("--scales-for", action="append", default=[], metavar="METHOD=S1,S2",
                   help="scales for one method instead of --scales (e.g. nag=2,4 cfg=2,4)")
    r.add_argument("--pairs", type=int, default=48, help="prompt pairs (at least 40 for the reported figures)")
    r.add_argument("--seeds", type=int, default=4, help="seeds per pair")
    r.add_argument("--device", default="cpu")
    v = what.add_parser("videos", help="generate an evaluation set: prompts x methods x samples, resumable, "
                                       "sharded over torchrun ranks", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _eval_generation_args(v)
    vb = what.add_parser("vbench-long", help="VBench-Long (aesthetic / imaging quality by default): generate, "
                                             "then score with vbench in its own environment",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _eval_generation_args(vb)
    for action in vb._actions:
        if action.dest == "prompts":
            action.required, action.help = False, "prompt file (default: VBench's own prompts for --dimensions)"
    vb.add_argument("--dimensions", nargs="+", default=["aesthetic_quality", "imaging_quality"])
    vb.add_argument("--vbench-env", default=None, help="the vbench virtualenv (created on first use; default "
                                                       "$NASA_VIDEO_VBENCH_ENV or ~/.cache/nasa-video/vbench-env)")
    vb.add_argument("--score-device", default="cuda")
    vb.add_argument("--score-only", action="store_true", help="score what is already generated")
    c = what.add_parser("clip", help="CLIP+ / CLIP- of every finished video in an evaluation folder")
    c.add_argument("--out", required=True, help="the folder of `eval videos` / `eval removal` / `eval vbench-long`")
    c.add_argument("--clip", default=None)
    c.add_argument("--json", required=True)
    k = what.add_parser("calibrate", help="the judge's threshold from frames whose answer is known")
    k.add_argument("--labels", required=True, help='JSON: [{"image": path, "negative": "cat", "contrast": "dog", '
                                                   '"shows": true}, ...]')
    k.add_argument("--clip", default=None)
    d = what.add_parser("detector", help="detector agreement with the world's ground truth on codec reconstructions")
    d.add_argument("--videos", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)


def _eval_generation_args(p) -> None:
    p.add_argument("--model", default="causvid")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--wan", default=None)
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK under torchrun, else cuda / cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompts", required=True, help="prompt file: one per line, or a JSON list (VBench info files)")
    p.add_argument("--negative", default="low quality, bad anatomy, blurry, distortion, ugly, low resolution, "
                                         "unclear details", help="the paper's VBench-Long negative prompt")
    p.add_argument("--methods", nargs="+", default=["none", "nasa"], choices=sorted(METHODS))
    p.add_argument("--scales", nargs="+", type=float, default=[0.5])
    p.add_argument("--scales-for", action="append", default=[], metavar="METHOD=S1,S2")
    p.add_argument("--samples", type=int, default=5, help="videos per prompt and method (VBench uses 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)


def _eval_real(args) -> int:
    """eval videos / clip / calibrate, and removal on real checkpoints."""
    from pathlib import Path

    import numpy as np

    from . import evaluate as ev
    from .video_io import write_json

    if args.what == "videos":
        jobs = ev.plan(ev.read_prompts(args.prompts), ev.methods_from_args(args.methods, args.scales, args.scales_for),
                       args.samples, args.negative, args.seed)
        report = ev.generate_for_evaluation(args, jobs, Path(args.out), {"prompts": args.prompts})
        print(json.dumps(report))
        return 0
    if args.what == "clip":
        from .clip_score import ClipScorer
        from .video_io import read_video

        scorer = ClipScorer(args.clip)
        rows = {}
        for sidecar in sorted(Path(args.out).glob("videos/*/*.json")):
            job = json.loads(sidecar.read_text())
            scores = scorer.clip_plus_minus(read_video(sidecar.with_suffix(".mp4")), job["prompt"], job["negative"])
            label = sidecar.parent.name
            rows.setdefault(label, []).append(scores)
        if not rows:
            raise UserError(f"no finished videos under {args.out}/videos")
        result = {label: {"videos": len(v), "clip_plus": float(np.mean([x["clip_plus"] for x in v])),
                          "clip_minus": float(np.mean([x["clip_minus"] for x in v]))} for label, v in rows.items()}
        write_json(args.json, {"clip": str(scorer.folder), "methods": result})
        for label, r in result.items():
            print(f"{label}: CLIP+ {r['clip_plus']:.2f}  CLIP- {r['clip_minus']:.2f}  ({r['videos']} videos)")
        return 0
    if args.what == "calibrate":
        from PIL import Image

        from .clip_score import ClipScorer, calibrate

        scorer = ClipScorer(args.clip)
        items = json.loads(Path(args.labels).read_text())
        probs = [float(scorer.negative_probability(np.asarray(Image.open(i["image"]).convert("RGB"))[None],
                                                   i["negative"], i["contrast"])[0]) for i in items]
        result = calibrate(np.array(probs), np.array([bool(i["shows"]) for i in items]))
        print(json.dumps(result))
        return 0
    # removal on a real checkpoint
    from .clip_score import REMOVAL_PAIRS, ClipScorer

    if not args.out:
        raise UserError("removal on a real model writes its videos to --out FOLDER (resumable)")
    methods = ev.methods_from_args(args.methods, args.scales, args.scales_for)
    jobs = ev.plan_removal(REMOVAL_PAIRS, methods, args.samples)
    scorer = ClipScorer(args.clip)  # fail before hours of generation, not after
    args.device = args.device if args.device != "cpu" else None
    report = ev.generate_for_evaluation(args, jobs, Path(args.out), {"pairs": REMOVAL_PAIRS})
    if not all(ev.finished(j, Path(args.out)) for j in jobs):
        print(f"{json.dumps(report)}; other ranks are still generating: run the command again to judge")
        return 0
    result = ev.judge_removal(scorer, jobs, REMOVAL_PAIRS, Path(args.out), args.threshold)
    write_json(args.json, result)
    for label, r in result["methods"].items():
        print(f"{label}: removal success {100 * r['success']:.1f}%  CLIP+ {r['clip_plus']:.2f}  "
              f"CLIP- {r['clip_minus']:.2f}  ({r['videos']} videos)")
    return 0


def evaluate(args) -> int:
    from pathlib import Path

    import numpy as np

    from .pipeline import StreamingGenerator

    if args.what == "detector":
        from .loading import load_config
        from .toy.codec import ShuffleCodec
        from .toy.train import codec_agreement

        cfg = load_config("toy")
        codec = ShuffleCodec()  # exact: its latent statistics do not change what it reconstructs
        frames = 1 + codec.temporal_stride * (int(cfg.video.latent_frames) - 1)
        score = codec_agreement(codec, np.random.default_rng(args.seed), args.videos, frames)
        print(f"detector agreement with ground truth on {args.videos} codec-reconstructed videos "
              f"({frames} frames each, 12 object names per frame): {100 * score:.2f}%")
        return 0
    if args.what == "vbench-long":
        from .vbench_env import run_vbench_long
        return run_vbench_long(args)
    if args.what in ("videos", "clip", "calibrate") or not args.model.startswith("toy"):
        return _eval_real(args)
    from .toy.removal import markdown_table, plot_sweep, prompt_pairs, run_removal
    from .video_io import write_json

    from .evaluate import methods_from_args

    out = Path(args.json)
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: folder {out.parent} does not exist")
    methods = methods_from_args(args.methods, args.scales, args.scales_for)
    gen = StreamingGenerator.from_config(args.model, device=args.device)
    result = run_removal(gen, methods, prompt_pairs(args.pairs), tuple(range(args.seeds)))
    write_json(out, result)
    table = markdown_table(result)
    Path(args.table or out.with_suffix(".md")).write_text(table + "\n")
    plotted = plot_sweep(result, args.plot or out.with_suffix(".png"))
    print(table)
    print(f"wrote {out}, {args.table or out.with_suffix('.md')}"
          + (f", {args.plot or out.with_suffix('.png')}" if plotted else " (no none/nasa rows: no alpha plot)"))
    return 0


def bench_flops(args) -> int:
    from .bench import flops_report
    from .video_io import write_json

    methods = list(dict.fromkeys(["none"] + args.methods))
    report = flops_report(args.model, methods)
    print(f"{report['model']}: {report['latent_frames']} latent frames at {report['resolution'][0]}x"
          f"{report['resolution'][1]}, steps {report['steps']} + cache pass, one video")
    print(f"{'method':8} {'TFLOPs':>10} {'ratio':>8} {'memory GiB':>11}")
    for name, r in report["methods"].items():
        print(f"{name:8} {r['flops'] / 1e12:10.2f} {r['ratio']:8.4f} {r['memory_bytes'] / 2**30:11.2f}")
    if args.json:
        write_json(args.json, report)
    return 0


def bench_speed(args) -> int:
    from .bench import run_speed

    run_speed(args.model, args.methods, args.repeats, args.device, args.dtype, args.attention, args.decode,
              args.json, args.profile, args.vae_dtype, args.overlap_decode)
    return 0


def _serve_parser(sub) -> None:
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


def serve(args) -> int:
    import ipaddress

    from .pipeline import StreamingGenerator
    from .server import Limits
    from .server import serve as run_server
    from .video_io import ffmpeg_exe

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


def _upstream_parser(sub) -> None:
    p = sub.add_parser("upstream", help="run upstream CausVid / Self-Forcing inference with a negative prompt",
                       description="Runs upstream's own inference script (its arguments after --) with the NASA "
                                   "hook on its pipeline. Example: nasa-video upstream causvid --negative 'blurry' "
                                   "--scale 0.5 -- --config_path configs/wan_causal_dmd.yaml --checkpoint_folder "
                                   "ckpt --output_folder out --prompt_file_path prompts.txt")
    p.add_argument("which", choices=["causvid", "self-forcing"])
    p.add_argument("--negative", action="append", default=[])
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--guidance", choices=["nasa", "nag", "vsf", "none"], default="nasa")
    p.add_argument("--repo", default=None, help="upstream checkout (default: third_party/... or $NASA_VIDEO_CAUSVID "
                                                "/ $NASA_VIDEO_SELF_FORCING)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nasa-video", description="Negative prompts for streaming video diffusion (NASA)")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    train = sub.add_parser("train", help="train a model")
    train.add_argument("what", choices=["toy", "toy-nasa-t", "ode-pairs", "ode", "dmd"],
                       help="toy: the bundled shapes-world model, on this CPU; toy-nasa-t: its NASA-T (DMD) variant; "
                            "ode-pairs: teacher ODE trajectories for --prompts; ode: ODE-regression initialisation; "
                            "dmd: DMD / NASA-T (each from a training --config; dmd also --dry-run)")
    train.add_argument("--config", default=None, help="a training YAML (e.g. configs/causvid_nasa_t_train.yaml)")
    train.add_argument("--prompts", default=None, help="ode-pairs: a prompt file (one per line, or a JSON list)")
    train.add_argument("--dry-run", action="store_true", help="dmd: build at full size on the meta device, check shapes")
    train.add_argument("--out", default="toy-training", help="training folder (stages resume from it)")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--smoke", action="store_true", help="a few iterations of each stage (a test)")
    train.add_argument("--export", default=None, metavar="DIR",
                       help="then copy the shippable files to DIR (nasa_video/toy/weights to ship them)")
    train.add_argument("--export-only", action="store_true", help="only export an already trained --out folder")
    _eval_parser(sub)
    _serve_parser(sub)
    _upstream_parser(sub)
    bench = sub.add_parser("bench", help="cost of the guidance methods")
    kind = bench.add_subparsers(dest="kind", required=True)
    flops = kind.add_parser("flops", help="FLOPs and memory per video, counted on the meta device")
    flops.add_argument("--model", default="causvid")
    flops.add_argument("--methods", nargs="+", default=list(METHODS), choices=sorted(METHODS))
    flops.add_argument("--json", default=None)
    speed = kind.add_parser("speed", help="wall time per video, interleaved runs, ratio to none")
    speed.add_argument("--model", default="tiny", help="tiny | mid (a mid-size random config) | causvid | ...")
    speed.add_argument("--methods", nargs="+", default=list(METHODS), choices=sorted(METHODS))
    speed.add_argument("--repeats", type=int, default=5)
    speed.add_argument("--device", default="auto")
    speed.add_argument("--dtype", default="auto")
    speed.add_argument("--attention", default="auto")
    speed.add_argument("--decode", action="store_true", help="include the VAE decode")
    speed.add_argument("--vae-dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    speed.add_argument("--overlap-decode", action=argparse.BooleanOptionalAction, default=None,
                       help="decode block k while block k+1 is denoised (default: on for CUDA)")
    speed.add_argument("--profile", default=None, metavar="PATH",
                       help="also write one block's top kernels per method, grouped (JSON at PATH, markdown beside)")
    speed.add_argument("--json", default=None)
    argv = list(sys.argv[1:] if argv is None else argv)
    upstream_args = []
    if argv[:1] == ["upstream"] and "--" in argv:  # everything after -- goes to upstream's own script
        cut = argv.index("--")
        argv, upstream_args = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    args.upstream_args = upstream_args
    try:
        if args.command == "bench":
            return bench_flops(args) if args.kind == "flops" else bench_speed(args)
        if args.command == "eval":
            return evaluate(args)
        if args.command == "generate":
            return generate(args)
        if args.command == "serve":
            return serve(args)
        if args.command == "upstream":
            from .integrations import run_upstream
            run_upstream(args.which, args.upstream_args, args.negative, args.scale, args.guidance, args.repo)
            return 0
        if args.command == "train":
            if args.what in ("ode-pairs", "ode", "dmd"):
                from .train.setup import dry_run, make_ode_pairs, train_from_config
                if not args.config:
                    raise UserError(f"train {args.what} needs --config (configs/causvid_ode_train.yaml for ode-pairs "
                                    f"and ode, configs/causvid_nasa_t_train.yaml for dmd)")
                out = args.out if args.out != "toy-training" else f"{args.what}-training"
                if args.what == "ode-pairs":
                    from .evaluate import read_prompts
                    if not args.prompts:
                        raise UserError("train ode-pairs needs --prompts FILE (one prompt per line)")
                    print(f"wrote {make_ode_pairs(args.config, read_prompts(args.prompts), out)} trajectories to {out}")
                    return 0
                if args.dry_run:
                    if args.what != "dmd":
                        raise UserError("--dry-run is for train dmd")
                    print(json.dumps(dry_run(args.config), indent=2))
                    return 0
                from .evaluate import rank_and_world
                summary = train_from_config(args.config, out, stage=args.what)
                if rank_and_world()[0] == 0:  # under torchrun: once, with rank 0's figures
                    print(f"wrote {out}: {json.dumps(summary)}")
                return 0
            if args.what == "toy-nasa-t":
                from .toy.nasa_t import export_nasa_t, train_toy_nasa_t
                out = args.out if args.out != "toy-training" else "toy-nasa-t-training"
                if not args.export_only:
                    print(f"wrote {out}: {json.dumps(train_toy_nasa_t(out, args.smoke))}")
                if args.export:
                    print(f"exported {', '.join(map(str, export_nasa_t(out, args.export)))}")
                return 0
            from .toy.train import export_bundle, train_toy
            if not args.export_only:
                log = train_toy(args.out, args.seed, args.smoke)
                print(f"wrote {args.out}: {json.dumps(log)}")
            if args.export:
                files = export_bundle(args.out, args.export)
                size = sum(f.stat().st_size for f in files) / 2**20
                print(f"exported {len(files)} files ({size:.1f} MiB) to {args.export}")
            return 0
    except UserError as err:
        print(f"nasa-video: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
