"""The tiny Wan 2.1 decoder (TAEHV taew2_1) in the published layout: random weights, CPU, offline. Block-by-block
decoding equals the one-shot decode; a checkpoint in the layout loads strictly in both published formats, a
wrong or missing one is one line naming what differs and where the weights are published; the generator decodes
with it. NASA_VIDEO_TAEHV=<a checkout of github.com/madebyollin/taehv> also checks the layout and the decode
against the published module itself."""
import os
import sys
from pathlib import Path

import pytest
import torch

from nasa_video.errors import UserError
from nasa_video.tae import PUBLISHED, TinyDecoderCodec, TinyWanDecoder, load_tiny_decoder

from .conftest import assert_close_to_scale


def random_decoder(seed: int = 0) -> TinyWanDecoder:
    torch.manual_seed(seed)
    return TinyWanDecoder().eval()


def test_streamed_blocks_equal_the_one_shot_decode_and_count_frames_as_the_wan_vae():
    codec = TinyDecoderCodec(random_decoder())
    z = torch.randn(2, 16, 9, 4, 4, generator=torch.Generator().manual_seed(1))
    whole = codec.decode_video(z)
    decoder = codec.streaming_decoder()
    blocks = [decoder.decode(z[:, :, i:i + 3]) for i in (0, 3, 6)]
    assert [b.shape[2] for b in blocks] == [9, 12, 12] and whole.shape == (2, 3, 33, 32, 32)  # 1 + 4 (F - 1)
    assert_close_to_scale(torch.cat(blocks, 2), whole, 1e-6, "streamed vs one-shot")
    assert whole.min() >= -1 and whole.max() <= 1
    decoder.reset()  # a new video: its first block is trimmed again
    assert decoder.decode(z[:, :, :3]).shape[2] == 9


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_checkpoint_in_the_published_layout_loads_every_key(tmp_path, suffix):
    state = random_decoder(2).state_dict()
    # the published files store the first TGrow at time x2: its last frame's channels are the ones used
    state["decoder.7.conv.weight"] = torch.cat([torch.randn_like(state["decoder.7.conv.weight"]),
                                                state["decoder.7.conv.weight"]])
    path = tmp_path / f"taew2_1{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file
        save_file(state, str(path))
    codec = load_tiny_decoder(path, "cpu")
    loaded = codec.model.state_dict()
    assert set(loaded) == set(state)
    for key, value in loaded.items():
        want = state[key][-value.shape[0]:] if key == "decoder.7.conv.weight" else state[key]
        assert torch.equal(value, want), key


def test_a_wrong_or_missing_checkpoint_is_one_line(tmp_path):
    from safetensors.torch import save_file

    state = random_decoder().state_dict()
    cases = {"missing": {k: v for k, v in state.items() if k != "decoder.1.weight"},
             "unexpected": {**state, "decoder.99.weight": torch.zeros(1)},
             "shape": {**state, "decoder.1.weight": torch.zeros(8, 16, 3, 3)}}
    for name, broken in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(broken, str(path))
        with pytest.raises(UserError) as error:
            load_tiny_decoder(path, "cpu")
        text = str(error.value)
        assert "\n" not in text and PUBLISHED in text and str(path) in text, text
    assert "decoder.1.weight" in str(pytest.raises(UserError, load_tiny_decoder, tmp_path / "missing.safetensors",
                                                   "cpu").value)
    pointer = tmp_path / "lfs.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    for path in (pointer, tmp_path / "absent.pth"):
        with pytest.raises(UserError, match="download taew2_1 from"):
            load_tiny_decoder(path, "cpu")


def test_the_generator_decodes_with_the_tiny_decoder(tmp_path, make_generator):
    """vae='tae' puts the tiny decoder in place of the model's codec (a Wan-latent model: 16 channels); the chunks'
    frames are its decode of the chunks' latents; a model of other latents is refused in one line."""
    from safetensors.torch import save_file

    from nasa_video.pipeline import StreamingGenerator

    path = tmp_path / "taew2_1.safetensors"
    save_file(random_decoder(3).state_dict(), str(path))
    overrides = {"generator": {"in_channels": 16, "out_channels": 16}}
    gen = StreamingGenerator.from_config("tiny", device="cpu", dtype="fp32", attention_backend="sdpa",
                                         overrides=overrides, vae="tae", tae=str(path))
    assert isinstance(gen.codec, TinyDecoderCodec)
    chunks = list(gen.stream("a fox", "snow", 0.5, seed=1))
    latents = torch.cat([c.latents for c in chunks], 2)
    expected = gen.codec.decode_video(latents)
    frames = torch.cat([torch.from_numpy(c.frames) for c in chunks])
    want = ((expected[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    assert frames.shape == want.shape and (frames.int() - want.int()).abs().max() <= 1
    with pytest.raises(UserError, match="decodes Wan 2.1 latents"):
        StreamingGenerator.from_config("tiny", device="cpu", vae="tae", tae=str(path))
    with pytest.raises(UserError, match="needs its weights"):
        StreamingGenerator.from_config("tiny", device="cpu", vae="tae")


@pytest.mark.skipif(not os.environ.get("NASA_VIDEO_TAEHV"), reason="set NASA_VIDEO_TAEHV to a taehv checkout")
def test_the_layout_and_the_decode_equal_the_published_module():
    sys.path.insert(0, str(Path(os.environ["NASA_VIDEO_TAEHV"])))
    try:
        from taehv import TAEHV
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    published = TAEHV(checkpoint_path=None).eval()  # Wan 2.1's defaults: 16 channels, time x1, x2, x2
    mine = TinyWanDecoder()
    theirs = published.state_dict()
    assert {k: tuple(v.shape) for k, v in mine.state_dict().items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    mine.load_state_dict(theirs)
    z = torch.randn(1, 9, 16, 4, 4, generator=torch.Generator().manual_seed(4))  # NTCHW, as the module takes it
    with torch.no_grad():
        want = published.decode_video(z, parallel=True, show_progress_bar=False) * 2 - 1
    got = TinyDecoderCodec(mine).decode_video(z.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)
    assert_close_to_scale(got, want, 1e-6, "mine vs the published module")
