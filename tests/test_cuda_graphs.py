"""CUDA graphs' static-buffer path (model/graphs.py), run eagerly on the CPU: every cached forward goes through
the captured entries, a replay reads the static buffers and cache slots of its capture, and the video equals the
eager one bit for bit (the same operations on copies of the same inputs), across scale schedules, per-step
scales (NAG), a negative and a prompt changed mid-stream with a re-cache, evictions and position re-bases, CFG,
and a batch that a stream joins late (its masked forwards run eagerly; the new cache rows drop the old graphs).
A key that left out the cache slots would replay stale slots: the CPU path shows it as a wrong video."""
import contextlib

import pytest
import torch

from nasa_video.errors import UserError
from nasa_video.model.graphs import StepGraphs

ROLLING = {"cache": {"capacity_frames": 6, "rolling": True}, "generator": {"rope_max_seq_len": 12},
           "video": {"height": 16, "width": 16}}  # evicts from block 2, re-bases from block 4


@pytest.fixture(scope="module")
def gen(make_generator):
    return make_generator("tiny", ROLLING)


@contextlib.contextmanager
def graphs_on(gen):
    gen.set_cuda_graphs(True)
    try:
        yield gen.model.graphs
    finally:
        gen.set_cuda_graphs(False)


def count_forwards(model):
    """Forwards the model ran (a hook on the real module: what ran, not what the graphs counted)."""
    counter = {"n": 0}

    def hook(*_):
        counter["n"] += 1

    return counter, model.register_forward_hook(hook)


def scenario(gen, method="nasa", scale=(0.5, 0.8, 1.2)):
    """A rolling stream of 7 blocks with a negative changed after block 1 and a prompt switched at block 4 with a
    re-cache: its latents [1, C, F, h, w]."""
    stream = gen.stream("a fox in a field", negative="snow", scale=list(scale), guidance=method, seed=2, frames=81,
                        rolling=True, decode=False, prompt_at={4: "a boat at sea"}, recache=True)
    out = []
    for chunk in stream:
        out.append(chunk.latents)
        if chunk.block == 1:
            stream.set_negative([("rain", 1.0), ("blur", 0.5)] if method == "nasa" else "rain")
    assert stream.rebases and stream.recaches, "the scenario must re-base and re-cache"
    return torch.cat(out, 2)


def assert_equal(a, b, what):
    assert torch.equal(a, b), f"{what}: graphs differ from eager by {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("method", ["nasa", "nag", "cfg"])
def test_the_static_buffer_path_equals_eager_and_serves_every_cached_forward(gen, method):
    scale = (0.5, 0.8, 1.2) if method == "nasa" else (4.0,) if method == "nag" else (3.0,)
    eager = scenario(gen, method, scale)
    counter, hook = count_forwards(gen.model)
    try:
        with graphs_on(gen) as graphs:
            graphed = scenario(gen, method, scale)
    finally:
        hook.remove()
    assert_equal(graphed, eager, method)
    assert graphs.runs == counter["n"], f"{counter['n']} forwards, {graphs.runs} through the graphs"
    # the steady state replays: far fewer captures than forwards (a capture per cache slots x plan structure)
    assert 0 < graphs.captures < counter["n"] / 4, (graphs.captures, counter["n"])


def test_a_constant_scale_captures_once_per_cache_length(gen):
    """NASA at one scale: block 0 and block 1 fill the cache at new slots, every later block writes the last
    block's slots; the steps and the cache pass share a plan (guidance in the cache pass). 2 captures for 28 forwards."""
    stream = gen.stream("a fox", negative="snow", scale=0.8, seed=1, frames=81, rolling=True, decode=False)
    with graphs_on(gen) as graphs:
        chunks = list(stream)
    assert len(chunks) == 7 and graphs.captures == 2 and graphs.runs == 7 * (len(gen.steps) + 1), \
        (graphs.captures, graphs.runs)


def test_the_next_video_reuses_the_cache_and_its_graphs(gen):
    """A finished stream hands its cache back: the next video of the same shape writes the same buffers, so every
    one of its forwards replays a graph (no capture), and it equals the same video made eagerly."""
    def video(seed):
        return torch.cat([c.latents for c in gen.stream("a fox", negative="snow", scale=0.8, seed=seed, frames=45,
                                                        rolling=True, decode=False)], 2)

    eager = video(4)
    with graphs_on(gen) as graphs:
        video(3)
        captures = graphs.captures
        graphed = video(4)
    assert graphs.captures == captures and graphs.dropped == 0, (captures, graphs.captures, graphs.dropped)
    assert_equal(graphed, eager, "the second video")


def test_a_late_join_runs_its_masked_forwards_eagerly_and_rebinds(gen):
    first = [dict(prompt="a fox", negative="snow", scale=0.8, seed=1, frames=69),
             dict(prompt="a boat", negative="rain", scale=0.3, seed=2, frames=69)]
    late = dict(prompt="a kite", negative="birds", scale=0.6, seed=9, frames=33, name="late")

    def run():
        batch = gen.stream_batch(first, decode=False, rolling=True)
        got = {}
        for out in batch:
            for name, chunk in out.items():
                got.setdefault(name, []).append(chunk.latents)
            if out[0].block == 1:
                batch.add(dict(late))
        return {name: torch.cat(v, 2) for name, v in got.items()}

    eager = run()
    counter, hook = count_forwards(gen.model)
    try:
        with graphs_on(gen) as graphs:
            graphed = run()
    finally:
        hook.remove()
    for name in eager:
        assert_equal(graphed[name], eager[name], f"stream {name}")
    assert 0 < graphs.runs < counter["n"], "the late rows' masked forwards run eagerly"
    assert graphs.dropped > 0, "the rows added for the late stream are new cache buffers: the old graphs go"


def test_a_key_without_the_cache_slots_shows_as_a_wrong_video(gen, monkeypatch):
    """The CPU path is a real check: cut the slots out of the key and block 1 replays block 0's capture, which
    writes and reads block 0's slots."""
    eager = scenario(gen)
    call = StepGraphs.__call__
    monkeypatch.setattr(StepGraphs, "__call__", lambda self, key, *rest: call(self, key[:4], *rest))  # no slots
    with graphs_on(gen):
        broken = scenario(gen)
    assert not torch.allclose(broken, eager, atol=1e-3), "a stale replay went unnoticed"


def test_graphs_are_off_by_default_and_capture_only_on_cuda(gen):
    assert not gen.cuda_graphs and gen.model.graphs is None
    with graphs_on(gen) as graphs:
        assert gen.cuda_graphs and not graphs.capture
    with pytest.raises(ValueError, match="only on a CUDA device"):
        StepGraphs("cpu", capture=True)


def test_fp8_is_one_line_on_a_cpu(tmp_path):
    from nasa_video.pipeline import StreamingGenerator

    with pytest.raises(UserError, match=r"--fp8 needs a CUDA GPU of compute capability 8\.9.*drop --fp8"):
        StreamingGenerator.from_config("tiny", device="cpu", fp8=True)


def test_fp8_converts_every_linear_layer_of_the_blocks(tiny_model):
    from nasa_video.fp8 import fp8_layer_names

    names = fp8_layer_names(tiny_model)
    linears = [n for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear)]
    in_blocks = [n for n in linears if n.startswith("blocks.")]
    assert names == in_blocks and len(names) == 10 * len(tiny_model.blocks), names  # q k v out x2, ffn in + out
    assert set(linears) - set(names), "the embeddings and the head keep their dtype"


def test_new_scales_negatives_and_prompts_replay_the_same_graphs(gen):
    """A scale changed every block, a new negative (of the same count) and a new prompt change only the plans'
    tensor values: the second video captures nothing, and equals itself made eagerly (the values were copied in)."""
    def video():
        stream = gen.stream("a fox", negative="snow", scale=[0.2, 0.9, 0.4, 1.3], seed=5, frames=81, rolling=True,
                            decode=False, prompt_at={3: "a boat at sea"})
        out = []
        for chunk in stream:
            out.append(chunk.latents)
            if chunk.block == 1:
                stream.set_negative("rain", scale=0.7)
        return torch.cat(out, 2)

    eager = video()
    with graphs_on(gen) as graphs:
        list(gen.stream("a cat", negative="blur", scale=0.5, seed=1, frames=81, rolling=True, decode=False))
        captures = graphs.captures
        graphed = video()
    assert graphs.captures == captures, f"{graphs.captures - captures} new captures for new values"
    assert_equal(graphed, eager, "new values through the same graphs")


def test_a_replay_that_skipped_the_plan_copy_shows(gen, monkeypatch):
    """Without the copy of the current plan's values, a replay after a scale change would reuse the old scale."""
    eager = scenario(gen)
    monkeypatch.setattr(StepGraphs, "_copy_plans", staticmethod(lambda entry, currents: None))
    with graphs_on(gen):
        broken = scenario(gen)
    assert not torch.allclose(broken, eager, atol=1e-3), "a replay without the new plan values went unnoticed"
