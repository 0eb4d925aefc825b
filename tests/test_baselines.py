"""NAG, VSF and CFG: each equals its naive formula, each switches off where it should, CFG runs two passes."""
import math

import pytest
import torch

from nasa_video.errors import UserError
from nasa_video.guidance import CFG, NAG, VSF, NoGuidance, nag, vsf

from .test_guidance import naive_attention, random_qkv

B, S, L, HEADS, D = 2, 10, 6, 3, 8


@pytest.fixture
def qkv():
    return random_qkv(2, (4,), (B, S, L, HEADS, D))


def test_nag_equals_naive_formula(qkv):
    q, ks, vs, kv = qkv
    s, tau, a = 5.0, 2.5, 0.25
    zp, zn = naive_attention(q, ks[0], vs[0]), naive_attention(q, ks[1], vs[1])
    zt = zp + (s - 1) * (zp - zn)  # phi = s - 1
    expected = torch.empty_like(zp)
    for b in range(B):
        for i in range(S):
            r = zt[b, i].abs().sum() / zp[b, i].abs().sum()
            expected[b, i] = a * zt[b, i] * min(r, tau) / r + (1 - a) * zp[b, i]
    torch.testing.assert_close(NAG(tau, a).cross_attention(q, kv, [s]), expected)
    torch.testing.assert_close(nag(zp, zn, s, tau, a), expected)


def test_nag_scale_one_and_below_sigma_end_is_none(qkv):
    """NAG's switch-off at s = 1 returns what its formula gives at s = 1 (Zt = Z+, r = 1: Z+), i.e. plain attention."""
    q, ks, vs, kv = qkv
    tau, a = 2.5, 0.25
    zp, zn = naive_attention(q, ks[0], vs[0]), naive_attention(q, ks[1], vs[1])
    off = NAG(tau, a).cross_attention(q, kv, [1.0])
    torch.testing.assert_close(off, nag(zp, zn, 1.0, tau, a))  # the formula, computed at s = 1
    torch.testing.assert_close(off, zp)
    torch.testing.assert_close(off, NoGuidance().cross_attention(q, kv, []))
    assert not torch.allclose(nag(zp, zn, 1.5, tau, a), zp)  # just above 1 it guides
    assert NAG(sigma_end=0.75).scale_at(11.0, 0.5) == 1.0 and NAG(sigma_end=0.75).scale_at(11.0, 0.8) == 11.0


def test_vsf_equals_naive_formula_without_negative_padding(qkv):
    q, ks, vs, kv = qkv
    s, bias, n = 1.5, -0.2, 4
    keys = torch.cat([ks[0], ks[1][:, :n]], 1)
    values = torch.cat([vs[0], -s * vs[1][:, :n]], 1)
    logits = torch.einsum("bshd,blhd->bhsl", q, keys) / math.sqrt(D)
    logits[..., L:] += bias
    expected = torch.einsum("bhsl,blhd->bshd", logits.softmax(-1), values)
    torch.testing.assert_close(VSF(bias).cross_attention(q, kv, [s]), expected)


def test_vsf_scale_zero_is_none(qkv):
    """VSF at scale 0 is switched off: plain attention on the positive (the naive softmax, not the same call).
    This is a switch, not the formula at 0: the negative keys would still take softmax mass there."""
    q, ks, vs, kv = qkv
    off = VSF().cross_attention(q, kv, [0.0])
    torch.testing.assert_close(off, naive_attention(q, ks[0], vs[0]))
    torch.testing.assert_close(off, NoGuidance().cross_attention(q, kv, []))
    n = kv.negative_lengths[0]
    formula_at_zero = vsf(q, ks[0], vs[0], ks[1][:, :n], vs[1][:, :n], 0.0, VSF().bias)
    assert not torch.allclose(formula_at_zero, off)  # the values [V+; 0] over [K+; K-]: Z+ scaled down per query


def test_single_negative_methods_refuse_several():
    for method in (NAG(), VSF(), CFG()):
        with pytest.raises(UserError, match="at most 1 negative"):
            method.check_negatives(2)


def test_cfg_combine():
    a, b = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(CFG().combine((a, b), 1.0), a)
    torch.testing.assert_close(CFG().combine((a, b), 3.0), b + 3 * (a - b))


def count_forwards(model):
    """The model's forwards, each recorded as its number of rows (videos x conditions)."""
    calls = []
    return calls, model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))


def test_cfg_stream_two_passes_and_scale_one_equals_positive(tiny_generator):
    """CFG's conditional and unconditional passes are two rows of one forward (and of one cache)."""
    prompt, negative = "a red circle and a blue square", "red circle"
    calls, handle = count_forwards(tiny_generator.model)
    try:
        cfg_one = list(tiny_generator.stream(prompt, negative, 1.0, "cfg", decode=False))
    finally:
        handle.remove()
    assert calls == [2] * len(cfg_one) * (len(tiny_generator.steps) + 1)
    plain = list(tiny_generator.stream(prompt, negative, 0.0, "none", decode=False))
    for a, b in zip(cfg_one, plain):
        torch.testing.assert_close(a.latents, b.latents, rtol=1e-5, atol=1e-5)
    cfg_three = list(tiny_generator.stream(prompt, negative, 3.0, "cfg", decode=False))
    assert not torch.allclose(cfg_three[1].latents, plain[1].latents)


@pytest.mark.parametrize("method,scale", [("nag", 5.0), ("vsf", 1.5)])
def test_attention_baselines_one_pass_per_step(tiny_generator, method, scale):
    calls, handle = count_forwards(tiny_generator.model)
    try:
        chunks = list(tiny_generator.stream("a red circle", "red circle", scale, method, decode=False))
    finally:
        handle.remove()
    assert len(calls) == len(chunks) * (len(tiny_generator.steps) + 1)
    none = list(tiny_generator.stream("a red circle", "red circle", 0.0, "none", decode=False))
    assert not torch.allclose(chunks[1].latents, none[1].latents)
