"""Several streams in one forward (StreamBatch) equal each stream run alone (fp32, within 1e-5), including when one
stream changes mid-way or leaves; the tiny config, CPU, offline."""
import pytest
import torch

from nasa_video.errors import UserError

from .conftest import collect_chunks

SPECS = [dict(prompt="a fox in a field", negative=[("snow", 1.0), ("blur", 0.5)], scale=0.8, seed=1),
         dict(prompt="a boat at sea", negative="rain", scale=0.3, seed=2),
         dict(prompt="a city at night", seed=3)]  # no negative: padded with zero-weight negatives in the batch


@pytest.fixture(scope="module")
def gen():
    from nasa_video.pipeline import StreamingGenerator
    return StreamingGenerator.from_config("tiny", device="cpu", dtype="fp32", attention_backend="sdpa",
                                          overrides={"cache": {"capacity_frames": 9}, "video": {"latent_frames": 9}})


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


def test_batch_refusals_are_one_line(gen):
    with pytest.raises(UserError, match="run cfg streams one by one"):
        gen.stream_batch(SPECS, guidance="cfg")
    with pytest.raises(UserError, match="unknown argument 'sead'"):
        gen.stream_batch([dict(prompt="a fox", sead=1)])
    with pytest.raises(UserError, match="at least one stream"):
        gen.stream_batch([])


@pytest.fixture(scope="module")
def rolling_gen():
    """A rolling cache of 2 blocks and a RoPE table of 12 positions: in 6 blocks the batch evicts and re-bases."""
    from nasa_video.pipeline import StreamingGenerator
    return StreamingGenerator.from_config("tiny", device="cpu", dtype="fp32", attention_backend="sdpa",
                                          overrides={"cache": {"capacity_frames": 6, "rolling": True},
                                                     "generator": {"rope_max_seq_len": 12},
                                                     "video": {"height": 16, "width": 16}})


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
