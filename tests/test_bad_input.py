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
def toy(make_generator):
    return make_generator("toy")


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
    from nasa_video.engine import BlockEngine

    original = BlockEngine._denoise
    calls = []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return original(self, *args)

    monkeypatch.setattr(BlockEngine, "_denoise", failing)
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


@pytest.mark.parametrize("scale,message", [
    ("abc", "not a finite number"), ([], "empty list"), ([[0.5], []], "scale list is empty"),
    ([0.5, math.nan], "not a finite number"), ({"a": 1}, "not a finite number"),
])
def test_malformed_scales_are_one_line(tiny_generator, scale, message):
    with pytest.raises(UserError, match=message) as error:
        tiny_generator.stream(PROMPT, "red circle", scale=scale)
    one_line(error)
    stream = tiny_generator.stream(PROMPT, "red circle", scale=0.5)
    with pytest.raises(UserError, match=message):
        stream.set_scale(scale)  # mid-stream too


@pytest.mark.parametrize("value", [math.nan, 9.0])
def test_a_scale_function_out_of_range_stops_the_block_in_one_line(tiny_generator, value):
    stream = tiny_generator.stream(PROMPT, "red circle", scale=lambda block, step: 0.5 if block == 0 else value)
    chunks = []
    with pytest.raises(UserError, match="scale function gave nan|out of range for nasa") as error:
        for chunk in stream:
            chunks.append(chunk)
    one_line(error)
    assert len(chunks) == 1  # block 0 was made; block 1 was refused, not drawn with a broken scale


@pytest.mark.parametrize("negative", [[("red circle", 1.0, "extra")], [(1, 2)], [("red", "heavy")], 42])
def test_malformed_negatives_are_one_line(tiny_generator, negative):
    with pytest.raises(UserError, match="negative") as error:
        tiny_generator.stream(PROMPT, negative, scale=0.5)
    one_line(error)


def test_the_sum_of_weighted_negatives_is_bounded(tiny_generator):
    with pytest.raises(UserError, match="subtract 12 in all") as error:
        tiny_generator.stream(PROMPT, ["red circle"] * 4, scale=3.0)
    one_line(error)
    assert len(list(tiny_generator.stream(PROMPT, ["red circle"] * 3, scale=1.0))) == 2  # 3 in all: allowed


@pytest.mark.parametrize("settings,message", [
    (("nag", {"tau": 0.0}), "tau=0 is out of range"), (("nag", {"blend": 100.0}), "blend=100 is out of range"),
    (("nag", {"sigma_end": -0.5}), "sigma_end=-0.5 is out of range"), (("vsf", {"bias": 1e30}), "out of range"),
    (("vsf", {"bias": "high"}), "not a finite number"),
])
def test_method_settings_are_range_checked(settings, message):
    from nasa_video.guidance import make_guidance

    name, values = settings
    with pytest.raises(UserError, match=message) as error:
        make_guidance(name, **values)
    one_line(error)


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    from safetensors.torch import save_file

    gen = StreamingGenerator.from_config("tiny", device="cpu")
    state = {k: v.clone() for k, v in gen.model.state_dict().items()}
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key].view(-1)[0] = float("nan")
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(UserError, match="NaN or infinite weights") as error:
        StreamingGenerator.from_config("tiny", checkpoint=str(path), device="cpu")
    assert key in one_line(error)


@pytest.mark.parametrize("name,message", [("video.mp4", "must end in .safetensors"),
                                          ("missing/video.safetensors", "does not exist")])
def test_latent_output_checks_its_path_before_the_video(tiny_generator, tmp_path, name, message):
    with pytest.raises(UserError, match=message) as error:
        tiny_generator.generate(PROMPT, tmp_path / name, output_type="latent", progress=False)
    one_line(error)
    assert not list(tmp_path.rglob("*"))


def test_an_over_long_scheduled_prompt_is_refused_before_the_first_block(tiny_generator, tmp_path):
    with pytest.raises(UserError, match="tokens") as error:
        tiny_generator.generate(PROMPT, tmp_path / "x.mp4", prompt_at={1: "x" * 80}, progress=False)
    one_line(error)
    assert not list(tmp_path.iterdir())  # not even x.partial.mp4


def test_embeddings_of_another_length_are_refused_up_front_and_mid_stream(tiny_generator):
    """The prompt and every negative share one text cache: embeddings must have the encoder's own length (today's
    alternative was a raw RuntimeError one block later)."""
    dim = tiny_generator.model.config.text_dim
    length = tiny_generator.text.max_length
    short = torch.randn(1, length - 3, dim)
    with pytest.raises(UserError, match=f"has {length - 3} tokens") as error:
        tiny_generator.stream(PROMPT, negative_prompt_embeds=short, scale=0.5)
    one_line(error)
    with pytest.raises(UserError, match=f"pad it with zero rows to {length}"):
        tiny_generator.stream(None, prompt_embeds=short)
    stream = tiny_generator.stream(PROMPT, "red circle", scale=0.5)
    for change in (lambda: stream.set_negative(None, negative_prompt_embeds=short),
                   lambda: stream.set_prompt(prompt_embeds=short)):
        with pytest.raises(UserError, match="tokens"):
            change()
    assert len(list(stream)) == 2  # the stream goes on with what it had
    padded = torch.cat([short, torch.zeros(1, 3, dim)], 1)  # padded as the encoder pads: accepted
    assert len(list(tiny_generator.stream(PROMPT, negative_prompt_embeds=padded, scale=0.5))) == 2


@pytest.mark.parametrize("fill", [math.nan, 1e6])
def test_nan_or_huge_latents_are_refused(tiny_generator, fill):
    shape = (1, 4, 6, 8, 8)
    with pytest.raises(UserError, match="NaN, infinite or huge") as error:
        tiny_generator.stream(PROMPT, latents=torch.full(shape, fill))
    one_line(error)


def test_seed_and_generator_together_are_refused(tiny_generator):
    with pytest.raises(UserError, match="seed or generator, not both") as error:
        tiny_generator.stream(PROMPT, seed=3, generator=torch.Generator().manual_seed(3))
    one_line(error)
    assert len(list(tiny_generator.stream(PROMPT, generator=torch.Generator().manual_seed(3)))) == 2


def test_changes_after_the_stream_ended_say_so(tiny_generator):
    stream = tiny_generator.stream(PROMPT, "red circle", scale=0.5)
    assert len(list(stream)) == 2
    for change in (lambda: stream.set_prompt("a blue square"), lambda: stream.set_negative("blue square"),
                   lambda: stream.set_scale(1.0)):
        with pytest.raises(UserError, match="after the stream ended") as error:
            change()
        one_line(error)


def test_a_meta_device_and_a_list_as_a_stream_name_are_one_line(tiny_generator):
    with pytest.raises(UserError, match="runs on cpu or cuda") as error:
        StreamingGenerator.from_config("tiny", device="meta")
    one_line(error)
    with pytest.raises(UserError, match="a stream's name is a string or a number") as error:
        tiny_generator.stream_batch([{"name": ["a"], "prompt": PROMPT}])
    one_line(error)


def test_a_stream_runs_once(tiny_generator):
    stream = tiny_generator.stream(PROMPT, decode=False)
    assert len(list(stream)) >= 1
    with pytest.raises(UserError, match="a stream runs once"):
        list(stream)
