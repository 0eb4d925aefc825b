"""`nasa-video train toy | toy-nasa-t | ode-pairs | ode | dmd`."""
from __future__ import annotations

import json

from ..errors import UserError
from .common import device, seed

DEFAULT_OUT = "toy-training"


def register(sub) -> None:
    train = sub.add_parser("train", help="train a model")
    train.add_argument("what", choices=["toy", "toy-nasa-t", "ode-pairs", "ode", "dmd"],
                       help="toy: the bundled shapes-world model, on this CPU; toy-nasa-t: its NASA-T (DMD) variant; "
                            "ode-pairs: teacher ODE trajectories for --prompts; ode: ODE-regression initialisation; "
                            "dmd: DMD / NASA-T (each from a training --config; dmd also --dry-run)")
    train.add_argument("--config", default=None, help="a training YAML (e.g. configs/causvid_nasa_t_train.yaml)")
    train.add_argument("--prompts", default=None, help="ode-pairs: a prompt file (one per line, or a JSON list)")
    train.add_argument("--dry-run", action="store_true", help="dmd: build at full size on the meta device, check shapes")
    train.add_argument("--out", default=DEFAULT_OUT, help="training folder (stages resume from it)")
    train.add_argument("--seed", type=seed, default=None, help="default: the training config's")
    train.add_argument("--smoke", action="store_true", help="a few iterations of each stage (a test)")
    train.add_argument("--device", type=device, default="cpu", help="toy: where it trains (cpu, cuda); the random "
                                                                    "draws stay on the CPU, so runs agree")
    train.add_argument("--export", default=None, metavar="DIR",
                       help="then copy the shippable files to DIR (nasa_video/toy/weights to ship them)")
    train.add_argument("--export-only", action="store_true", help="only export an already trained --out folder")
    train.set_defaults(func=train_command)


def train_command(args) -> int:
    if args.what in ("ode-pairs", "ode", "dmd"):
        return distill(args)
    if args.what == "toy-nasa-t":
        return toy_nasa_t(args)
    return toy(args)


def distill(args) -> int:
    """The real model's stages, from a training YAML (under torchrun: every rank runs this)."""
    from ..train.setup import dry_run, make_ode_pairs, train_from_config
    from ..eval.jobs import rank_and_world, read_prompts

    if not args.config:
        raise UserError(f"train {args.what} needs --config (configs/causvid_ode_train.yaml for ode-pairs "
                        f"and ode, configs/causvid_nasa_t_train.yaml for dmd)")
    out = args.out if args.out != DEFAULT_OUT else f"{args.what}-training"
    if args.what == "ode-pairs":
        if not args.prompts:
            raise UserError("train ode-pairs needs --prompts FILE (one prompt per line)")
        print(f"wrote {make_ode_pairs(args.config, read_prompts(args.prompts), out)} trajectories to {out}")
        return 0
    if args.dry_run:
        if args.what != "dmd":
            raise UserError("--dry-run is for train dmd")
        print(json.dumps(dry_run(args.config), indent=2))
        return 0
    summary = train_from_config(args.config, out, stage=args.what)
    if rank_and_world()[0] == 0:  # under torchrun: once, with rank 0's figures
        print(f"wrote {out}: {json.dumps(summary)}")
    return 0


def toy_nasa_t(args) -> int:
    from ..toy.nasa_t import export_nasa_t, train_toy_nasa_t

    out = args.out if args.out != DEFAULT_OUT else "toy-nasa-t-training"
    if not args.export_only:
        print(f"wrote {out}: {json.dumps(train_toy_nasa_t(out, args.smoke))}")
    if args.export:
        print(f"exported {', '.join(map(str, export_nasa_t(out, args.export)))}")
    return 0


def toy(args) -> int:
    from ..toy.train import export_bundle, train_toy

    if not args.export_only:
        log = train_toy(args.out, args.seed, args.smoke, device=args.device)
        print(f"wrote {args.out}: {json.dumps(log)}")
    if args.export:
        files = export_bundle(args.out, args.export)
        size = sum(f.stat().st_size for f in files) / 2**20
        print(f"exported {len(files)} files ({size:.1f} MiB) to {args.export}")
    return 0
