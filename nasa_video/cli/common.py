"""What several commands share. Nothing here imports torch: the guidance methods' names are read from
guidance.METHODS (which does) only when argparse checks a value or formats help."""
from __future__ import annotations

from ..errors import UserError


class MethodChoices:
    """argparse choices: the names in guidance.METHODS (only those acting inside attention if asked), sorted."""

    def __init__(self, in_attention_only: bool = False):
        self.in_attention_only = in_attention_only

    def names(self) -> list[str]:
        from ..guidance import METHODS

        return sorted(name for name, cls in METHODS.items() if cls.in_attention or not self.in_attention_only)

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
