"""Several streams in one forward (StreamBatch) equal each stream run alone (fp32, within 1e-5), whatever their
methods, including when one stream changes mid-way or leaves; a batch of one is the stream itself; the tiny
config, CPU, offline."""
import numpy as np
import pytest
import torch

from nasa_video.errors import UserError

from .conftest import assert_close_to_scale, collect_chunks

SPECS = [dict(prompt="a fox in a field", negative=[("snow", 1.0), ("blur", 0.5)], scale=0.8, seed=1),
         dict(prompt="a boat at sea", negative="rain", scale=0.3, seed=2),
         dict(prompt="a city at night", seed=3)]  # no negative: padded with zero-weight negatives in the batch


@pytest.fixture(scope="module")
def gen(make_generator):
    return make_generator("tiny", {"cache": {"capacity_frames": 9}, "video": {"latent_frames": 9}})


def alone(gen, spec, change=None, at=None, **kwargs):
    stream = gen.stream(spec["prompt"], spec.get("negative"), spec.get("scale"), seed=spec["seed"], **kwargs)
    return collect_chunks(stream, at if change is not None else None, change)


def close(a, b):
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-5, atol=1e-5)


def test_a_batch_equals_each_stream_alone(gen):
    batch = list(gen.stream_batch(SPECS))
    assert len(batch) == 3 and list(batch[0]) == [0, 1, 2]
    for i, spec in enumerate(SPECS):
        ref = alone(gen, spec)
        for block, chunk in enumerate(ref):
            got = batch[block][i]
            close(got, chunk)
            assert abs(got.frames.astype(int) - chunk.frames.astype(int)).max() <= 1
            assert got.negative == chunk.negative and got.scale == chunk.scale


@pytest.mark.parametrize("recache", [False, True])
def test_a_change_in_one_stream_only(gen, recache):
    def change(stream):
        stream.set_prompt("a red kite", recache=recache)
        stream.set_negative("clouds", 1.2)

    batch = gen.stream_batch(SPECS, decode=False)
    chunks = []
    for out in batch:
        chunks.append(out)
        if out[1].block == 0:
            change(batch[1])
    for i, spec in enumerate(SPECS):
        ref = alone(gen, spec, change if i == 1 else None, 1, decode=False)
        for block, chunk in enumerate(ref):
            close(chunks[block][i], chunk)
    assert chunks[1][1].prompt == "a red kite" and chunks[1][0].prompt == SPECS[0]["prompt"]
    assert (chunks[1][1].recache_seconds > 0) == recache and chunks[1][0].recache_seconds == 0


def test_a_stream_can_leave_between_blocks(gen):
    batch = gen.stream_batch(SPECS, decode=False)
    chunks, sizes = [], []
    for out in batch:
        chunks.append(out)
        if out[0].block == 0:
            batch.remove(1)
        sizes.append(len(batch))
    assert list(chunks[1]) == [0, 2] and 1 not in batch
    assert sizes[0] == 2 and sizes[-1] == 0  # after its last block a stream leaves
    for i in (0, 2):
        for block, chunk in enumerate(alone(gen, SPECS[i], decode=False)):
            close(chunks[block][i], chunk)


MIXED = [dict(prompt="a fox in a field", negative="snow", scale=5.0, seed=1, method="nag"),
         dict(prompt="a boat at sea", negative="rain", scale=1.5, seed=2, method="vsf"),
         dict(prompt="a city at night", negative="fog", scale=3.0, seed=3, method="cfg"),
         dict(prompt="a red kite", negative=[("snow", 1.0), ("blur", 0.5)], scale=0.8, seed=4, method="nasa"),
         dict(prompt="a cat", negative="rain", seed=5, method="none")]


def test_every_method_in_one_batch_equals_each_stream_alone(gen):
    """NAG, VSF, CFG (two rows of the one cache), NASA and none side by side in one forward per step: each video is
    the one it makes alone (fp32; rows batched differently sum their products in another order)."""
    calls = []
    handle = gen.model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        batch = list(gen.stream_batch(MIXED, decode=False))
    finally:
        handle.remove()
    steps = len(gen.steps) + 1
    assert calls == [len(MIXED) + 1] * (len(batch) * steps)  # one forward per step; CFG's video takes two rows
    for i, spec in enumerate(MIXED):
        stream = gen.stream(spec["prompt"], spec["negative"], spec.get("scale"), spec["method"], seed=spec["seed"],
                            decode=False)
        for block, chunk in enumerate(stream):
            assert_close_to_scale(batch[block][i].latents, chunk.latents, 1e-5, f"{spec['method']} block {block}")


@pytest.mark.parametrize("method,scales", [("nag", (5.0, 2.0, None)), ("vsf", (1.5, 0.4, None))])
def test_nag_and_vsf_rows_with_their_own_scales_and_lengths_share_one_launch(gen, method, scales):
    """Three videos of one method, each with its own scale and negative (of another token count), the last with
    none: one fused plan for the batch (NAG: a per-row scale; VSF: per-row -inf past each negative's length), and
    each video equals itself alone."""
    from nasa_video.guidance import NAGPlan, VSFRowsPlan

    negatives = ["snow", "heavy rain at night", None]
    specs = [dict(prompt=p, negative=n, scale=s, seed=i, method=method)
             for i, (p, n, s) in enumerate(zip(("a fox", "a boat at sea", "a city"), negatives, scales))]
    plans = []
    prepare = type(gen.model.blocks[0].attn2.processor).prepare

    def recording(self):
        plan = prepare(self)
        plans.append(type(plan))
        return plan

    try:
        type(gen.model.blocks[0].attn2.processor).prepare = recording
        batch = list(gen.stream_batch(specs, decode=False))
    finally:
        type(gen.model.blocks[0].attn2.processor).prepare = prepare
    assert (NAGPlan if method == "nag" else VSFRowsPlan) in plans
    for i, spec in enumerate(specs):
        stream = gen.stream(spec["prompt"], spec["negative"], spec["scale"], method, seed=i, decode=False)
        for block, chunk in enumerate(stream):
            assert_close_to_scale(batch[block][i].latents, chunk.latents, 1e-5, f"{method} video {i} block {block}")


def test_a_batch_overlapping_its_decode_equals_the_sequential_batch(gen):
    specs = [dict(SPECS[0], frames=21), dict(SPECS[1], frames=9)]  # the second leaves after its first block
    plain = list(gen.stream_batch(specs))
    overlapped = [chunk for chunks in gen.stream_batch(specs, overlap_decode=True) for chunk in chunks.items()]
    made = [(name, chunk) for chunks in plain for name, chunk in chunks.items()]
    assert sorted((n, c.block) for n, c in overlapped) == sorted((n, c.block) for n, c in made)
    by_key = {(n, c.block): c for n, c in made}
    for name, chunk in overlapped:
        assert np.array_equal(chunk.frames, by_key[name, chunk.block].frames)
        assert chunk.first_frame == by_key[name, chunk.block].first_frame


def test_batch_refusals_are_one_line(gen):
    with pytest.raises(UserError, match="unknown guidance 'cfgg'"):
        gen.stream_batch([dict(SPECS[0], method="cfgg")])
    with pytest.raises(UserError, match="unknown argument 'sead'"):
        gen.stream_batch([dict(prompt="a fox", sead=1)])
    with pytest.raises(UserError, match="at least one stream"):
        gen.stream_batch([])


@pytest.fixture(scope="module")
def rolling_gen(make_generator):
    """A rolling cache of 2 blocks and a RoPE table of 12 positions: in 6 blocks the batch evicts and re-bases."""
    return make_generator("tiny", {"cache": {"capacity_frames": 6, "rolling": True},
                                   "generator": {"rope_max_seq_len": 12}, "video": {"height": 16, "width": 16}})


def test_a_stream_joins_a_running_batch_and_equals_itself_alone(rolling_gen):
    """Stream "late" joins after block 1 (the batch has cached frames it must not see); it has 3 blocks of its own,
    the others 6. Every stream equals itself alone, including across the batch's evictions and position re-bases
    (the late stream's frames sit at other RoPE positions than alone: only position differences matter)."""
    gen = rolling_gen
    first = [dict(SPECS[0], frames=69), dict(SPECS[1], frames=69)]
    late = dict(prompt="a kite over a beach", negative="birds", scale=0.6, seed=9, frames=33)
    batch = gen.stream_batch(first, decode=False, rolling=True)
    got: dict = {0: [], 1: [], "late": []}
    for out in batch:
        for name, chunk in out.items():
            got[name].append(chunk)
        if out[0].block == 1:
            batch.add(dict(late, name="late"))
            assert "late" in batch and len(batch) == 3
    assert [len(got[n]) for n in (0, 1, "late")] == [6, 6, 3]
    assert [c.block for c in got["late"]] == [0, 1, 2]
    for name, spec in ((0, first[0]), (1, first[1]), ("late", late)):
        stream = gen.stream(spec["prompt"], spec["negative"], spec["scale"], frames=spec["frames"], seed=spec["seed"],
                            rolling=True, decode=False)
        for chunk, ref in zip(got[name], stream, strict=True):
            torch.testing.assert_close(chunk.latents, ref.latents, rtol=1e-4, atol=1e-4)
    assert len(batch) == 0


def test_a_join_after_everyone_left_starts_afresh(rolling_gen):
    batch = rolling_gen.stream_batch([dict(SPECS[2], frames=9)], decode=False, rolling=True)
    assert len(list(batch)) == 1 and not batch.running
    batch.add(dict(SPECS[0], frames=21, name="next"))
    chunks = [out["next"] for out in batch]
    alone_ = rolling_gen.stream(SPECS[0]["prompt"], SPECS[0]["negative"], SPECS[0]["scale"], frames=21,
                                seed=SPECS[0]["seed"], rolling=True, decode=False)
    for chunk, ref in zip(chunks, alone_, strict=True):
        close(chunk, ref)


def test_a_join_needs_a_rolling_cache_without_sinks(gen):
    batch = gen.stream_batch(SPECS[:1], decode=False)
    next(iter(batch))
    with pytest.raises(UserError, match="only on a rolling cache without sink frames"):
        batch.add(dict(SPECS[1]))
    with pytest.raises(UserError, match="two streams are named 0"):
        batch.add(dict(SPECS[1], name=0))


def test_a_late_stream_recaches_over_blocks_made_before_it_joined(rolling_gen):
    """A re-cache right after joining re-runs blocks the late stream never saw (the batch's earlier block is still
    in the window): its own row must stay hidden there and its video equal the same switch made alone. (The pass
    must leave that row something to attend to, its own slots: some kernels give NaN for a row with none; PyTorch's
    CPU SDPA gives zeros, so test_the_key_mask_hides_slots_filled_before_a_row_joined pins the mask itself.)"""
    gen = rolling_gen
    late = dict(prompt="a kite over a beach", negative="birds", scale=0.6, seed=9, frames=33)
    batch = gen.stream_batch([dict(SPECS[0], frames=69)], decode=False, rolling=True)
    got = []
    for out in batch:
        if "late" in out:
            got.append(out["late"])
            if out["late"].block == 0:
                batch["late"].set_prompt("a red kite", recache=True)
        if out[0].block == 1:
            batch.add(dict(late, name="late"))
    assert len(got) == 3 and got[1].recache_seconds > 0
    stream = gen.stream(late["prompt"], late["negative"], late["scale"], frames=33, seed=9, rolling=True, decode=False)
    ref = collect_chunks(stream, 1, lambda s: s.set_prompt("a red kite", recache=True))
    for chunk, expected in zip(got, ref, strict=True):
        assert torch.isfinite(chunk.latents).all()
        torch.testing.assert_close(chunk.latents, expected.latents, rtol=1e-4, atol=1e-4)


def test_the_key_mask_hides_slots_filled_before_a_row_joined():
    from nasa_video.model.cache import SelfAttentionCache

    cache = SelfAttentionCache(1, 1, 6, 1, 1, 2, torch.float32, "cpu", rolling=True)
    cache.place(0, 2)
    assert cache.key_mask() is None  # nobody joined: the unmasked path
    cache.add_rows(1)
    cache.place(2, 2)
    assert cache.key_mask()[:, 0, 0].tolist() == [[True] * 4, [False, False, True, True]]
    cache.place(0, 2)  # a re-cache pass over the block made before row 1 joined: each row sees that block's slots
    assert cache.key_mask()[:, 0, 0].tolist() == [[True, True], [True, True]]
    cache.place(4, 2)
    cache.place(6, 2)  # the rolling window evicts frames 0-1: row 1 sees all of what is left, the mask goes
    assert cache.frames == [2, 3, 4, 5, 6, 7] and cache.key_mask() is None


def test_schedule_rebase_and_recache_a_batch_of_one_is_the_stream(rolling_gen):
    """The drift the two loops once had: a per-block scale schedule, a position re-base, then a prompt switch with
    a re-cache. The re-cache asks the schedule for the blocks it re-runs (their own indices, not their positions
    after the re-base), a stream and a batch of one make the same video bit for bit, and both record it."""
    gen = rolling_gen
    asked = []

    def scale(block, step):
        asked.append((block, step))
        return (0.3, 0.6, 0.9, 1.2, 0.2, 0.7, 1.1, 0.5)[block]

    def run(make):
        stream, chunks, calls = None, [], {}
        for chunk, stream in make():
            chunks.append(chunk)
            asked.clear()
            if chunk.block == 5:
                stream.set_prompt("a red kite", recache=True)
            calls[chunk.block] = list(asked)
            if chunk.block == 7:
                break
        return chunks, stream, calls

    def alone():
        stream = gen.stream("a fox in a field", "snow", scale, seed=5, rolling=True, decode=False)
        return ((chunk, stream) for chunk in stream)

    def batch_of_one():
        batch = gen.stream_batch([dict(prompt="a fox in a field", negative="snow", scale=scale, seed=5)],
                                 rolling=True, decode=False)
        return ((out[0], batch[0]) for out in batch)

    (mine, stream, _), (theirs, member, _) = run(alone), run(batch_of_one)
    assert list(stream.rebases) == list(member.rebases) == [4, 7]
    for a, b in zip(mine, theirs, strict=True):
        assert torch.equal(a.latents, b.latents), f"block {a.block}: {(a.latents - b.latents).abs().max():.3g}"
    assert [b for b, _ in stream.recaches] == [b for b, _ in member.recaches] == [6]
    assert mine[6].recache_seconds > 0 and theirs[6].recache_seconds > 0
    # what block 6 asked the schedule for at the last step: the re-cached blocks 4 and 5 (held across the re-base
    # at block 4), then its own block
    last = len(gen.steps) - 1
    asked.clear()
    stream = gen.stream("a fox in a field", "snow", scale, seed=5, rolling=True, decode=False)
    for chunk in stream:
        if chunk.block == 5:
            asked.clear()
            stream.set_prompt("a red kite", recache=True)
        if chunk.block == 6:
            break
    assert sorted({b for b, s in asked if s == last}) == [4, 5, 6]


def test_held_cache_pass_inputs_cover_the_cache_exactly_across_rebases_with_sinks(make_generator):
    """With sink frames one block long, a re-base moves the oldest window block onto the sinks' positions just
    before the next block evicts it: the held inputs (what a re-cache re-runs) must drop it, so they always hold
    each cached block once, at its own slots, and a re-cache never writes another block over the sinks."""
    gen = make_generator("tiny", {"generator": {"rope_max_seq_len": 12}, "video": {"height": 16, "width": 16},
                                  "cache": {"capacity_frames": 9, "sink_frames": 3}})
    stream = gen.stream(PROMPT_FOX, "snow", 0.8, seed=1, rolling=True, decode=False)
    for chunk in stream:
        positions = sorted(p + i for p, _ in stream.held.values() for i in range(3))
        assert positions == sorted(stream.kv_cache.frames), (chunk.block, sorted(stream.held), stream.kv_cache.frames)
        assert 0 in stream.held  # the sink block stays
        if chunk.block == 4:
            sink_k = stream.kv_cache.k[0][:, :3 * stream.kv_cache.tokens_per_frame].clone()
            stream.set_prompt(PROMPT_FOX, recache=True)  # the same prompt: the sinks' own input, re-run
        if chunk.block == 5:
            now = stream.kv_cache.k[0][:, :3 * stream.kv_cache.tokens_per_frame]
            assert_close_to_scale(now, sink_k, 1e-5, "the sink block's K after a re-cache")
            break
    assert list(stream.rebases)


PROMPT_FOX = "a fox in a field"


def test_a_nag_batch_runs_in_bf16(make_generator):
    """NAG's per-row scale is float32: the plan hands back the query's dtype (bf16 here), as alone."""
    gen = make_generator("tiny", dtype="bf16")
    specs = [dict(prompt="a fox", negative="snow", scale=5.0, seed=1, method="nag"),
             dict(prompt="a boat", negative="rain", scale=2.0, seed=2, method="nag"), dict(prompt="a cat", seed=3)]
    chunks = list(gen.stream_batch(specs, decode=False))
    assert chunks and all(torch.isfinite(c.latents).all() for out in chunks for c in out.values())


def test_an_overlapped_batch_runs_again_after_its_end(rolling_gen):
    batch = rolling_gen.stream_batch([dict(SPECS[2], frames=9)], rolling=True, overlap_decode=True)
    assert len(list(batch)) == 1
    batch.add(dict(SPECS[0], frames=9, name="next"))
    again = list(batch)
    assert [list(out) for out in again] == [["next"]] and again[0]["next"].frames is not None


def test_a_stream_whose_own_inputs_fail_leaves_and_the_others_go_on(gen):
    """A scale function that gives a bad value at block 1 ends its own stream with the one-line error (in
    batch.failed) before anything is drawn for that block; the other stream makes the video it makes alone."""
    def bad_at_one(block, step):
        return 0.5 if block == 0 else float("nan")

    batch = gen.stream_batch([dict(SPECS[0], scale=bad_at_one, name="bad"), dict(SPECS[1], name="good")],
                             decode=False)
    chunks = list(batch)
    assert [sorted(out) for out in chunks] == [["bad", "good"], ["good"], ["good"]]
    assert set(batch.failed) == {"bad"} and "bad" not in batch
    assert isinstance(batch.failed["bad"], UserError) and "\n" not in str(batch.failed["bad"])
    for block, ref in enumerate(alone(gen, SPECS[1], decode=False)):
        close(chunks[block]["good"], ref)
