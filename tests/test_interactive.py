"""Prompt switching mid-stream (with and without the re-cache), research inputs (embeddings, initial noise, a
torch.Generator, latents out) on the tiny config: CPU, offline, fp32."""
import pytest
import torch

from nasa_video.errors import UserError
from nasa_video.guidance import NoGuidance
from nasa_video.model.cache import TextCache

from .conftest import assert_close_to_scale, collect_chunks

PROMPT, NEW, NEG = "a fox in a field", "a boat at sea", [("snow", 1.0), ("blur", 0.5)]
K = 2  # the switch block


@pytest.fixture(scope="module")
def gen(make_generator):
    return make_generator("tiny", {"cache": {"capacity_frames": 12}, "video": {"latent_frames": 12}})


_chunks = collect_chunks


def _swap_text(stream, gen, prompt):
    """The reference: a freshly built text cache of the new prompt (with the same negatives) put in the stream."""
    cache = TextCache(gen.model, gen.text.encode(prompt))
    texts = [t for t, _ in stream.negatives]
    cache.set_negatives(texts, [w for _, w in stream.negatives], [gen.text.encode(t) for t in texts],
                        [gen.text.token_count(t) for t in texts])
    stream.text_cache = cache
    return cache


def _manual_recache(stream, gen, cache):
    """Re-run the cache pass over the held clean latents, oldest first, with the model's forward alone."""
    last = len(gen.steps) - 1
    for block, (position, context) in sorted(stream.held.items()):
        gen.model.set_text(cache.guide(stream.cache_pass_guidance, stream.schedule(block, last)))
        gen.model(context, torch.zeros(1, 3), position, stream.kv_cache)


@pytest.mark.parametrize("recache", [False, True])
def test_prompt_switch_at_block_k(gen, recache):
    plain = _chunks(gen.stream(PROMPT, NEG, 0.8, seed=3, decode=False))
    switched = _chunks(gen.stream(PROMPT, NEG, 0.8, seed=3, decode=False), K,
                       lambda s: s.set_prompt(NEW, recache=recache))
    reference_stream = gen.stream(PROMPT, NEG, 0.8, seed=3, decode=False)

    def swap(s):
        cache = _swap_text(s, gen, NEW)
        if recache:
            with torch.no_grad():
                _manual_recache(s, gen, cache)
    reference = _chunks(reference_stream, K, swap)
    assert len(plain) == len(switched) == 4
    for a, b in zip(plain[:K], switched[:K]):  # before the switch: the unswitched stream, exactly
        assert torch.equal(a.latents, b.latents) and b.prompt == PROMPT
    for a, b in zip(reference[K:], switched[K:]):  # from the switch on: the new prompt's text cache
        assert_close_to_scale(b.latents, a.latents, 1e-6, f"block {b.block} after the switch")
        assert b.prompt == NEW
    assert not torch.allclose(plain[K].latents, switched[K].latents)
    assert (switched[K].recache_seconds > 0) == recache
    assert all(c.recache_seconds == 0 for i, c in enumerate(switched) if i != K)


def test_recache_changes_the_cached_window_and_keeps_the_negatives(gen):
    streams = {}
    for recache in (False, True):
        stream = gen.stream(PROMPT, NEG, 0.8, seed=3, decode=False)
        _chunks(stream, K, lambda s: s.set_prompt(NEW, recache=recache))
        streams[recache] = stream
    k_plain, k_re = streams[False].kv_cache.k[-1], streams[True].kv_cache.k[-1]  # layer 0 reads no text
    tpf = streams[True].kv_cache.tokens_per_frame
    assert not torch.allclose(k_plain[:, :K * 3 * tpf], k_re[:, :K * 3 * tpf])  # the window was re-cached
    assert streams[True].negatives == NEG and streams[True].text_cache.negative_builds == 1
    assert [b for b, _ in streams[True].recaches] == [K]


def test_prompt_and_negative_changes_compose(gen):
    both = _chunks(gen.stream(PROMPT, NEG, 0.8, seed=3, decode=False), K,
                   lambda s: (s.set_prompt(NEW), s.set_negative("rain", 0.4)))
    reference = _chunks(gen.stream(PROMPT, NEG, 0.8, seed=3, decode=False), K,
                        lambda s: (s.set_negative("rain", 0.4), s.set_prompt(NEW)))
    for a, b in zip(both, reference):
        assert torch.equal(a.latents, b.latents)
    assert both[K].negative == [("rain", 1.0)] and both[K].scale == 0.4 and both[K].prompt == NEW


def test_embeddings_in_equal_text_in(gen):
    text = _chunks(gen.stream(PROMPT, NEG, 0.8, seed=1, decode=False))
    embeds = _chunks(gen.stream(None, None, 0.8, seed=1, decode=False, prompt_embeds=gen.text.encode(PROMPT),
                                negative_prompt_embeds=[(gen.text.encode(t), w) for t, w in NEG]))
    for a, b in zip(text, embeds):
        assert torch.equal(a.latents, b.latents)
    switched_text = _chunks(gen.stream(PROMPT, seed=1, decode=False), 1, lambda s: s.set_prompt(NEW))
    switched_emb = _chunks(gen.stream(PROMPT, seed=1, decode=False), 1,
                           lambda s: s.set_prompt(prompt_embeds=gen.text.encode(NEW)))
    for a, b in zip(switched_text, switched_emb):
        assert torch.equal(a.latents, b.latents)
    assert switched_emb[1].prompt == "<prompt_embeds>"


def test_given_noise_and_generator_reproduce_a_video(gen):
    seeded = _chunks(gen.stream(PROMPT, NEG, seed=9, decode=False))
    with_generator = _chunks(gen.stream(PROMPT, NEG, decode=False, generator=torch.Generator().manual_seed(9)))
    for a, b in zip(seeded, with_generator):
        assert torch.equal(a.latents, b.latents)
    noise = torch.randn(1, 4, 12, 8, 8, generator=torch.Generator().manual_seed(4))
    first = _chunks(gen.stream(PROMPT, NEG, latents=noise, generator=torch.Generator().manual_seed(2)))
    again = _chunks(gen.stream(PROMPT, NEG, latents=noise.clone(), generator=torch.Generator().manual_seed(2)))
    per_block = _chunks(gen.stream(PROMPT, NEG, latents=list(noise.split(3, dim=2)),
                                   generator=torch.Generator().manual_seed(2)))
    for a, b, c in zip(first, again, per_block):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.latents, c.latents)
        assert (a.frames == b.frames).all()
    other = _chunks(gen.stream(PROMPT, NEG, latents=noise * -1, generator=torch.Generator().manual_seed(2)))
    assert not torch.allclose(first[0].latents, other[0].latents)


@pytest.mark.parametrize("kwargs, message", [
    (dict(latents=torch.zeros(1, 4, 6, 8, 8)), "latents cover 2 blocks"),
    (dict(latents=torch.zeros(1, 3, 12, 8, 8)), "initial noise is [1, 4, F, 8, 8]"),
    (dict(prompt_embeds=torch.zeros(1, 5, 7)), "[1, L, 32]"),
    (dict(negative_prompt_embeds=[torch.full((1, 4, 32), float("nan"))]), "NaN"),
    (dict(generator="seed"), "torch.Generator"),
])
def test_bad_research_inputs_are_one_line_errors(gen, kwargs, message):
    with pytest.raises(UserError, match="^[^\n]*$") as error:
        gen.stream(PROMPT, **kwargs)
    assert message in str(error.value)


def test_latent_output_writes_safetensors(gen, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "video.safetensors"
    result = gen.generate(PROMPT, out, NEG, seed=3, progress=False, output_type="latent", prompt_at={K: NEW},
                          recache=True)
    chunks = _chunks(gen.stream(PROMPT, NEG, seed=3, decode=False), K, lambda s: s.set_prompt(NEW, recache=True))
    latents = load_file(str(out))["latents"]
    assert latents.shape == (1, 4, 12, 8, 8) and result.recaches == 1 and result.recache_seconds > 0
    assert torch.equal(latents, torch.cat([c.latents for c in chunks], 2))
    with pytest.raises(UserError, match="the video has 4 blocks"):
        gen.generate(PROMPT, out, prompt_at={4: NEW}, output_type="latent")


CLI = ["generate", "--model", "tiny", "--prompt", PROMPT, "--negative", "snow", "--quiet", "--device", "cpu"]


def test_cli_prompt_at_runs_and_reports_the_recache(tmp_path, capsys):
    from nasa_video.cli import main
    from nasa_video.video_io import read_video
    out = tmp_path / "switch.mp4"
    assert main(CLI + ["--out", str(out), "--prompt-at", f"1:{NEW}", "--recache"]) == 0
    said = capsys.readouterr().out
    assert "1 prompt switch, re-cache" in said and "(1 re-cache)" in said, said
    assert read_video(out).shape == (21, 64, 64, 3)


@pytest.mark.parametrize("extra, message", [
    (["--prompt-at", "boat"], "use BLOCK:TEXT"),
    (["--prompt-at", "x:boat"], "not a block number"),
    (["--prompt-at", "0:boat"], "block 0 is --prompt"),
    (["--prompt-at", "1: "], "has no text"),
    (["--prompt-at", "2:boat"], "the video has 2 blocks"),
    (["--prompt-at", "1:boat", "--prompt-at", "1:sea"], "more than once"),
    (["--recache"], "add --prompt-at"),
])
def test_cli_bad_prompt_at_is_one_line(tmp_path, capsys, extra, message):
    from nasa_video.cli import main
    assert main(CLI + ["--out", str(tmp_path / "x.mp4")] + extra) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("nasa-video: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


@pytest.mark.parametrize("recache", [False, True])
def test_a_prompt_schedule_lands_at_its_block_in_a_stream_a_batch_and_an_overlapped_stream(gen, recache):
    """prompt_at is the request's own: the switch is made by the loop before its block, so a stream, a batch of
    one and an overlapped stream (whose chunks come out a block late) all switch exactly there, as a set_prompt
    after chunk K - 1 does in a sequential stream."""
    from nasa_video.request import VideoRequest

    manual = _chunks(gen.stream(PROMPT, NEG, 0.8, seed=3, decode=False), K,
                     lambda s: s.set_prompt(NEW, recache=recache))
    request = dict(prompt=PROMPT, negative=NEG, scale=0.8, seed=3, prompt_at={K: NEW}, recache=recache)
    scheduled = list(gen.stream(VideoRequest(**request), decode=False))
    batch = [out[0] for out in gen.stream_batch([request], decode=False)]
    overlapped = list(gen.stream(VideoRequest(**request), overlap_decode=True))
    for i, want in enumerate(manual):
        for got in (scheduled[i], batch[i], overlapped[i]):
            assert torch.equal(got.latents, want.latents), f"block {i}"
            assert got.prompt == (NEW if i >= K else PROMPT)
            assert (got.recache_seconds > 0) == (recache and i == K)


def test_a_request_names_its_fields():
    from nasa_video.request import VideoRequest

    with pytest.raises(UserError, match="unknown argument 'negatives'; a video takes prompt, negative"):
        VideoRequest.from_spec({"prompt": "a fox", "negatives": ["snow"]})
