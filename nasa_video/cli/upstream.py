"""`nasa-video upstream causvid | self-forcing [options] -- [upstream's own arguments]`."""
from __future__ import annotations

from .common import finite, method_argument, nonempty


def register(sub) -> None:
    p = sub.add_parser("upstream", help="run upstream CausVid / Self-Forcing inference with a negative prompt",
                       description="Runs upstream's own inference script (its arguments after --) with the NASA "
                                   "hook on its pipeline. Example: nasa-video upstream causvid --negative 'blurry' "
                                   "--scale 0.5 -- --config_path configs/wan_causal_dmd.yaml --checkpoint_folder "
                                   "ckpt --output_folder out --prompt_file_path prompts.txt")
    p.add_argument("which", choices=["causvid", "self-forcing"])
    p.add_argument("--negative", action="append", default=[], type=nonempty, help="negative prompt; repeat for several")
    p.add_argument("--scale", type=finite, default=0.5, help="the guidance scale")
    method_argument(p, "--guidance", in_attention_only=True, default="nasa")  # the hook patches cross-attention
    p.add_argument("--repo", default=None, help="upstream checkout (default: third_party/... or $NASA_VIDEO_CAUSVID "
                                                "/ $NASA_VIDEO_SELF_FORCING)")
    p.set_defaults(func=upstream)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our arguments, upstream's): for `upstream`, everything after -- goes to upstream's own script."""
    if argv[:1] == ["upstream"] and "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def upstream(args) -> int:
    from ..integrations import run_upstream

    run_upstream(args.which, args.upstream_args, args.negative, args.scale, args.guidance, args.repo)
    return 0
