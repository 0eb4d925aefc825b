"""Bad input through the library: each case is a one-line UserError naming the fix, raised before anything is
generated, and a failure midway never leaves a file that looks finished."""
import math
import warnings

import pytest
import torch

from nasa_video.errors import UserError
from nasa_video.pipeline import StreamingGenerator

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def toy():
    return StreamingGenerator.from_config("toy", device="cpu")


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("weight,message", [
    (math.nan, "not a usable weight"), (math.inf, "not a usable weight"), (-5.0, "not a usable weight"),
    (1e9, "out of range for nasa"),
])
def test_negative_weights_are_range_checked(tiny_generator, weight, message):
    with pytest.raises(UserError, match=message) as error:
        tiny_generator.stream(PROMPT, [("red circle", weight)], scale=0.5)
    one_line(error)


def test_weights_inside_the_range_still_work(tiny_generator):
    chunks = list(tiny_generator.stream(PROMPT, [("red circle", 2.0), ("blue", 0.0)], scale=0.5, seed=1))
    assert len(chunks) == 2


@pytest.mark.parametrize("seed", [-1, 2 ** 63, 10 ** 20, 1.5, True])
def test_seeds_out_of_range_are_refused(tiny_generator, seed):
    with pytest.raises(UserError, match="--seed"):
        tiny_generator.stream(PROMPT, seed=seed)


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_empty_prompt_is_refused(tiny_generator, prompt):
    with pytest.raises(UserError, match="prompt is empty"):
        tiny_generator.stream(prompt)


def test_frames_past_the_position_table_are_refused_before_generating(tmp_path):
    gen = StreamingGenerator.from_config("tiny", device="cpu", overrides={"generator": {"rope_max_seq_len": 9}})
    out = tmp_path / "long.mp4"
    with pytest.raises(UserError, match="ask for at most 33 frames") as error:
        gen.generate(PROMPT, out, frames=45, rolling=False, progress=False)  # a rolling one re-bases and runs
    one_line(error)
    assert not list(tmp_path.iterdir())  # nothing written


def test_an_endless_stream_stops_at_the_position_table_and_keeps_a_partial_file(tmp_path):
    # A rolling cache larger than the table cannot re-base (tests/test_endless.py has the ones that can).
    gen = StreamingGenerator.from_config("tiny", device="cpu", overrides={"generator": {"rope_max_seq_len": 9},
                                                                         "cache": {"capacity_frames": 12}})
    out = tmp_path / "endless.mp4"
    with pytest.raises(UserError, match=r"reached latent frame 9\b.*endless\.partial\.mp4") as error:
        gen.generate(PROMPT, out, rolling=True, progress=False)
    one_line(error)
    assert not out.exists() and (tmp_path / "endless.partial.mp4").stat().st_size > 0


def test_a_crash_midway_keeps_a_partial_file_never_the_final_name(tiny_generator, tmp_path, monkeypatch):
    from nasa_video import pipeline

    original = pipeline.Stream._denoise_block
    calls = []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return original(self, *args)

    monkeypatch.setattr(pipeline.Stream, "_denoise_block", failing)
    out = tmp_path / "x.mp4"
    with pytest.raises(RuntimeError, match="device lost"):
        tiny_generator.generate(PROMPT, out, progress=False)
    assert not out.exists() and (tmp_path / "x.partial.mp4").exists()


@pytest.mark.parametrize("content", [b"", b"not safetensors at all", b"\xff" * 64])
def test_corrupt_safetensors_is_one_line(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match="cannot read .* as safetensors") as error:
        StreamingGenerator.from_config("tiny", checkpoint=str(path), device="cpu")
    one_line(error)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "shard.safetensors").write_bytes(content)
    with pytest.raises(UserError, match="cannot read .* as safetensors"):
        StreamingGenerator.from_config("tiny", checkpoint=str(folder), device="cpu")


@pytest.mark.parametrize("device", ["tpu", "banana", "xla"])
def test_unknown_devices_are_one_line(device):
    from nasa_video.loading import resolve_device

    with pytest.raises(UserError, match="--device") as error:
        resolve_device(device)
    one_line(error)


def test_a_missing_yaml_path_says_so(tmp_path):
    from nasa_video.loading import load_config

    with pytest.raises(UserError, match="model config not found: .*missing.yaml"):
        load_config(str(tmp_path / "missing.yaml"))


def test_unknown_words_are_named_once_truncated_and_never_cut(toy):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        toy.stream("a red carré and a blue square", "x" * 10_000 + " circle")
    messages = [str(w.message) for w in caught]
    assert any("'carré'" in m for m in messages)  # not "carr"
    long = [m for m in messages if "xxxx" in m]
    assert long and all(len(m) < 400 and "\n" not in m for m in long)


@pytest.mark.parametrize("negative", ["🔴", "猫", "!!!"])
def test_a_negative_that_encodes_to_nothing_is_an_error(toy, negative):
    with pytest.raises(UserError, match="encode to nothing"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            toy.stream(PROMPT, negative)


def test_a_prompt_that_encodes_to_nothing_is_an_error(toy):
    with pytest.raises(UserError, match="encode to nothing"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            toy.stream("🐱 ✨")


def test_midstream_bad_weight_is_refused_and_the_stream_goes_on(tiny_generator):
    stream = tiny_generator.stream(PROMPT, "red circle", scale=0.5, seed=0)
    blocks = iter(stream)
    next(blocks)
    with pytest.raises(UserError):
        stream.set_negative([("blue", math.nan)])
    assert next(blocks).block == 1 and stream.negatives == [("red circle", 1.0)]
    assert torch.isfinite(torch.as_tensor(stream.text_cache.layers[0].k)).all()
