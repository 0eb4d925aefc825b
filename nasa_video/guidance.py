"""Negative guidance as small, pure pieces.

Attention-space methods (NASA, NAG, VSF) receive, in every cross-attention layer,
the query of the video tokens and the cached text K/V of the positive prompt and of each negative prompt,
and return the attention output before the layer's output projection. Output-space methods (CFG) act on
the model's prediction instead: the block loop gives each video `conditions` rows of the same forward and cache,
and the method's combine() mixes their predictions. A forward over several videos plans each method's rows with
their own alphas (Guidance.prepare_rows, RowsGuidance).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

from .errors import UserError
from .lazy import LazyModule

# The method registry, ranges and checks load without torch (the CLI checks a method and its scale first). The
# modules come in on first use, or as soon as the attention module is imported (load_modules): every path that
# runs a forward imports it first, so nothing is imported inside a torch.compile'd region.
torch = LazyModule("torch", globals())
attention = LazyModule("nasa_video.attention", globals())


def load_modules() -> None:
    """Put torch and the attention kernels in place of their lazy stand-ins."""
    import importlib

    globals()["torch"] = importlib.import_module("torch")
    globals()["attention"] = importlib.import_module("nasa_video.attention")


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

    def stacked(self, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of prompts first.. on the batch axis, prompt-major: [(P - first) * B, L, H, D]. A view (no copy)
        when B == 1; attention kernels read the strided heads directly."""
        def stack(t):
            b, length = t.shape[:2]
            return t.unflatten(2, (-1, self.heads))[:, :, first:].permute(2, 0, 1, 3, 4).reshape(-1, length, self.heads,
                                                                                               t.shape[-1])
        return stack(self.k), stack(self.v)


def merge_text_kv(positive: tuple[torch.Tensor, torch.Tensor], negatives: list[tuple[torch.Tensor, torch.Tensor]],
                  heads: int, lengths: tuple[int, ...] | None = None) -> TextKV:
    """One layer's TextKV: the positive's (K, V) and each negative's side by side as extra heads."""
    k = torch.cat([positive[0]] + [neg[0] for neg in negatives], dim=2)
    v = torch.cat([positive[1]] + [neg[1] for neg in negatives], dim=2)
    return TextKV(k, v, heads, tuple(lengths) if lengths and negatives else None)


def attend_all_prompts(q: torch.Tensor, kv: TextKV) -> torch.Tensor:
    """Z for every cached prompt in one attention call: the prompts ride on the batch axis and the query is
    shared, not copied (attention.attend_prompts).

    q [B, S, H, D] -> [B, S, P, H, D] with P = 1 + number of negatives (index 0 is the positive).
    """
    k, v = kv.stacked()
    z = attention.attend_prompts(q, k, v)  # [P*B, S, H, D], prompt-major
    return z.unflatten(0, (kv.num_prompts, q.shape[0])).permute(1, 2, 0, 3, 4)


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
    return attention.attend(q, keys, values, logit_bias.view(1, 1, 1, -1))


# ---- attention plans: what a method needs of (text K/V, alphas), built once per change -------------------
class AttentionPlan:
    """A method's prepared text K/V for one layer: call it with the query q [B, S, H, D] -> Z [B, S, H, D].
    Plans hold tensors only (and the method's fixed knobs), so a compiled block reads them without guarding on
    an alpha value: a new alpha is a new plan with new tensors, not a recompile."""

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ReferencePlan(AttentionPlan):
    """A method that only defines cross_attention(q, kv, alphas): called as is."""

    def __init__(self, method: "Guidance", kv: TextKV, alphas: tuple[float, ...]):
        self.method, self.kv, self.alphas = method, kv, alphas

    def __call__(self, q):
        return self.method.cross_attention(q, self.kv, self.alphas)


class PlainPlan(AttentionPlan):
    """Attention on one prompt (the positive); no guidance."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def __call__(self, q):
        return attention.attend(q, self.k, self.v)


class NASAPlan(AttentionPlan):
    """Z = sum_p softmax(Q K_p^T / sqrt(d)) (w_p V_p) with w = [1, -alpha_1, ...]: the alphas live in the scaled V
    (built here, once per change), all prompts attend in one launch with the query shared (stride 0 when B == 1),
    and the combine is one sum over the prompt axis. alphas: one tuple for every row, or one tuple per row (a batch
    of videos, each with its own; a row with fewer negatives is padded with alpha 0). A negative whose alpha is 0
    in every row is left out."""

    def __init__(self, kv: TextKV, alphas: Sequence[float] | Sequence[Sequence[float]]):
        k, v = kv.stacked()
        batch, negatives = kv.k.shape[0], kv.num_prompts - 1
        per_row = [tuple(row) for row in alphas] if alphas and isinstance(alphas[0], (tuple, list)) else \
            [tuple(alphas)] * batch
        per_row = [row + (0.0,) * (negatives - len(row)) for row in per_row]
        keep = [0] + [p + 1 for p in range(negatives) if any(row[p] != 0.0 for row in per_row)]
        if len(keep) < kv.num_prompts:
            index = torch.tensor([p * batch + b for p in keep for b in range(batch)], device=k.device)
            k, v = k.index_select(0, index), v.index_select(0, index)
        dtype = v.dtype if v.dtype == torch.float64 else torch.float32
        weights = torch.tensor([[1.0] * batch] + [[-float(row[p - 1]) for row in per_row] for p in keep[1:]],
                               dtype=dtype, device=v.device)
        self.prompts = len(keep)
        self.k = k
        self.v = (v.unflatten(0, (self.prompts, batch)) * weights.view(self.prompts, batch, 1, 1, 1)).to(
            v.dtype).flatten(0, 1)

    def __call__(self, q):
        z = attention.attend_prompts(q, self.k, self.v)
        return z.unflatten(0, (self.prompts, q.shape[0])).sum(0)


class NAGPlan(AttentionPlan):
    """NAG with Z+ and Z- from one launch; the scale s is a tensor (no recompile per value): one number, or one per
    row [B] (a batch of videos; a row that does not guide has s = 1, which leaves Z+). tau and blend are the
    method's fixed knobs. The formula is nag()'s."""

    def __init__(self, kv: TextKV, scale: float | Sequence[float], tau: float, blend: float):
        self.k, self.v = (t[: 2 * kv.k.shape[0]] for t in kv.stacked())
        dtype = kv.v.dtype if kv.v.dtype == torch.float64 else torch.float32
        self.scale = torch.tensor(scale, dtype=dtype, device=kv.v.device)
        if self.scale.dim():
            self.scale = self.scale.view(-1, 1, 1, 1)
        self.tau, self.blend = tau, blend

    def __call__(self, q):
        z = attention.attend_prompts(q, self.k, self.v).unflatten(0, (2, q.shape[0]))
        return nag(z[0], z[1], self.scale, self.tau, self.blend).to(q.dtype)  # a per-row scale is float32


class VSFPlan(AttentionPlan):
    """VSF with [K+; K-], [V+; -s V-] and the negative columns' logit bias concatenated once per change (vsf()
    builds them on every call)."""

    def __init__(self, kv: TextKV, scale: float, bias: float):
        (k_pos, v_pos), (k_neg, v_neg) = kv.positive(), kv.prompt(1)
        if kv.negative_lengths is not None:
            k_neg, v_neg = k_neg[:, :kv.negative_lengths[0]], v_neg[:, :kv.negative_lengths[0]]
        self.k, self.v = torch.cat([k_pos, k_neg], 1), torch.cat([v_pos, -scale * v_neg], 1)
        logit_bias = torch.zeros(self.k.shape[1], dtype=kv.k.dtype, device=kv.k.device)
        logit_bias[k_pos.shape[1]:] = bias
        self.bias = logit_bias.view(1, 1, 1, -1)

    def __call__(self, q):
        return attention.attend(q, self.k, self.v, self.bias)


class VSFRowsPlan(AttentionPlan):
    """VSF for a batch of videos, each with its own scale and negative length: [K+; K-] and [V+; -s_b V-] with the
    negative columns' logit bias per row, -inf past a row's real negative length (and over all of them for a row
    that does not guide), so each row is the softmax it has alone."""

    def __init__(self, kv: TextKV, scales: Sequence[float], lengths: Sequence[int], bias: float):
        (k_pos, v_pos), (k_neg, v_neg) = kv.positive(), kv.prompt(1)
        longest = max(lengths) if lengths else 0
        k_neg, v_neg = k_neg[:, :longest], v_neg[:, :longest]
        dtype = v_neg.dtype if v_neg.dtype == torch.float64 else torch.float32
        s = torch.tensor(scales, dtype=dtype, device=v_neg.device).view(-1, 1, 1, 1)
        self.k, self.v = torch.cat([k_pos, k_neg], 1), torch.cat([v_pos, (-s * v_neg).to(v_neg.dtype)], 1)
        logit_bias = torch.zeros(len(scales), self.k.shape[1], dtype=kv.k.dtype, device=kv.k.device)
        first = k_pos.shape[1]
        for b, (scale, length) in enumerate(zip(scales, lengths)):
            logit_bias[b, first:] = -float("inf")
            if scale != 0.0:
                logit_bias[b, first:first + length] = bias
        self.bias = logit_bias.view(len(scales), 1, 1, -1)

    def __call__(self, q):
        return attention.attend(q, self.k, self.v, self.bias)


class RowsPlan(AttentionPlan):
    """One plan per row (each row's video prepared alone, as it would run alone), their outputs stacked."""

    def __init__(self, plans: Sequence[AttentionPlan]):
        self.plans = list(plans)

    def __call__(self, q):
        return torch.cat([plan(q[b:b + 1]) for b, plan in enumerate(self.plans)])


class GroupedPlan(AttentionPlan):
    """Rows guided by different methods in one forward: each method's plan runs on its own rows."""

    def __init__(self, groups: Sequence[tuple[Sequence[int], AttentionPlan]], device):
        # the row indices are tensors made here, once: a compiled block reads them, it does not build them
        self.groups = [(torch.tensor(list(rows), device=device), plan) for rows, plan in groups]

    def __call__(self, q):
        out = None
        for index, plan in self.groups:
            z = plan(q.index_select(0, index))
            if out is None:
                out = z.new_empty((q.shape[0], *z.shape[1:]))
            out.index_copy_(0, index, z.to(out.dtype))
        return out


class RowsText:
    """One layer's text K/V for a forward over several rows (videos, or CFG's conditions): each row's own TextKV
    (batch 1, its own prompts), and, built when a method asks for it, all of them zero-padded to one prompt count
    and stacked on the batch axis (padding prompts have zero K/V; a method gives them alpha 0)."""

    def __init__(self, rows: Sequence[TextKV]):
        self.rows = list(rows)
        self._merged: TextKV | None = None

    def uniform(self) -> bool:
        """Every row has the same prompts layout (count and real negative lengths)."""
        first = self.rows[0]
        return all(r.num_prompts == first.num_prompts and r.negative_lengths == first.negative_lengths
                   for r in self.rows)

    def merged(self) -> TextKV:
        if self._merged is not None:
            return self._merged
        if len(self.rows) == 1:
            self._merged = self.rows[0]
            return self._merged
        lengths = {r.k.shape[1] for r in self.rows}
        if len(lengths) > 1:
            raise UserError(f"the streams' prompt embeddings have different lengths {sorted(lengths)}: give every "
                            f"stream embeddings of one length (the text encoder's max_length)")
        heads = self.rows[0].heads
        prompts = max(r.num_prompts for r in self.rows)

        def pad(t: torch.Tensor) -> torch.Tensor:
            missing = prompts * heads - t.shape[2]
            return t if missing == 0 else torch.cat([t, t.new_zeros(*t.shape[:2], missing, t.shape[3])], 2)

        lengths_ = self.rows[0].negative_lengths if self.uniform() else None
        self._merged = TextKV(torch.cat([pad(r.k) for r in self.rows]), torch.cat([pad(r.v) for r in self.rows]),
                              heads, lengths_)
        return self._merged


class Guidance:
    """Base of every method. in_attention: acts inside cross-attention (one pass per step) or on outputs.

    The block loop (engine.BlockEngine) gives each video `conditions` rows of one forward. A method with one
    condition (NASA, NAG, VSF, none) is guided inside every cross-attention: prepare_rows() builds its plan for
    all its rows at once, each row with its video's alphas. A method with two (CFG) gets a conditional row (the
    video's prompt) and an unconditional row (its negative, or the empty prompt), both plain attention, each
    with its own self-attention cache rows, and combine() turns their predictions into the video's (diffusers'
    guiders call this num_conditions)."""

    name = "base"
    in_attention = True
    scale_range = (0.0, 0.0)
    max_negatives: int | None = None
    # The scale it guides at: `nasa-video bench` runs it there, and a video asking for this method without a scale
    # gets it (the model config's guidance.scale belongs to the config's own method).
    bench_scale = 0.0
    setting_ranges: dict[str, tuple[float, float]] = {}  # each setting's usable interval, inclusive, beside its default
    conditions = 1  # rows per video in the forward (see the class docstring)

    def combine(self, predictions: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
        """The video's prediction from its `conditions` rows' predictions (one condition: the row's own)."""
        return predictions[0]

    def prepare_rows(self, text: RowsText, alphas: Sequence[Sequence[float]]) -> "AttentionPlan":
        """The plan for several rows, row b with its own text K/V (text.rows[b]) and alphas[b]: a method's one fused
        plan for all of them where it has one (plan_rows; NASA, NAG, VSF), plain attention when no row guides;
        otherwise one plan over the stacked rows when they share their alphas and prompt layout, else each row's
        own plan (what that video alone computes)."""
        if len(text.rows) == 1:
            return self.prepare(text.rows[0], alphas[0])
        if type(self).plan_rows is not Guidance.plan_rows:
            kv = text.merged()
            if kv.num_prompts == 1 or not any(self.guides(a) for a in alphas):
                return PlainPlan(*kv.positive())
            return self.plan_rows(kv, text, alphas)
        if len(set(map(tuple, alphas))) == 1 and text.uniform():
            return self.prepare(text.merged(), alphas[0])
        return RowsPlan([self.prepare(kv, a) for kv, a in zip(text.rows, alphas)])

    def plan_rows(self, kv: TextKV, text: RowsText, alphas: Sequence[Sequence[float]]) -> "AttentionPlan":
        """A method's fused plan for several rows that guide (kv: text.merged(), the rows stacked and padded)."""
        raise NotImplementedError

    def cross_attention(self, q: torch.Tensor, kv: TextKV, alphas: Sequence[float]) -> torch.Tensor:
        """The guided attention output [B, S, H, D] of query q [B, S, H, D]. A method defines this, or prepare()
        (the built-in ones define prepare: their fused plan; this then runs it)."""
        if type(self).prepare is Guidance.prepare:
            raise NotImplementedError(f"{type(self).__name__} defines neither cross_attention nor prepare")
        return self.prepare(kv, alphas)(q)

    def prepare(self, kv: TextKV, alphas: Sequence[float]) -> "AttentionPlan":
        """What the attention needs of (text K/V, alphas), computed once per video and per change (a processor
        keeps it until its text or setting changes), as a callable q -> Z. The default calls cross_attention
        with the alphas as Python floats: right, but a compiled block then recompiles for each new alpha
        value; the built-in methods fold them into tensors instead."""
        return ReferencePlan(self, kv, tuple(alphas))

    @classmethod
    def settings(cls) -> dict[str, object]:
        """The method's own knobs and their defaults (its __init__'s keyword parameters), which the config's
        guidance.settings and the CLI's --guidance-setting set."""
        if cls.__init__ is object.__init__:
            return {}
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def scale_at(self, scale: float, sigma: float) -> float:
        """The scale actually used at noise level sigma (NAG switches off below sigma_end)."""
        return scale

    def guides(self, alphas: Sequence[float]) -> bool:
        """Whether these alphas change the attention at all (False: plain attention on the positive, so a host
        such as a diffusers pipeline may run its own processor instead)."""
        return any(a != 0.0 for a in alphas)

    def check_negatives(self, count: int) -> None:
        if self.max_negatives is not None and count > self.max_negatives:
            raise UserError(f"{self.name} takes at most {self.max_negatives} negative prompt; "
                            f"use --guidance nasa for several weighted negatives")

    def check_scale(self, value: float) -> None:
        lo, hi = self.scale_range
        if not lo <= value <= hi:
            raise UserError(f"--scale {value} is out of range for {self.name}: use a value in [{lo}, {hi}]")

    def check_weights(self, weights: Sequence[float], scales: Sequence[float]) -> None:
        """Weights of the negatives, each finite and >= 0; with each scale, every term scale x w_i and their sum
        stay in the scale's range (four copies of one negative at the top scale would subtract four times it)."""
        lo, hi = self.scale_range
        for weight in weights:
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
                raise UserError(f"--negative-weight {weight} is not a usable weight: use a finite number >= 0")
        total = sum(weights)
        for scale in scales:
            for weight in weights:
                if not lo <= scale * weight <= hi:
                    raise UserError(f"--negative-weight {weight} with --scale {scale} gives {scale * weight:g}, out "
                                    f"of range for {self.name}: keep scale x weight in [{lo}, {hi}]")
            if len(weights) > 1 and not scale * total <= hi:
                raise UserError(f"{len(weights)} negatives of total weight {total:g} at --scale {scale} subtract "
                                f"{scale * total:g} in all, out of range for {self.name}: keep scale x (sum of "
                                f"weights) <= {hi} (lower --scale or the weights)")

    @classmethod
    def check_settings(cls, settings: dict) -> None:
        """Each setting a finite number inside its declared range (one line naming it otherwise)."""
        for key, value in settings.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{cls.name} setting {key}={value!r} is not a finite number")
            lo, hi = cls.setting_ranges.get(key, (-math.inf, math.inf))
            if not lo <= value <= hi:
                raise UserError(f"{cls.name} setting {key}={value:g} is out of range: use a value in [{lo:g}, {hi:g}]")


class NoGuidance(Guidance):
    """Plain cross-attention on the positive prompt; negatives are ignored."""

    name = "none"
    scale_range = (-float("inf"), float("inf"))
    bench_scale = 0.0

    def prepare(self, kv, alphas):
        return PlainPlan(*kv.positive())

    def guides(self, alphas):
        return False


class NASA(Guidance):
    """Negative-Away Steer Attention, fused: each negative's V is scaled by -alpha_i once per video and per
    change of alpha (NASAPlan), so Z+ and every Z- come from one attention launch and the combine is a sum over
    the prompt axis. The reference formula is nasa() above; they agree to rounding."""

    name = "nasa"
    scale_range = (0.0, 3.0)  # the paper's sweep goes to 1.5 and quality falls past ~1; 3 leaves room to explore
    bench_scale = 0.5

    def prepare(self, kv, alphas):
        if kv.num_prompts == 1 or not self.guides(alphas):
            return PlainPlan(*kv.positive())
        return NASAPlan(kv, alphas)

    def plan_rows(self, kv, text, alphas):
        return NASAPlan(kv, [tuple(a) for a in alphas])


class NAG(Guidance):
    """Normalized Attention Guidance; scale is nag_scale s (guidance only when s > 1)."""

    name = "nag"
    scale_range = (1.0, 20.0)
    max_negatives = 1
    bench_scale = 5.0  # NAG guides only for nag_scale > 1
    # tau: the clip on ||Zt|| / ||Z+|| (a clip below 1 shrinks even the positive); blend: a convex mix; sigma_end: a
    # noise level
    setting_ranges = {"tau": (1.0, 20.0), "blend": (0.0, 1.0), "sigma_end": (0.0, 1.0)}

    def __init__(self, tau: float = 2.5, blend: float = 0.25, sigma_end: float = 0.0):
        self.tau, self.blend, self.sigma_end = tau, blend, sigma_end

    def scale_at(self, scale, sigma):
        return scale if sigma >= self.sigma_end else 1.0

    def guides(self, alphas):
        return bool(alphas) and alphas[0] > 1.0

    def prepare(self, kv, alphas):
        if kv.num_prompts == 1 or not self.guides(alphas):
            return PlainPlan(*kv.positive())
        return NAGPlan(kv, alphas[0], self.tau, self.blend)

    def plan_rows(self, kv, text, alphas):
        return NAGPlan(kv, [a[0] if self.guides(a) else 1.0 for a in alphas], self.tau, self.blend)


class VSF(Guidance):
    """Value Sign Flip; scale is s in [V+; -s V-]; the negative's padding tokens are dropped."""

    name = "vsf"
    scale_range = (0.0, 5.0)
    max_negatives = 1
    bench_scale = 1.0

    setting_ranges = {"bias": (-10.0, 10.0)}  # a logit offset: past +-10 the negative columns own or lose the softmax

    def __init__(self, bias: float = -0.1):
        self.bias = bias

    def prepare(self, kv, alphas):
        if kv.num_prompts == 1 or not self.guides(alphas):
            return PlainPlan(*kv.positive())
        return VSFPlan(kv, alphas[0], self.bias)

    def plan_rows(self, kv, text, alphas):
        length = kv.k.shape[1]
        lengths = [0 if row.num_prompts == 1 else row.negative_lengths[0] if row.negative_lengths else length
                   for row in text.rows]
        return VSFRowsPlan(kv, [a[0] if self.guides(a) else 0.0 for a in alphas], lengths, self.bias)


class CFG(Guidance):
    """Classifier-free guidance with the negative prompt as the unconditional branch (empty prompt when none):
    v = v(y-) + w (v(y+) - v(y-)). Two rows per video (conditional, unconditional) in each forward, each with its
    own self-attention cache rows."""

    name = "cfg"
    in_attention = False
    conditions = 2
    scale_range = (0.0, 20.0)
    max_negatives = 1
    bench_scale = 3.0

    def prepare(self, kv, alphas):
        return PlainPlan(*kv.positive())  # each CFG pass is plain attention on its own prompt

    def combine(self, predictions, scale):
        v_pos, v_neg = predictions
        return v_neg + scale * (v_pos - v_neg)


def _same_method(a: Guidance, b: Guidance) -> bool:
    """One plan may serve both: the same method with the same settings."""
    return a is b or (type(a) is type(b) and vars(a) == vars(b))


class RowsGuidance(Guidance):
    """The setting of a forward whose rows each have their own method (the videos of a batch): rows with the same
    method and settings share one plan (that method's prepare_rows), the groups run side by side (GroupedPlan).
    Not a method of its own (not registered)."""

    name = "rows"

    def __init__(self, methods: Sequence[Guidance]):
        self.methods = tuple(methods)
        self.groups: list[tuple[Guidance, list[int]]] = []
        for row, method in enumerate(self.methods):
            group = next((g for g in self.groups if _same_method(g[0], method)), None)
            if group is None:
                self.groups.append((method, [row]))
            else:
                group[1].append(row)

    def prepare(self, text: RowsText, alphas):
        if len(self.groups) == 1:
            return self.groups[0][0].prepare_rows(text, alphas)
        return GroupedPlan([(rows, method.prepare_rows(RowsText([text.rows[r] for r in rows]),
                                                       [alphas[r] for r in rows]))
                            for method, rows in self.groups], text.rows[0].k.device)


METHODS: dict[str, type[Guidance]] = {}


def register_method(cls: type[Guidance]) -> type[Guidance]:
    """Make a Guidance subclass known by its name to the CLI, the pipeline, the server and the benchmark."""
    METHODS[cls.name] = cls
    return cls


for _cls in (NoGuidance, NASA, NAG, VSF, CFG):
    register_method(_cls)


def make_guidance(name: str, **settings) -> Guidance:
    """A method by name; settings are its own knobs (NAG's tau, blend, sigma_end; VSF's bias), None = default."""
    if name not in METHODS:
        raise UserError(f"unknown guidance {name!r}; choose one of {', '.join(METHODS)}")
    cls = METHODS[name]
    known = cls.settings()
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise UserError(f"{name} has no setting {', '.join(unknown)}; its settings: {', '.join(known) or 'none'}")
    cls.check_settings(settings)
    return cls(**{k: v for k, v in settings.items() if v is not None})


def method_from_config(cfg, name: str | None = None, **settings) -> Guidance:
    """The guidance method a model config asks for (or `name`), with its own settings from the config's
    guidance.settings.<method> (NAG's tau, blend, sigma_end; VSF's bias), overridden by `settings`. Needs no
    generator: the CLI checks a method and its settings before anything heavy loads."""
    from .config import model_spec

    guidance = model_spec(cfg).guidance  # cfg: a model config or its ModelSpec
    name = str(guidance.method if name is None else name)
    configured = dict((guidance.settings or {}).get(name) or {})
    return make_guidance(name, **{**configured, **{k: v for k, v in settings.items() if v is not None}})


def default_scale(spec, guidance: Guidance) -> float:
    """The scale a video runs at when none is given: the config's guidance.scale belongs to the config's own
    method (spec: config.model_spec); any other method runs at its own bench_scale, one at which it guides."""
    return float(spec.guidance.scale) if guidance.name == spec.guidance.method else float(guidance.bench_scale)


ScaleSpec = Union[float, Sequence[float], Sequence[Sequence[float]], Callable[[int, int], float]]


class ScaleSchedule:
    """The guidance scale at (block, step): a constant, a list per block, a list of per-step lists per block,
    or a function (block, step) -> scale. Lists shorter than the video repeat their last entry."""

    def __init__(self, spec: ScaleSpec):
        self.spec = spec
        if not callable(spec):
            self.values()  # a malformed spec fails here, in one line, not inside a block

    def at(self, block: int, step: int, method: "Guidance") -> float:
        """The scale at (block, step), checked against the method's range (a function's values are known only
        now: NaN or out of range is one line, not a broken video)."""
        value = self(block, step)
        if not math.isfinite(value):
            raise UserError(f"the scale function gave {value} at block {block}, step {step}: return finite numbers")
        method.check_scale(value)
        return value

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

        def number(x) -> float:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise UserError(f"scale {x!r} is not a finite number: give a number, a list per block (of numbers "
                                f"or per-step lists) or a function (block, step) -> scale")
            return float(x)
        if isinstance(spec, (int, float, str, bytes)) or not isinstance(spec, Sequence):
            return [number(spec)]
        if len(spec) == 0:
            raise UserError("scale is an empty list: give one scale per block (the last repeats)")
        flat: list[float] = []
        for item in spec:
            if isinstance(item, Sequence) and not isinstance(item, (str, bytes)):
                if len(item) == 0:
                    raise UserError("a block's scale list is empty: give one scale per step (the last repeats)")
                flat.extend(number(x) for x in item)
            else:
                flat.append(number(item))
        return flat


Negatives = list[tuple[str, float]]


def real_length(embeds: torch.Tensor) -> int:
    """Tokens of prompt embeddings [B, L, C] before their padding, the most over the batch: Wan's text encoders
    (umT5 here, diffusers' and ComfyUI's) zero the padding rows."""
    nonzero = embeds.detach().abs().sum(-1).gt(0).any(0)
    return int(nonzero.nonzero().max()) + 1 if nonzero.any() else 0


def parse_negatives(negative) -> Negatives:
    """None | "text" | ["a", "b"] | [("a", 1.0), ("b", 0.5)] | {"a": 1.0} -> [(prompt, weight), ...]."""
    if negative is None:
        return []
    if isinstance(negative, str):
        return [(negative, 1.0)] if negative.strip() else []
    if isinstance(negative, dict):
        negative = list(negative.items())
    if not isinstance(negative, (list, tuple)):
        raise UserError(f"negative {negative!r}: give text, a list of texts, (text, weight) pairs or a dict")
    out: Negatives = []
    for item in negative:
        if isinstance(item, str):
            out.append((item, 1.0))
            continue
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)):
            raise UserError(f"negative {item!r}: each negative is text or a (text, weight) pair")
        out.append((item[0], float(item[1])))
    return [(t, w) for t, w in out if t.strip()]
