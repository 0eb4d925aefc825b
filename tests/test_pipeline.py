"""The streaming loop on the tiny random config: pass counts, caches, mid-stream changes, decode, MP4."""
import numpy as np
import pytest
import torch

from nasa_video.errors import UserError
from nasa_video.pipeline import StreamingGenerator, latent_frames_for
from nasa_video.vae import one_shot_decode, streaming_decoder

from .test_guidance import nasa_formula

PROMPT, NEG = "a red circle and a blue square", "red circle"


def run(gen, **kw):
    return list(gen.stream(PROMPT, **kw))


def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("guidance", ["none", "nasa"])
def test_one_forward_per_step_plus_cache_pass(tiny_generator, guidance):
    calls, handle = count_forwards(tiny_generator.model)
    try:
        chunks = run(tiny_generator, negative=NEG, guidance=guidance, scale=0.5, decode=False)
    finally:
        handle.remove()
    assert len(chunks) == 2
    assert len(calls) == len(chunks) * (len(tiny_generator.steps) + 1)


def test_negative_text_kv_built_once_per_video(tiny_generator):
    """Observed on the K/V projections themselves: every cross-attention to_k / to_v runs once per prompt (the
    positive and the two negatives) for the whole video, never inside a block's steps."""
    blocks = tiny_generator.model.blocks
    calls = {"k": 0, "v": 0}

    def counter(name):
        def hook(*_):
            calls[name] += 1
        return hook
    hooks = [b.attn2.to_k.register_forward_hook(counter("k")) for b in blocks]
    hooks += [b.attn2.to_v.register_forward_hook(counter("v")) for b in blocks]
    try:
        stream = tiny_generator.stream(PROMPT, negative=[NEG, "blue square"], decode=False)
        chunks = list(stream)
    finally:
        for h in hooks:
            h.remove()
    assert len(chunks) == 2
    assert calls == {"k": 3 * len(blocks), "v": 3 * len(blocks)}, calls
    assert stream.text_cache.negative_builds == 1


def test_reproducible_for_a_seed(tiny_generator):
    a = run(tiny_generator, negative=NEG, seed=3, decode=False)
    b = run(tiny_generator, negative=NEG, seed=3, decode=False)
    c = run(tiny_generator, negative=NEG, seed=4, decode=False)
    assert all(torch.equal(x.latents, y.latents) for x, y in zip(a, b))
    assert not torch.equal(a[0].latents, c[0].latents)


def test_alpha_zero_stream_equals_none(tiny_generator):
    """alpha = 0 streams what NASA's equation streams at 0 (the negative attended and weighted by 0 in every
    layer, no shortcut), and exactly what no guidance streams."""
    none = run(tiny_generator, negative=NEG, guidance="none", decode=False)
    zero = run(tiny_generator, negative=NEG, guidance="nasa", scale=0.0, decode=False)
    formula_zero = run(tiny_generator, negative=NEG, guidance=nasa_formula(), scale=0.0, decode=False)
    nasa = run(tiny_generator, negative=NEG, guidance="nasa", scale=1.0, decode=False)
    assert len(zero) == len(formula_zero) == len(none) == 2
    for a, b, c in zip(none, zero, formula_zero):
        torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
        torch.testing.assert_close(b.latents, c.latents, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(none[1].latents, nasa[1].latents)


def test_mid_stream_scale_change_equals_per_block_schedule(tiny_generator):
    scheduled = run(tiny_generator, negative=NEG, scale=[1.0, 0.2], decode=False)
    stream = tiny_generator.stream(PROMPT, negative=NEG, scale=1.0, decode=False)
    changed = []
    for chunk in stream:
        changed.append(chunk)
        stream.set_scale(0.2)
    for a, b in zip(scheduled, changed):
        torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    assert [c.scale for c in changed] == [1.0, 0.2]


def test_mid_stream_negative_change_keeps_the_video_so_far(tiny_generator):
    plain = run(tiny_generator, negative=NEG, scale=1.0, decode=False)
    stream = tiny_generator.stream(PROMPT, negative=NEG, scale=1.0, decode=False)
    positive_k = stream.text_cache.positive[0][0]
    changed = []
    for chunk in stream:
        changed.append(chunk)
        stream.set_negative("blue square")
    assert torch.equal(changed[0].latents, plain[0].latents)  # block 0 untouched
    assert not torch.allclose(changed[1].latents, plain[1].latents)  # block 1 steered away from the new negative
    assert changed[1].negative == [("blue square", 1.0)]
    assert stream.text_cache.negative_builds == 2
    assert stream.text_cache.positive[0][0] is positive_k  # the positive K/V were not recomputed


def test_streaming_decode_equals_one_shot(tiny_generator):
    chunks = run(tiny_generator, negative=NEG)
    streamed = np.concatenate([c.frames for c in chunks])
    latents = torch.cat([c.latents for c in chunks], 2)
    reference = one_shot_decode(tiny_generator.vae, latents)
    from nasa_video.vae import to_uint8
    assert np.array_equal(streamed, to_uint8(reference)[0].numpy())
    assert streamed.shape == (21, 64, 64, 3)
    assert [c.first_frame for c in chunks] == [0, 9]


def test_streaming_decoder_state_carries_between_blocks(tiny_generator):
    z = torch.randn(1, 4, 6, 8, 8)
    decoder = streaming_decoder(tiny_generator.vae)
    parts = [decoder.decode(z[:, :, i:i + 3]) for i in (0, 3)]
    torch.testing.assert_close(torch.cat(parts, 2), one_shot_decode(tiny_generator.vae, z), rtol=0, atol=1e-6)


def test_rolling_stream_runs_past_the_cache(tiny_generator):
    chunks = run(tiny_generator, frames=1 + 4 * 11, rolling=True, decode=False)  # 12 latent frames, cache of 6
    assert len(chunks) == 4
    with pytest.raises(UserError, match="rolling"):
        run(tiny_generator, frames=1 + 4 * 11, rolling=False, decode=False)


def test_frame_counts():
    assert latent_frames_for(81, 3) == 21
    assert latent_frames_for(21, 3) == 6
    with pytest.raises(UserError, match="whole number of blocks"):
        latent_frames_for(80, 3)


def test_memory_check_refuses_with_the_estimate(monkeypatch):
    from nasa_video import memory
    from nasa_video.loading import load_config
    cfg = load_config("causvid")
    estimate = memory.memory_estimate(cfg, torch.bfloat16)
    assert 2.5e9 < estimate["weights"] < 3.0e9  # 1.42B parameters in bf16
    assert estimate["kv_cache"] == 2 * 30 * 32760 * 1536 * 2  # CausVid's 21-frame cache, about 6 GB
    monkeypatch.setattr(memory, "available_memory", lambda device: 4 * 2**30)
    with pytest.raises(UserError, match=r"needs about .* GiB .* but 4.0 GiB is free"):
        memory.check_fits(cfg, torch.device("cpu"), torch.bfloat16)


def test_x0_prediction_model_output_is_the_block(monkeypatch):
    """sampling.prediction: x0 (the bundled model): the last step's network output is the block's latents."""
    gen = StreamingGenerator.from_config("tiny", device="cpu", dtype="fp32", attention_backend="sdpa",
                                         overrides={"sampling": {"prediction": "x0"}})
    outputs = []
    forward = gen.model.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        outputs.append(out.clone())
        return out

    monkeypatch.setattr(gen.model, "forward", recording)
    chunk = next(iter(gen.stream("a cat", "a dog", 0.5, decode=False)))
    # steps forwards, then the cache pass: the last denoising output is outputs[-2]
    assert len(outputs) == len(gen.steps) + 1
    torch.testing.assert_close(chunk.latents, outputs[-2].float())
    with pytest.raises(UserError, match="prediction"):
        StreamingGenerator.from_config("tiny", device="cpu", dtype="fp32", overrides={"sampling": {"prediction": "eps"}})
