"""NASA and its interface: the equation, the fused kernel, alpha = 0, several negatives, schedules."""
import math

import pytest
import torch

from .conftest import guided as guided_model

from nasa_video.errors import UserError
from nasa_video.attention import attend
from nasa_video.guidance import (NASA, Guidance, NoGuidance, ScaleSchedule, TextKV, attend_all_prompts,
                                 make_guidance, nasa, parse_negatives)

B, S, L, HEADS, D = 2, 20, 7, 3, 8


def naive_attention(q, k, v):
    """softmax(Q K^T / sqrt(d)) V written out, [B, S, H, D] layout."""
    scores = torch.einsum("bshd,blhd->bhsl", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhsl,blhd->bshd", scores.softmax(-1), v)


def random_qkv(prompts: int, negative_lengths=None, shape=(B, S, L, HEADS, D)):
    """q, per-prompt K and V lists, and the head-concatenated TextKV, float64, seed 0."""
    b, s, l_, heads, d = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, s, heads, d, generator=g, dtype=torch.float64)
    ks = [torch.randn(b, l_, heads, d, generator=g, dtype=torch.float64) for _ in range(prompts)]
    vs = [torch.randn(b, l_, heads, d, generator=g, dtype=torch.float64) for _ in range(prompts)]
    return q, ks, vs, TextKV(torch.cat(ks, 2), torch.cat(vs, 2), heads, negative_lengths)


def naive_nasa(q, ks, vs, alphas):
    """NASA's equation with every term evaluated (no skipped zero weights, no early return)."""
    return naive_attention(q, ks[0], vs[0]) - sum(a * naive_attention(q, k, v) for a, k, v in zip(alphas, ks[1:], vs[1:]))


class Formula(Guidance):
    """A guidance method evaluated through its formula on per-prompt attention, with none of the library
    classes' switch-off shortcuts: the reference the shortcuts (scale 0, s = 1) are checked against."""

    in_attention = True

    def __init__(self, like: Guidance, formula):
        self.name, self.scale_range, self.max_negatives = like.name, like.scale_range, like.max_negatives
        self.formula = formula

    def scale_at(self, scale, sigma):
        return scale

    def cross_attention(self, q, kv, alphas):
        z = [attend(q, *kv.prompt(i)) for i in range(kv.num_prompts)]
        return self.formula(z, alphas)


def nasa_formula():
    return Formula(NASA(), lambda z, alphas: z[0] - sum(a * zn for a, zn in zip(alphas, z[1:])))


@pytest.fixture
def qkv():
    return random_qkv(3)


def test_nasa_equals_naive_formula(qkv):
    q, ks, vs, kv = qkv
    alphas = [0.8, 0.3]
    expected = naive_nasa(q, ks, vs, alphas)
    torch.testing.assert_close(NASA().cross_attention(q, kv, alphas), expected)
    torch.testing.assert_close(nasa_formula().cross_attention(q, kv, alphas), expected)


def test_fused_call_equals_separate_calls(qkv):
    q, ks, vs, kv = qkv
    fused = attend_all_prompts(q, kv)
    for i in range(3):
        torch.testing.assert_close(fused[:, :, i], naive_attention(q, ks[i], vs[i]))


def test_alpha_zero_equals_no_guidance(qkv):
    """NASA's switch-off at alpha = 0 returns what its equation gives there, and what plain attention gives."""
    q, ks, vs, kv = qkv
    off = NASA().cross_attention(q, kv, [0.0, 0.0])
    torch.testing.assert_close(off, naive_nasa(q, ks, vs, [0.0, 0.0]))  # the equation, every term evaluated
    torch.testing.assert_close(off, naive_attention(q, ks[0], vs[0]))
    torch.testing.assert_close(off, NoGuidance().cross_attention(q, kv, [1, 1]))
    # one weight at zero, the other not: only the zero term drops out
    torch.testing.assert_close(NASA().cross_attention(q, kv, [0.0, 0.7]), naive_nasa(q, ks, vs, [0.0, 0.7]))


def test_nasa_function_is_linear_in_alpha(qkv):
    q, _, _, kv = qkv
    z = attend_all_prompts(q, kv)
    a1 = nasa(z[:, :, 0], z[:, :, 1:], [1.0, 0.0])
    a2 = nasa(z[:, :, 0], z[:, :, 1:], [2.0, 0.0])
    torch.testing.assert_close(a2 - a1, -z[:, :, 1])


def test_model_alpha_zero_equals_none(tiny_model, text_cache):
    """In the model, alpha = 0 equals the equation evaluated at 0 (every negative attended and weighted by 0,
    no shortcut), and plain attention exactly."""
    x, t = torch.randn(1, 4, 3, 8, 8), torch.full((1, 3), 700.0)
    with torch.no_grad():
        none = guided_model(tiny_model, text_cache, NoGuidance())(x, t)
        zero = guided_model(tiny_model, text_cache, NASA(), 0.0)(x, t)
        formula_zero = guided_model(tiny_model, text_cache, nasa_formula(), 0.0)(x, t)
        guided = guided_model(tiny_model, text_cache, NASA(), 1.0)(x, t)
        formula_guided = guided_model(tiny_model, text_cache, nasa_formula(), 1.0)(x, t)
    torch.testing.assert_close(zero, formula_zero, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zero, none, rtol=0, atol=0)
    torch.testing.assert_close(guided, formula_guided, rtol=1e-5, atol=1e-6)  # the reference is NASA's equation
    assert (guided - none).abs().max() > 1e-3


def test_scale_schedules():
    assert ScaleSchedule(0.5)(3, 2) == 0.5
    per_block = ScaleSchedule([0.1, 0.2])
    assert [per_block(b, 0) for b in range(4)] == [0.1, 0.2, 0.2, 0.2]
    per_step = ScaleSchedule([[1.0, 0.5], [0.0]])
    assert (per_step(0, 0), per_step(0, 1), per_step(0, 5), per_step(1, 0), per_step(9, 1)) == (1.0, 0.5, 0.5, 0.0, 0.0)
    assert ScaleSchedule(lambda b, s: b + s)(2, 1) == 3.0
    assert sorted(per_step.values()) == [0.0, 0.5, 1.0]


def test_scale_out_of_range_is_a_clear_error():
    with pytest.raises(UserError, match=r"out of range for nasa"):
        NASA().check_scale(7.0)
    with pytest.raises(UserError, match="unknown guidance"):
        make_guidance("magic")


def test_parse_negatives():
    assert parse_negatives(None) == []
    assert parse_negatives("red circle") == [("red circle", 1.0)]
    assert parse_negatives(["a", ("b", 0.5)]) == [("a", 1.0), ("b", 0.5)]
    assert parse_negatives({"a": 2}) == [("a", 2.0)]
    assert parse_negatives(["  "]) == []
