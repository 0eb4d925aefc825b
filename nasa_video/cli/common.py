"""What several commands share. Nothing here imports torch: the guidance methods' names are read from
guidance.METHODS (which does) only when argparse checks a value or formats help."""
from __future__ import annotations

from ..errors import UserError


# The built-in methods, so `--help` and a bad flag need not import torch (guidance.py does); a test holds this
# equal to guidance.METHODS' own built-ins. Once guidance is imported (a method registered from a plugin or a test),
# the registry itself answers.
BUILTIN_METHODS = {"none": True, "nasa": True, "nag": True, "vsf": True, "cfg": False}  # name: acts in attention


class MethodChoices:
    """argparse choices: the names in guidance.METHODS (only those acting inside attention if asked), sorted."""

    def __init__(self, in_attention_only: bool = False):
        self.in_attention_only = in_attention_only

    def names(self) -> list[str]:
        import sys

        guidance = sys.modules.get("nasa_video.guidance")
        methods = BUILTIN_METHODS if guidance is None else {n: c.in_attention for n, c in guidance.METHODS.items()}
        return sorted(name for name, in_attention in methods.items() if in_attention or not self.in_attention_only)

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name) -> bool:
        return name in self.names()


def method_argument(parser, *flags, in_attention_only: bool = False, **kwargs):
    """An argument whose values are guidance method names. argparse formats an argument once when it is added
    (which would read the choices); a placeholder metavar serves then and is removed, so help and usage list
    the names as for any choices."""
    action = parser.add_argument(*flags, choices=MethodChoices(in_attention_only), metavar="METHOD", **kwargs)
    action.metavar = None
    return action


def all_methods() -> list[str]:
    """Every method, in the registry's order."""
    from ..guidance import METHODS

    return list(METHODS)


def scales_for(items: list[str]) -> dict[str, list[float]]:
    """--scales-for METHOD=S1,S2 (repeatable) -> {method: [scales]}."""
    per_method = {}
    for item in items:
        name, _, values = item.partition("=")
        try:
            per_method[name] = [float(v) for v in values.split(",") if v]
        except ValueError:
            raise UserError(f"--scales-for {item!r}: use METHOD=S1,S2 with numbers") from None
    return per_method


def method_scales(args) -> list[tuple[str, float]]:
    """--methods with --scales, or per method --scales-for: (method, scale) pairs, each scale range-checked."""
    from ..eval.jobs import method_scales as pairs

    return pairs(args.methods, args.scales, scales_for(args.scales_for))


# ---- argument parsing that fails in one line, before anything heavy is imported ------------------------------
import argparse  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402


class Parser(argparse.ArgumentParser):
    """argparse, with every error as one line (`nasa-video: error: ...`, exit 2) naming where to look."""

    def error(self, message: str):
        command = self.prog.replace("nasa-video", "").strip()
        hint = f"; see `nasa-video {command} --help`" if command else "; see `nasa-video --help`"
        self.exit(2, f"nasa-video: error: {message}{hint}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default once, and only where there is one to say (not None, False or an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == [] \
            or action.default is argparse.SUPPRESS
        if "default" in text or nothing or action.required:
            return text
        return super()._get_help_string(action)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def finite(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def weight(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} is not a usable weight: use a finite number >= 0")
    return value


def probability(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text} is not a probability: use a number in [0, 1]")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def seed(text: str) -> int:
    from ..config import SEED_LIMIT

    value = _whole(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{text} is out of range: use a whole number in [0, 2^63)")
    return value


def positive_int(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def count(text: str) -> int:
    """A whole number >= 0 (--min-replicas: autoscaling may go to zero)."""
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def gpus(text: str) -> float:
    """GPUs per replica: 0 (a CPU replica) to 64, fractions allowed (replicas sharing a GPU)."""
    value = _number(text)
    if not 0 <= value <= 64:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected 0 to 64 GPUs per replica, got {value:g}")
    return value


def port(text: str) -> int:
    if not (text.strip().isdigit() and 1 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"--port {text} is not a port: use 1-65535")
    return int(text)


def nonempty(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty: give some text")
    return value


def prompt_at(text: str) -> tuple[int, str]:
    """BLOCK:TEXT for --prompt-at: a block >= 1 and some text."""
    block, sep, prompt = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: use BLOCK:TEXT, e.g. 3:a boat at sea")
    try:
        number = int(block)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{block!r} is not a block number: use BLOCK:TEXT with a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"block {number}: use a block >= 1 (block 0 is --prompt)")
    if not prompt.strip():
        raise argparse.ArgumentTypeError(f"block {number} has no text: use BLOCK:TEXT")
    return number, prompt


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def device(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device nasa-video runs on: use auto, cpu, cuda or cuda:N")
    return text


def dtype(text: str) -> str:
    if text not in ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"):
        raise argparse.ArgumentTypeError(f"unknown --dtype {text!r}: use auto, fp32, bf16 or fp16")
    return text


def attention(text: str) -> str:
    if text not in ("auto", "sdpa", "flash2", "flash3"):
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, sdpa, flash2 or flash3")
    return text


def setting(text: str) -> tuple[str, float]:
    """--guidance-setting KEY=VALUE: a method's own knob (tau=2.5, blend=0.25, sigma_end=0.2, bias=-0.1)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: use KEY=VALUE, e.g. tau=2.5")
    return key, finite(value)


def json_path(text: str) -> str:
    """An output .json whose folder exists and is writable: checked before the work that would fill it."""
    import os
    from pathlib import Path

    path = Path(text)
    if path.suffix.lower() != ".json":
        raise argparse.ArgumentTypeError(f"{text} must end in .json")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {text}: not writable")
    return text
