"""Outputs pinned across refactors: the bundled model and the tiny random model, for fixed seeds, every method,
a mid-stream change and a rolling cache, compared with latents and frames stored in tests/data.

The store was written by the code before the structural refactor (issue 15); a refactor must leave every
number unchanged. On the machine that wrote it the outputs are bit-identical (NASA_VIDEO_PIN_EXACT=1 asserts
that); elsewhere a CPU with other vector units may round matrix products differently, so the default check
allows 1e-5 (the methods change outputs by orders of magnitude more than that).
Rewrite the store (only when a change of numbers is intended): NASA_VIDEO_PIN_WRITE=1 pytest tests/test_pinned_outputs.py
"""
import os
from pathlib import Path

import pytest
import torch

STORE = Path(__file__).parent / "data" / "pinned_outputs.safetensors"
PROMPT = "a red circle and a blue square"


def _stream(gen, key, out, *args, change=None, **kwargs):
    stream = gen.stream(*args, **kwargs)
    for chunk in stream:
        out[f"{key}/latents/{chunk.block}"] = chunk.latents.contiguous()
        if chunk.frames is not None:
            out[f"{key}/frames/{chunk.block}"] = torch.from_numpy(chunk.frames.copy())
        if change is not None and chunk.block == 0:
            stream.set_negative(*change)


def _runs():
    from nasa_video.pipeline import StreamingGenerator

    out: dict[str, torch.Tensor] = {}
    toy = StreamingGenerator.from_config("toy", device="cpu", dtype="fp32", attention_backend="sdpa")
    _stream(toy, "toy-none", out, PROMPT, guidance="none", seed=3)
    _stream(toy, "toy-nasa", out, PROMPT, negative=[("red circle", 1.0), ("blue square", 0.5)], scale=1.0, seed=3)
    _stream(toy, "toy-change", out, PROMPT, negative="red circle", scale=[0.5, 1.5], seed=4,
            change=("blue square", 1.0))
    for method, scale in (("nag", 4.0), ("vsf", 2.0), ("cfg", 3.0)):
        _stream(toy, f"toy-{method}", out, PROMPT, negative="red circle", scale=scale, guidance=method, seed=5)
    tiny = StreamingGenerator.from_config("tiny", device="cpu", dtype="fp32", attention_backend="sdpa",
                                          overrides={"cache": {"sink_frames": 3}})
    _stream(tiny, "tiny-nasa", out, "a fox", negative=[("snow", 1.0), ("blur", 0.5)], scale=0.8, seed=1)
    _stream(tiny, "tiny-cfg", out, "a fox", negative="snow", scale=3.0, guidance="cfg", seed=1)
    _stream(tiny, "tiny-rolling", out, "a fox", negative="snow", scale=0.8, seed=2, frames=33, rolling=True)
    return out


@pytest.mark.skipif(not STORE.exists() and not os.environ.get("NASA_VIDEO_PIN_WRITE"),
                    reason="no pinned store; write it with NASA_VIDEO_PIN_WRITE=1")
def test_outputs_equal_the_pinned_store():
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    got = _runs()
    if os.environ.get("NASA_VIDEO_PIN_WRITE"):
        STORE.parent.mkdir(exist_ok=True)
        save_file(got, str(STORE))
        pytest.skip(f"wrote {STORE}")
    want = load_file(str(STORE))
    assert sorted(got) == sorted(want)
    exact = bool(os.environ.get("NASA_VIDEO_PIN_EXACT"))
    for key in sorted(want):
        if exact or want[key].dtype == torch.uint8:
            # uint8 frames: equal up to one level where a latent rounds across a .5 boundary
            diff = (got[key].int() - want[key].int()).abs().max().item() if not exact else None
            assert (torch.equal(got[key], want[key]) if exact else diff <= 1), key
        else:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)
