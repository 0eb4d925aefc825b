"""The block-causal generator: equal to diffusers' Wan forward, and streaming equals the full masked forward."""
import torch
from diffusers import WanTransformer3DModel

from nasa_video.guidance import NASA, NoGuidance
from nasa_video.model.causal_wan import block_causal_mask, rope_frequencies

from .conftest import TINY, guided

FPB, H, W = 3, 8, 8
TPF = (H // 2) * (W // 2)


def test_forward_matches_diffusers_wan(tiny_model, text_cache):
    """Uniform timesteps and full attention: the same function as diffusers' WanTransformer3DModel."""
    reference = WanTransformer3DModel(**TINY).eval()
    reference.load_state_dict(tiny_model.state_dict())
    x = torch.randn(1, 4, 3, H, W)
    positive = torch.randn(1, 16, TINY["text_dim"])
    from nasa_video.model.cache import TextCache
    cache = TextCache(tiny_model, positive)
    with torch.no_grad():
        expected = reference(x, torch.tensor([400.0]), positive, return_dict=False)[0]
        got = guided(tiny_model, cache)(x, torch.full((1, 3), 400.0))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rope_positions_start_at_block_frame(tiny_model):
    full_cos, full_sin = rope_frequencies(tiny_model.rope, torch.arange(9), 4, 4, "cpu")
    cos, sin = rope_frequencies(tiny_model.rope, torch.arange(6, 9), 4, 4, "cpu")
    torch.testing.assert_close(cos, full_cos[:, 6 * 16:])
    torch.testing.assert_close(sin, full_sin[:, 6 * 16:])


def _inputs(blocks, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(1, 4, FPB, H, W, generator=g) for _ in range(blocks)]
    ts = [torch.rand(1, FPB, generator=g) * 1000 for _ in range(blocks)]
    return xs, ts


def test_streaming_equals_full_block_causal_forward(tiny_model, text_cache):
    """Per block: a noisy pass, then the cache pass. The noisy pass's output must equal the full masked forward
    over [earlier blocks' cache-pass inputs, this block's noisy input]; and the cache pass's output the full
    forward over all cache-pass inputs."""
    blocks = 4
    noisy, t_noisy = _inputs(blocks, seed=0)
    clean, t_clean = _inputs(blocks, seed=1)
    model = guided(tiny_model, text_cache, NASA(), 0.7)
    cache = tiny_model.new_kv_cache(1, blocks * FPB, H, W)
    mask = block_causal_mask(blocks * FPB, FPB, TPF)
    with torch.no_grad():
        full_clean = model(torch.cat(clean, 2), torch.cat(t_clean, 1), attn_mask=mask)
        for b in range(blocks):
            s = slice(b * FPB, (b + 1) * FPB)
            out_noisy = model(noisy[b], t_noisy[b], b * FPB, cache)
            out_clean = model(clean[b], t_clean[b], b * FPB, cache)
            mixed = torch.cat(clean[:b] + [noisy[b]], 2)
            t_mixed = torch.cat(t_clean[:b] + [t_noisy[b]], 1)
            full_noisy = model(mixed, t_mixed, attn_mask=block_causal_mask((b + 1) * FPB, FPB, TPF))
            torch.testing.assert_close(out_noisy, full_noisy[:, :, s], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out_clean, full_clean[:, :, s], rtol=1e-4, atol=1e-5)


def _stream(model, cache, xs, ts, text):
    guided(model, text)
    with torch.no_grad():
        return torch.cat([model(x, t, start_frame=b * FPB, kv_cache=cache)
                          for b, (x, t) in enumerate(zip(xs, ts))], 2)


def test_rolling_cache_inside_its_window_equals_fixed(tiny_model, text_cache):
    xs, ts = _inputs(3)
    fixed = _stream(tiny_model, tiny_model.new_kv_cache(1, 9, H, W), xs, ts, text_cache)
    rolling = _stream(tiny_model, tiny_model.new_kv_cache(1, 9, H, W, rolling=True, sink_frames=3), xs, ts, text_cache)
    torch.testing.assert_close(rolling, fixed, rtol=0, atol=0)


def test_rolling_cache_past_its_window_equals_windowed_mask(tiny_model, text_cache):
    """Beyond the window: sink frames plus the most recent frames, as a sliding mask with a sink gives."""
    xs, ts = _inputs(5)
    for capacity, sink in [(6, 0), (9, 3), (6, 3)]:
        cache = tiny_model.new_kv_cache(1, capacity, H, W, rolling=True, sink_frames=sink)
        streamed = _stream(tiny_model, cache, xs, ts, text_cache)
        mask = block_causal_mask(5 * FPB, FPB, TPF, window_frames=capacity, sink_frames=sink)
        with torch.no_grad():
            full = tiny_model(torch.cat(xs, 2), torch.cat(ts, 1), attn_mask=mask)
        torch.testing.assert_close(streamed, full, rtol=1e-4, atol=1e-5)
        assert cache.frames == list(range(sink)) + list(range(5 * FPB - (capacity - sink), 5 * FPB))


def test_fixed_cache_refuses_overflow(tiny_model, text_cache):
    import pytest
    from nasa_video.errors import UserError
    xs, ts = _inputs(3)
    with pytest.raises(UserError, match="rolling"):
        _stream(tiny_model, tiny_model.new_kv_cache(1, 6, H, W), xs, ts, text_cache)


def test_teacher_forcing_mask_equals_streaming(tiny_model, text_cache):
    """Training on [clean | noisy] with the teacher-forcing mask gives each noisy block exactly the output it
    gets when streamed after the clean blocks' cache passes."""
    from nasa_video.model.causal_wan import teacher_forcing_mask
    blocks = 3
    clean, _ = _inputs(blocks, seed=2)
    noisy, t_noisy = _inputs(blocks, seed=3)
    frames = blocks * FPB
    x = torch.cat(clean + noisy, 2)
    t = torch.cat([torch.zeros(1, frames)] + t_noisy, 1)
    positions = torch.cat([torch.arange(frames), torch.arange(frames)])
    guided(tiny_model, text_cache)
    with torch.no_grad():
        full = tiny_model(x, t, attn_mask=teacher_forcing_mask(frames, FPB, TPF),
                          frame_positions=positions)
        cache = tiny_model.new_kv_cache(1, frames, H, W)
        for b in range(blocks):
            streamed = tiny_model(noisy[b], t_noisy[b], start_frame=b * FPB, kv_cache=cache)
            tiny_model(clean[b], torch.zeros(1, FPB), start_frame=b * FPB, kv_cache=cache)
            s = slice(frames + b * FPB, frames + (b + 1) * FPB)
            torch.testing.assert_close(streamed, full[:, :, s], rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    import copy

    from nasa_video.model.cache import TextCache
    from nasa_video.model.causal_wan import teacher_forcing_mask

    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(1, 4, 6, 8, 8, generator=g), torch.full((1, 6), 500.0)
    ctx = torch.randn(1, 16, 32, generator=g)
    mask = teacher_forcing_mask(3, 3, 16)
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(tiny_model).train().requires_grad_(True)
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert model.gradient_checkpointing
        out = guided(model, TextCache(model, ctx))(x, t, attn_mask=mask,
                    frame_positions=torch.cat([torch.arange(3), torch.arange(3)]))
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_prompt_embeddings_inside_the_forward_equal_the_text_cache(tiny_model, text_cache, contexts):
    """Training builds the text K/V inside the forward (FSDP needs it there); same output as the cached K/V,
    with two weighted negatives under NASA."""
    from nasa_video.model.cache import PromptEmbeddings

    x, t = torch.randn(1, 4, 3, H, W), torch.full((1, 3), 600.0)
    with torch.no_grad():
        cached = guided(tiny_model, text_cache, NASA(), 0.8)(x, t)
        tiny_model.set_guidance(NASA(), text_cache.alphas(0.8))
        inside = tiny_model(x, t, prompts=PromptEmbeddings(contexts[0], contexts[1:]))
        tiny_model.set_guidance(NoGuidance())
        plain = tiny_model(x, t, prompts=PromptEmbeddings(contexts[0]))
    torch.testing.assert_close(inside, cached, rtol=0, atol=0)
    assert (plain - cached).abs().max() > 1e-3  # the negatives matter
