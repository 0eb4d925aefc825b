"""`nasa-video eval removal | videos | vbench-long | clip | calibrate | detector`: thin over nasa_video.eval
(resumable, sharded runs and the metrics) and, for the bundled model, nasa_video.toy."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError
from .common import (HelpFormatter, device, dtype, finite, json_path, method_argument, method_scales, positive_int,
                     probability, seed)

DEFAULTS = HelpFormatter
SWEEP_SCALES = [0.25, 0.5, 1.0, 1.5, 2.0, 3.0]  # NASA's alpha sweep
SWEEP_BASELINES = {"cfg": [2.0, 4.0], "nag": [2.0, 4.0], "vsf": [1.0, 2.0]}  # each baseline's usual range


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate negative guidance", formatter_class=DEFAULTS)
    what = p.add_subparsers(dest="what", required=True)
    _register_removal(what)
    _register_generation(what)
    _register_scoring(what)


def _register_removal(what) -> None:
    r = what.add_parser("removal", help="removal benchmark with ground truth on the bundled model",
                        formatter_class=DEFAULTS)
    r.add_argument("--model", default="toy", help="toy / toy-nasa-t: the bundled world with its exact detector; "
                                                  "causvid / self-forcing / a YAML: the CLIP-judged pairs (needs --out)")
    r.add_argument("--json", required=True, type=json_path, help="results as JSON")
    r.add_argument("--checkpoint", default=None)
    r.add_argument("--wan", default=None)
    r.add_argument("--dtype", type=dtype, default="auto")
    r.add_argument("--out", default=None, help="real models: folder for the videos (resumable, sharded with torchrun)")
    r.add_argument("--samples", type=positive_int, default=4, help="real models: videos per pair and method")
    r.add_argument("--clip", default=None, help="real models: CLIP ViT-L/14 folder (default $NASA_VIDEO_CLIP or "
                                                "~/.cache/nasa-video/clip-vit-large-patch14)")
    r.add_argument("--threshold", type=probability, default=0.5, help="real models: the judge's threshold for the "
                                                                     "negative (calibrate with `eval calibrate`)")
    r.add_argument("--subject-threshold", type=probability, default=0.5,
                   help="real models: the judge's threshold for the prompt's subject (a success needs it present; "
                        "calibrate with `eval calibrate --subject`)")
    r.add_argument("--table", default=None, help="markdown table (default: beside the JSON)")
    r.add_argument("--plot", default=None, help="PNG of success and retention against alpha (default: beside the JSON)")
    method_argument(r, "--methods", nargs="+", default=["none", "nasa"],
                    help="methods to compare; --scales applies to each guided method (check its range)")
    r.add_argument("--scales", nargs="+", type=finite, default=None,
                   help="scales for each guided method (default: the bundled model's own scale; real models: "
                        f"{' '.join(f'{s:g}' for s in SWEEP_SCALES)})")
    r.add_argument("--scales-for", action="append", default=[], metavar="METHOD=S1,S2",
                   help="scales for one method instead of --scales (e.g. nag=2,4 cfg=2,4)")
    r.add_argument("--sweep", action="store_true",
                   help="bundled model: the full table instead: none, NASA at " + ",".join(f"{s:g}" for s in SWEEP_SCALES)
                        + ", and " + ", ".join(f"{m} at {','.join(f'{s:g}' for s in v)}" for m, v in SWEEP_BASELINES.items()))
    r.add_argument("--rows", type=positive_int, default=8,
                   help="bundled model: questions per kind on held-out compositions (half as many, rounded up, on "
                        "trained ones)")
    r.add_argument("--seeds", type=positive_int, default=2, help="bundled model: seeds per question")
    r.add_argument("--scores", default=None, help="bundled model: each finished video's scores, one JSON line each "
                                                  "(default: beside --json as NAME.videos.jsonl); a rerun continues it")
    r.add_argument("--fresh", action="store_true", help="bundled model: ignore the scores of an earlier run")
    r.add_argument("--device", type=device, default="cpu")
    r.set_defaults(func=removal)


def _register_generation(what) -> None:
    """The commands that generate a run folder (resumable, sharded over torchrun ranks)."""
    v = what.add_parser("videos", help="generate an evaluation set: prompts x methods x samples, resumable, "
                                       "sharded over torchrun ranks", formatter_class=DEFAULTS)
    _generation_args(v, "prompt file: one per line, or a JSON list (VBench info files)", required=True)
    v.set_defaults(func=videos)
    vb = what.add_parser("vbench-long", help="VBench-Long (aesthetic / imaging quality by default): generate, "
                                             "then score with vbench in its own environment", formatter_class=DEFAULTS)
    _generation_args(vb, "prompt file (default: VBench's own prompts for --dimensions)", required=False)
    vb.add_argument("--dimensions", nargs="+", default=["aesthetic_quality", "imaging_quality"])
    vb.add_argument("--vbench-env", default=None, help="the vbench virtualenv (created on first use; default "
                                                       "$NASA_VIDEO_VBENCH_ENV or ~/.cache/nasa-video/vbench-env)")
    vb.add_argument("--score-device", default="cuda")
    vb.add_argument("--score-only", action="store_true", help="score what is already generated")
    vb.set_defaults(func=vbench_long)


def _register_scoring(what) -> None:
    """The commands that score what exists: a run folder, labelled frames, the toy detector."""
    c = what.add_parser("clip", help="CLIP+ / CLIP- of every finished video in an evaluation folder")
    c.add_argument("--out", required=True, help="the folder of `eval videos` / `eval removal` / `eval vbench-long`")
    c.add_argument("--clip", default=None)
    c.add_argument("--json", required=True, type=json_path)
    c.set_defaults(func=clip)
    k = what.add_parser("calibrate", help="the judge's threshold from frames whose answer is known")
    k.add_argument("--labels", required=True, help='JSON: [{"image": path, "negative": "cat", "contrast": "dog", '
                                                   '"shows": true}, ...]; with --subject: [{"image": path, '
                                                   '"subject": "a pet", "present": true}, ...]')
    k.add_argument("--subject", action="store_true", help="calibrate --subject-threshold (is the prompt's subject "
                                                          "there?) instead of --threshold (is the negative?)")
    k.add_argument("--clip", default=None)
    k.set_defaults(func=calibrate)
    d = what.add_parser("detector", help="detector agreement with the world's ground truth on codec reconstructions "
                                         "and on renders degraded like generated frames")
    d.add_argument("--videos", type=positive_int, default=200)
    d.add_argument("--seed", type=seed, default=0)
    d.set_defaults(func=detector)


def _generation_args(p, prompts_help: str, required: bool) -> None:
    p.add_argument("--model", default="causvid")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--wan", default=None)
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK under torchrun, else cuda / cpu")
    p.add_argument("--dtype", type=dtype, default="auto")
    p.add_argument("--prompts", required=required, help=prompts_help)
    p.add_argument("--negative", default="low quality, bad anatomy, blurry, distortion, ugly, low resolution, "
                                         "unclear details", help="the paper's VBench-Long negative prompt")
    method_argument(p, "--methods", nargs="+", default=["none", "nasa"])
    p.add_argument("--scales", nargs="+", type=finite, default=[0.5])
    p.add_argument("--scales-for", action="append", default=[], metavar="METHOD=S1,S2")
    p.add_argument("--samples", type=positive_int, default=5, help="videos per prompt and method (VBench uses 5)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", required=True)


def _model_spec(args, device: str | None):
    from ..eval.jobs import ModelSpec

    return ModelSpec(args.model, args.checkpoint, args.wan, device, args.dtype)


def removal(args) -> int:
    """The bundled world (toy models): ground truth and the pixel detector; real models: CLIP-judged pairs."""
    if not args.model.startswith("toy"):
        return _removal_judged(args)
    from ..loading import load_config
    from ..pipeline import StreamingGenerator
    from ..toy.removal import benchmark_rows, markdown_table, plot_sweep, run_removal, weights_fingerprint
    from ..video_io import write_json

    out = Path(args.json)
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: folder {out.parent} does not exist")
    scores = Path(args.scores or out.with_suffix(".videos.jsonl"))
    if args.fresh:
        scores.unlink(missing_ok=True)
    methods = _removal_methods(args, float(load_config(args.model).guidance.scale))
    gen = StreamingGenerator.from_config(args.model, device=args.device)
    pairs, seeds = benchmark_rows(args.rows, (args.rows + 1) // 2), tuple(range(args.seeds))
    try:
        result = run_removal(gen, methods, pairs, seeds, resume=scores, model=weights_fingerprint(gen.cfg))
    except KeyboardInterrupt:
        kept = sum(1 for _ in open(scores)) if scores.exists() else 0
        print(f"nasa-video: interrupted; {kept} scored videos kept in {scores}: run the same command to continue",
              file=sys.stderr)
        return 130
    write_json(out, result)
    table = markdown_table(result)
    Path(args.table or out.with_suffix(".md")).write_text(table + "\n")
    plotted = plot_sweep(result, args.plot or out.with_suffix(".png"))
    print(table)
    print(f"wrote {out}, {args.table or out.with_suffix('.md')}"
          + (f", {args.plot or out.with_suffix('.png')}" if plotted else " (no none/nasa rows: no alpha plot)"))
    return 0


def _removal_methods(args, default_scale: float) -> list[tuple[str, float]]:
    """--sweep: the full table; otherwise --methods at --scales (default: the model's own scale)."""
    from ..eval.jobs import method_scales as pairs
    from .common import scales_for

    if args.sweep:
        return pairs(["none", "nasa", *SWEEP_BASELINES], SWEEP_SCALES, SWEEP_BASELINES)
    return pairs(args.methods, args.scales or [default_scale], scales_for(args.scales_for))


def _removal_judged(args) -> int:
    from ..eval.clip import ClipScorer
    from ..eval.jobs import all_finished, generate_for_evaluation
    from ..eval.removal import REMOVAL_PAIRS, RemovalJudge, plan_removal, removal_summary
    from ..video_io import write_json

    if not args.out:
        raise UserError("removal on a real model writes its videos to --out FOLDER (resumable)")
    args.scales = args.scales or SWEEP_SCALES
    jobs = plan_removal(REMOVAL_PAIRS, method_scales(args), args.samples)
    scorer = ClipScorer(args.clip)  # fail before hours of generation, not after
    out = Path(args.out)
    spec = _model_spec(args, device=args.device if args.device != "cpu" else None)  # cpu, the default: auto
    report = generate_for_evaluation(jobs, out, spec, {"pairs": REMOVAL_PAIRS})
    if not all_finished(jobs, out):
        print(f"{json.dumps(report)}; other ranks are still generating: run the command again to judge")
        return 0
    judge = RemovalJudge(scorer, jobs, REMOVAL_PAIRS, args.threshold, subject_threshold=args.subject_threshold)
    result = judge.score(out)
    write_json(args.json, result)
    print(removal_summary(result))
    return 0


def videos(args) -> int:
    from ..eval.jobs import generate_for_evaluation, plan, read_prompts

    jobs = plan(read_prompts(args.prompts), method_scales(args), args.samples, args.negative, args.seed)
    report = generate_for_evaluation(jobs, Path(args.out), _model_spec(args, args.device), {"prompts": args.prompts})
    print(json.dumps(report))
    return 0


def vbench_long(args) -> int:
    """Generate (sharded, resumable), then score in the vbench environment (rank 0), then the table."""
    from ..eval.jobs import all_finished, generate_for_evaluation, plan, rank_and_world, read_prompts
    from ..eval.vbench import VBenchLong, write_report

    metric = VBenchLong(args.dimensions, args.vbench_env, args.score_device)
    out = Path(args.out)
    prompts = read_prompts(args.prompts) if args.prompts else metric.prompts()
    jobs = plan(prompts, method_scales(args), args.samples, args.negative, args.seed)
    if not args.score_only:
        report = generate_for_evaluation(jobs, out, _model_spec(args, args.device),
                                         {"prompts": args.prompts or "vbench", "dimensions": args.dimensions})
        print(json.dumps(report))
    if not all_finished(jobs, out):
        print("not every video is finished (other ranks still running?): run the command again to score")
        return 0
    if rank_and_world()[0] != 0:
        return 0
    print(write_report(out, metric.score(out)))
    return 0


def clip(args) -> int:
    from ..eval.clip import ClipMetric, ClipScorer, clip_summary
    from ..video_io import write_json

    result = ClipMetric(ClipScorer(args.clip)).score(args.out)
    write_json(args.json, result)
    print(clip_summary(result))
    return 0


def calibrate(args) -> int:
    from ..eval.clip import ClipScorer, calibrate_labels

    judge = "subject" if args.subject else "negative"
    print(json.dumps(calibrate_labels(ClipScorer(args.clip), args.labels, judge)))
    return 0


def detector(args) -> int:
    import numpy as np

    from ..loading import load_config
    from ..toy.codec import ShuffleCodec
    from ..toy.train import codec_agreement, degraded_agreement
    from ..toy.world import OBJECTS

    from ..config import model_spec

    cfg = load_config("toy")
    codec = ShuffleCodec()  # exact: its latent statistics do not change what it reconstructs
    frames = 1 + codec.temporal_stride * (model_spec(cfg).video.latent_frames - 1)
    exact = codec_agreement(codec, np.random.default_rng(args.seed), args.videos, frames)
    degraded = degraded_agreement(np.random.default_rng([args.seed, 1]), args.videos, frames)
    print(f"detector agreement with ground truth ({args.videos} videos, {frames} frames each, {len(OBJECTS)} object "
          f"names per frame): codec reconstructions {100 * exact:.2f}%; renders degraded like generated frames "
          f"(shape jitter, blur, noise, colour shift) {100 * degraded['agreement']:.2f}%, corruption read on them "
          f"{100 * degraded['corruption']:.2f}%; the consistency rule passes {100 * degraded['consistent']:.1f}% "
          f"of them (each frame jittered on its own) and {100 * degraded['consistent_exact']:.1f}% of the same scenes "
          f"rendered exactly")
    from ..toy.judge import calibration

    judged = calibration(np.random.default_rng([args.seed, 2]), args.videos, frames)
    print(f"the removal judge passes {100 * judged['exact']:.1f}% of videos that are what was asked for rendered "
          f"exactly, {100 * judged['degraded']:.1f}% of them degraded like generated frames (blur, noise, colour "
          f"shift) and {100 * judged['jittered']:.1f}% degraded with every shape jittered in every frame")
    return 0
