"""Negative guidance as small, pure pieces.

Attention-space methods (NASA, NAG, VSF) receive, in every cross-attention layer,
the query of the video tokens and the cached text K/V of the positive prompt and of each negative prompt,
and return the attention output before the layer's output projection. Output-space methods (CFG) act on
the model's prediction instead and ask the pipeline for a second pass with its own self-attention cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from .attention import attend
from .errors import UserError


@dataclass
class TextKV:
    """One layer's text cache. Heads are prompt-major: [positive heads | negative 1 heads | ...]."""

    k: torch.Tensor  # [B, L, H * (1 + N), D], norm_k already applied
    v: torch.Tensor  # [B, L, H * (1 + N), D]
    heads: int
    negative_lengths: tuple[int, ...] | None = None  # real (unpadded) token count of each negative

    @property
    def num_prompts(self) -> int:
        return self.k.shape[2] // self.heads

    def positive(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, : self.heads], self.v[:, :, : self.heads]

    def prompt(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = slice(index * self.heads, (index + 1) * self.heads)
        return self.k[:, :, h], self.v[:, :, h]


def merge_text_kv(positive: tuple[torch.Tensor, torch.Tensor], negatives: list[tuple[torch.Tensor, torch.Tensor]],
                  heads: int, lengths: tuple[int, ...] | None = None) -> TextKV:
    """One layer's TextKV: the positive's (K, V) and each negative's side by side as extra heads."""
    k = torch.cat([positive[0]] + [neg[0] for neg in negatives], dim=2)
    v = torch.cat([positive[1]] + [neg[1] for neg in negatives], dim=2)
    return TextKV(k, v, heads, tuple(lengths) if lengths and negatives else None)


def attend_all_prompts(q: torch.Tensor, kv: TextKV) -> torch.Tensor:
    """Z for every cached prompt in one attention call: the prompts ride as extra heads.

    q [B, S, H, D] -> [B, S, P, H, D] with P = 1 + number of negatives (index 0 is the positive).
    """
    prompts = kv.num_prompts
    z = attend(q.repeat(1, 1, prompts, 1), kv.k, kv.v)
    return z.unflatten(2, (prompts, kv.heads))


def nasa(z_pos: torch.Tensor, z_neg: torch.Tensor, alphas: Sequence[float]) -> torch.Tensor:
    """NASA, arXiv 2412.02687: Z = Z+ - sum_i alpha_i Z-_i. No normalisation, clamp or blend.

    z_pos [B, S, H, D]; z_neg [B, S, N, H, D]; alphas: N floats.
    """
    out = z_pos
    for i, alpha in enumerate(alphas):
        if alpha != 0.0:
            out = out - alpha * z_neg[:, :, i]
    return out


def nag(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float, tau: float, blend: float) -> torch.Tensor:
    """NAG, arXiv 2505.21179, in the public code's convention nag_scale s = phi + 1:
    Zt = s Z+ - (s - 1) Z-; r = ||Zt||_1 / ||Z+||_1 per token over all heads; Zh = Zt min(r, tau) / r;
    Z = blend Zh + (1 - blend) Z+.  z_pos, z_neg [B, S, H, D]."""
    z_t = scale * z_pos - (scale - 1) * z_neg
    norm_pos = z_pos.flatten(2).abs().sum(-1)[..., None, None]
    norm_t = z_t.flatten(2).abs().sum(-1)[..., None, None]
    ratio = norm_t / norm_pos.clamp_min(1e-12)
    z_h = z_t * torch.minimum(ratio, torch.full_like(ratio, tau)) / ratio.clamp_min(1e-12)
    return blend * z_h + (1 - blend) * z_pos


def vsf(q, k_pos, v_pos, k_neg, v_neg, scale: float, bias: float) -> torch.Tensor:
    """VSF, arXiv 2508.10931: one softmax over [K+; K-] with values [V+; -scale V-] and `bias` added to the
    negative columns' logits (keys are not flipped). Pass k_neg / v_neg without their padding."""
    keys, values = torch.cat([k_pos, k_neg], 1), torch.cat([v_pos, -scale * v_neg], 1)
    logit_bias = torch.zeros(keys.shape[1], dtype=q.dtype, device=q.device)
    logit_bias[k_pos.shape[1]:] = bias
    return attend(q, keys, values, logit_bias.view(1, 1, 1, -1))


class Guidance:
    """Base of every method. in_attention: acts inside cross-attention (one pass per step) or on outputs
    (CFG: the pipeline runs a second pass with its own self-attention cache and calls combine())."""

    name = "base"
    in_attention = True
    scale_range = (0.0, 0.0)
    max_negatives: int | None = None
    bench_scale = 0.0  # the scale `nasa-video bench` runs it at: one at which the method guides

    def cross_attention(self, q: torch.Tensor, kv: TextKV, alphas: Sequence[float]) -> torch.Tensor:
        raise NotImplementedError

    def scale_at(self, scale: float, sigma: float) -> float:
        """The scale actually used at noise level sigma (NAG switches off below sigma_end)."""
        return scale

    def check_negatives(self, count: int) -> None:
        if self.max_negatives is not None and count > self.max_negatives:
            raise UserError(f"{self.name} takes at most {self.max_negatives} negative prompt; "
                            f"use --guidance nasa for several weighted negatives")

    def check_scale(self, value: float) -> None:
        lo, hi = self.scale_range
        if not lo <= value <= hi:
            raise UserError(f"--scale {value} is out of range for {self.name}: use a value in [{lo}, {hi}]")


class NoGuidance(Guidance):
    """Plain cross-attention on the positive prompt; negatives are ignored."""

    name = "none"
    scale_range = (-float("inf"), float("inf"))
    bench_scale = 0.0

    def cross_attention(self, q, kv, alphas):
        return attend(q, *kv.positive())


class NASA(Guidance):
    """Negative-Away Steer Attention. Z+ and all Z- come from one fused attention call."""

    name = "nasa"
    scale_range = (0.0, 3.0)  # the paper's sweep goes to 1.5 and quality falls past ~1; 3 leaves room to explore
    bench_scale = 0.5

    def cross_attention(self, q, kv, alphas):
        if kv.num_prompts == 1 or not any(alphas):
            return attend(q, *kv.positive())
        z = attend_all_prompts(q, kv)
        return nasa(z[:, :, 0], z[:, :, 1:], alphas)


class NAG(Guidance):
    """Normalized Attention Guidance; scale is nag_scale s (guidance only when s > 1)."""

    name = "nag"
    scale_range = (1.0, 20.0)
    max_negatives = 1
    bench_scale = 5.0  # NAG guides only for nag_scale > 1

    def __init__(self, tau: float = 2.5, blend: float = 0.25, sigma_end: float = 0.0):
        self.tau, self.blend, self.sigma_end = tau, blend, sigma_end

    def scale_at(self, scale, sigma):
        return scale if sigma >= self.sigma_end else 1.0

    def cross_attention(self, q, kv, alphas):
        if kv.num_prompts == 1 or not alphas or alphas[0] <= 1.0:
            return attend(q, *kv.positive())
        z = attend_all_prompts(q, kv)
        return nag(z[:, :, 0], z[:, :, 1], alphas[0], self.tau, self.blend)


class VSF(Guidance):
    """Value Sign Flip; scale is s in [V+; -s V-]; the negative's padding tokens are dropped."""

    name = "vsf"
    scale_range = (0.0, 5.0)
    max_negatives = 1
    bench_scale = 1.0

    def __init__(self, bias: float = -0.1):
        self.bias = bias

    def cross_attention(self, q, kv, alphas):
        if kv.num_prompts == 1 or not alphas or alphas[0] == 0.0:
            return attend(q, *kv.positive())
        k_neg, v_neg = kv.prompt(1)
        if kv.negative_lengths is not None:
            k_neg, v_neg = k_neg[:, :kv.negative_lengths[0]], v_neg[:, :kv.negative_lengths[0]]
        return vsf(q, *kv.positive(), k_neg, v_neg, alphas[0], self.bias)


class CFG(Guidance):
    """Classifier-free guidance with the negative prompt as the unconditional branch (empty prompt when none):
    v = v(y-) + w (v(y+) - v(y-)). Two passes per step and a second self-attention cache."""

    name = "cfg"
    in_attention = False
    scale_range = (0.0, 20.0)
    max_negatives = 1
    bench_scale = 3.0

    def cross_attention(self, q, kv, alphas):
        return attend(q, *kv.positive())  # each CFG pass is plain attention on its own prompt

    @staticmethod
    def combine(v_pos: torch.Tensor, v_neg: torch.Tensor, scale: float) -> torch.Tensor:
        return v_neg + scale * (v_pos - v_neg)


METHODS: dict[str, type[Guidance]] = {"none": NoGuidance, "nasa": NASA, "nag": NAG, "vsf": VSF, "cfg": CFG}


def make_guidance(name: str) -> Guidance:
    if name not in METHODS:
        raise UserError(f"unknown guidance {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]()


ScaleSpec = Union[float, Sequence[float], Sequence[Sequence[float]], Callable[[int, int], float]]


class ScaleSchedule:
    """The guidance scale at (block, step): a constant, a list per block, a list of per-step lists per block,
    or a function (block, step) -> scale. Lists shorter than the video repeat their last entry."""

    def __init__(self, spec: ScaleSpec):
        self.spec = spec

    def __call__(self, block: int, step: int) -> float:
        spec = self.spec
        if callable(spec):
            return float(spec(block, step))
        if isinstance(spec, (int, float)):
            return float(spec)
        per_block = spec[min(block, len(spec) - 1)]
        if isinstance(per_block, (int, float)):
            return float(per_block)
        return float(per_block[min(step, len(per_block) - 1)])

    def values(self) -> list[float]:
        """Every literal value in the schedule (for range checks); empty for a function."""
        spec = self.spec
        if callable(spec):
            return []
        if isinstance(spec, (int, float)):
            return [float(spec)]
        flat: list[float] = []
        for item in spec:
            flat.extend([float(item)] if isinstance(item, (int, float)) else [float(x) for x in item])
        return flat


Negatives = list[tuple[str, float]]


def parse_negatives(negative) -> Negatives:
    """None | "text" | ["a", "b"] | [("a", 1.0), ("b", 0.5)] | {"a": 1.0} -> [(prompt, weight), ...]."""
    if negative is None:
        return []
    if isinstance(negative, str):
        return [(negative, 1.0)] if negative.strip() else []
    if isinstance(negative, dict):
        negative = list(negative.items())
    out: Negatives = []
    for item in negative:
        if isinstance(item, str):
            out.append((item, 1.0))
        else:
            text, weight = item
            out.append((str(text), float(weight)))
    return [(t, w) for t, w in out if t.strip()]
