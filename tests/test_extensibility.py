"""A new guidance method and a new generator architecture are each added from this file alone, and run through
the public API, the CLI and the benchmark without any change to the library."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from nasa_video.guidance import METHODS, Guidance, attend_all_prompts, nasa, register_method
from nasa_video.loading import load_config

from .conftest import assert_close_to_scale

PROMPT = "a red circle and a blue square"


class HalfNASA(Guidance):
    """NASA at half the scale it is given: Z+ - sum_i (alpha_i / 2) Z-_i. Its own setting: the divisor."""

    name = "half-nasa"
    scale_range = (0.0, 6.0)
    bench_scale = 1.0
    calls = 0

    def __init__(self, divisor: float = 2.0):
        self.divisor = divisor

    def cross_attention(self, q, kv, alphas):
        HalfNASA.calls += 1
        z = attend_all_prompts(q, kv)
        return nasa(z[:, :, 0], z[:, :, 1:], [a / self.divisor for a in alphas])


@pytest.fixture
def half_nasa():
    register_method(HalfNASA)
    HalfNASA.calls = 0
    yield HalfNASA
    METHODS.pop(HalfNASA.name)


def test_a_registered_method_streams_through_the_pipeline(half_nasa, tiny_generator):
    """half-nasa at scale 1 is NASA at scale 0.5 (NASA's fused path folds alpha into V: equal to rounding), and
    it really ran."""
    negative = [("red circle", 1.0), ("blue square", 0.5)]
    mine = [c.latents for c in tiny_generator.stream(PROMPT, negative, scale=1.0, guidance="half-nasa", seed=2)]
    reference = [c.latents for c in tiny_generator.stream(PROMPT, negative, scale=0.5, guidance="nasa", seed=2)]
    plain = [c.latents for c in tiny_generator.stream(PROMPT, negative, scale=0.5, guidance="none", seed=2)]
    assert half_nasa.calls > 0
    for i, (a, b) in enumerate(zip(mine, reference)):  # alpha folded differently: rounding, grown over blocks
        assert_close_to_scale(a, b, 1e-5, f"half-nasa vs nasa, block {i}")
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(mine, plain))
    # its own setting, from the API (config settings are the same mechanism)
    from nasa_video.pipeline import method_from_config

    quarter = method_from_config(tiny_generator.cfg, "half-nasa", divisor=4.0)
    fourth = [c.latents for c in tiny_generator.stream(PROMPT, negative, scale=1.0, guidance=quarter, seed=2)]
    quarter_ref = [c.latents for c in tiny_generator.stream(PROMPT, negative, scale=0.25, guidance="nasa", seed=2)]
    for i, (a, b) in enumerate(zip(fourth, quarter_ref)):
        assert_close_to_scale(a, b, 1e-5, f"half-nasa divisor 4 vs nasa 0.25, block {i}")


def test_a_registered_method_runs_from_the_cli(half_nasa, tmp_path):
    from nasa_video.cli import main
    from nasa_video.video_io import read_video

    out = tmp_path / "half.mp4"
    assert main(["generate", "--model", "tiny", "--prompt", PROMPT, "--negative", "red circle", "--guidance",
                 "half-nasa", "--scale", "5", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    assert read_video(out).shape == (21, 64, 64, 3) and half_nasa.calls > 0
    # its scale range is its own: 7 is out of range for half-nasa, and said so in one line
    assert main(["generate", "--model", "tiny", "--prompt", PROMPT, "--negative", "red circle", "--guidance",
                 "half-nasa", "--scale", "7", "--quiet", "--device", "cpu", "--out", str(tmp_path / "x.mp4")]) == 2


def test_a_registered_method_streams_in_a_batch_beside_the_built_in_ones(half_nasa, tiny_generator):
    """half-nasa rows beside NAG and NASA rows in one forward per step (each method plans its own rows): every
    video is the one it makes alone."""
    specs = [dict(prompt=PROMPT, negative="red circle", scale=1.0, seed=2, method="half-nasa"),
             dict(prompt=PROMPT, negative="blue square", scale=5.0, seed=3, method="nag"),
             dict(prompt=PROMPT, negative=[("red circle", 1.0), ("blue square", 0.5)], scale=0.5, seed=4)]
    batch = list(tiny_generator.stream_batch(specs, decode=False))
    assert half_nasa.calls > 0
    for i, spec in enumerate(specs):
        alone = tiny_generator.stream(PROMPT, spec["negative"], spec["scale"], spec.get("method"), seed=spec["seed"],
                                      decode=False)
        for block, chunk in enumerate(alone):
            assert_close_to_scale(batch[block][i].latents, chunk.latents, 1e-5, f"{i} block {block}")


def test_a_registered_method_streams_through_the_server_beside_another_job(half_nasa, tiny_generator, tmp_path):
    """The server has no batched / unbatched split: a half-nasa job and a NAG job share the batch (every forward
    has both rows once both run), and each job's frames are its stream's alone."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from nasa_video.server import Limits, VideoServer, create_app

    from .test_server import assert_frames_match, frames_of, start, until

    server = VideoServer(tiny_generator, tmp_path / "clips", Limits(max_blocks=6, max_streams=2))
    rows, forward = [], tiny_generator.model.forward

    def counting(x, *args, **kwargs):
        rows.append(x.shape[0])
        return forward(x, *args, **kwargs)

    tiny_generator.model.forward = counting
    try:
        with TestClient(create_app(server)) as client:
            mine = start(client, method="half-nasa", scale=2.0, seed=1, blocks=3)
            other = start(client, method="nag", scale=5.0, seed=2, blocks=3, prompt="a blue square")
            with client.websocket_connect(f"/api/jobs/{mine}/stream") as a, \
                    client.websocket_connect(f"/api/jobs/{other}/stream") as b:
                _, a_seen = until(a, "done")
                _, b_seen = until(b, "done")
    finally:
        tiny_generator.model.forward = forward
    assert 2 in rows and half_nasa.calls > 0
    for seen, args in ((a_seen, ("a red circle", ["noise"], 2.0, "half-nasa", 33, 1)),
                       (b_seen, ("a blue square", ["noise"], 5.0, "nag", 33, 2))):
        blocks = [m for m in seen if m["type"] == "block"]
        for block, chunk in zip(blocks, tiny_generator.stream(*args, rolling=True), strict=True):
            assert_frames_match(frames_of(block), chunk.frames)


def test_a_registered_method_is_benchmarked(half_nasa):
    from nasa_video.bench import video_flops

    cfg = load_config("tiny")
    assert video_flops(cfg, "half-nasa") == video_flops(cfg, "nasa") > video_flops(cfg, "none")


# ---- a second generator architecture ----------------------------------------------------------------------
from nasa_video.model import ARCHITECTURES, Architecture, register_architecture  # noqa: E402
from nasa_video.model.causal_wan import CausalWanTransformer, cast_generator  # noqa: E402
from nasa_video.model.checkpoint import LAYOUTS, Layout, register_layout, save_generator  # noqa: E402


class PixelWan(CausalWanTransformer):
    """A Wan variant that patches each latent pixel on its own (patch 1x1): four times the tokens of tiny."""


def _build_pixel_wan(section: dict) -> PixelWan:
    return PixelWan(**{**section, "patch_size": (1, 1, 1)})


@pytest.fixture
def pixel_wan(tmp_path):
    register_architecture(Architecture("pixel-wan", _build_pixel_wan, cast_generator,
                                       reset_buffers=ARCHITECTURES["wan"].reset_buffers,  # Wan's RoPE tables
                                       description="Wan with 1x1 patches (test)"))
    register_layout("pixel-wan", Layout("own names", lambda keys: any(".attn2." in k for k in keys), dict))
    cfg = OmegaConf.to_container(load_config("tiny"))
    cfg["name"] = "pixel-wan-tiny"
    cfg["generator"]["arch"] = "pixel-wan"
    del cfg["generator"]["patch_size"]
    path = tmp_path / "pixel_wan.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    yield path
    ARCHITECTURES.pop("pixel-wan")
    LAYOUTS.pop("pixel-wan")


def test_a_registered_architecture_streams_with_nasa(pixel_wan, tmp_path):
    from nasa_video import StreamingGenerator

    gen = StreamingGenerator.from_config(str(pixel_wan), device="cpu", dtype="fp32", attention_backend="sdpa")
    assert type(gen.model) is PixelWan and gen.model.tokens_per_frame(8, 8) == 64
    chunks = list(gen.stream(PROMPT, negative="red circle", scale=0.8, seed=1))
    plain = list(gen.stream(PROMPT, negative="red circle", scale=0.0, seed=1))
    assert [c.frames.shape for c in chunks] == [(9, 64, 64, 3), (12, 64, 64, 3)]
    assert all(np.isfinite(c.latents.numpy()).all() for c in chunks)
    assert any((a.latents - b.latents).abs().max() > 1e-4 for a, b in zip(chunks, plain))  # NASA acts

    # its checkpoints load through its own registered layout, strictly, and give the same video
    checkpoint = tmp_path / "pixel.safetensors"
    save_generator(gen.model.state_dict(), checkpoint)
    loaded = StreamingGenerator.from_config(str(pixel_wan), checkpoint=str(checkpoint), device="cpu", dtype="fp32")
    again = list(loaded.stream(PROMPT, negative="red circle", scale=0.8, seed=1))
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(chunks, again))


# ---- a generator that is not Wan: only the Generator protocol -----------------------------------------------
class MiniAttention(torch.nn.Module):
    """What a cross-attention processor reads of its layer (diffusers' Attention names): to_q, to_k, to_v, norm_q,
    norm_k, to_out, heads."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.norm_q = self.norm_k = torch.nn.Identity()
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(dim, dim)])
        self.processor = None


class MiniLayer(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.out, self.attn2 = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), \
            MiniAttention(dim, heads)

    def forward(self, x, cache, layer, mask):
        from nasa_video.attention import attend

        q, k, v = (t.unflatten(2, (self.heads, -1)) for t in self.qkv(x).chunk(3, -1))
        k, v = cache.write(layer, k, v)
        x = x + self.out(attend(q, k, v, mask).flatten(2))
        return x + self.attn2.processor(self.attn2, x)


class MiniGenerator(torch.nn.Module):
    """A per-pixel MLP-and-attention generator with none of Wan's modules: every latent pixel is a token, no
    positional encoding, one linear time embedding. It implements the Generator protocol and nothing more."""

    def __init__(self, in_channels: int = 4, text_dim: int = 32, dim: int = 16, heads: int = 2, num_layers: int = 2,
                 max_frame_positions: int = 64):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(in_channels=in_channels, out_channels=in_channels, text_dim=text_dim,
                                      num_layers=num_layers, num_attention_heads=heads, attention_head_dim=dim // heads)
        self.max_frame_positions = max_frame_positions
        self.embed, self.time, self.text = (torch.nn.Linear(in_channels, dim), torch.nn.Linear(1, dim),
                                            torch.nn.Linear(text_dim, dim))
        self.layers = torch.nn.ModuleList(MiniLayer(dim, heads) for _ in range(num_layers))
        self.unembed = torch.nn.Linear(dim, in_channels)

    def forward(self, x, t, start_frame=0, kv_cache=None, attn_mask=None, frame_positions=None, prompts=None):
        b, c, f, h, w = x.shape
        tokens = self.embed(x.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c))
        tokens = tokens + self.time((t.float() / 1000).repeat_interleave(h * w, 1)[..., None])
        kv_cache.place(start_frame, f)
        mask = kv_cache.key_mask()
        for i, layer in enumerate(self.layers):
            tokens = layer(tokens, kv_cache, i, mask)
        return self.unembed(tokens).reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)

    def text_kv(self, context):
        from nasa_video.model.cross_attention import text_kv

        projected = self.text(context.to(self.text.weight.dtype))
        return [text_kv(layer.attn2, projected) for layer in self.layers]

    def set_cross_attention(self, processors):
        for layer, processor in zip(self.layers, processors, strict=True):
            layer.attn2.processor = processor

    def set_text(self, text):
        self.set_cross_attention(text.processors)

    def set_guidance(self, method, alphas=()):
        from nasa_video.model.cross_attention import plain_processors

        self.set_cross_attention(plain_processors(len(self.layers), method, alphas))

    def tokens_per_frame(self, latent_height, latent_width):
        return latent_height * latent_width

    def new_kv_cache(self, batch, capacity_frames, latent_height, latent_width, rolling=False, sink_frames=0,
                     dtype=None, device=None):
        from nasa_video.model.cache import SelfAttentionCache

        c = self.config
        tokens = self.tokens_per_frame(latent_height, latent_width)
        return SelfAttentionCache(c.num_layers, batch, capacity_frames, tokens, c.num_attention_heads,
                                  c.attention_head_dim, dtype or self.embed.weight.dtype,
                                  device or self.embed.weight.device, rolling, sink_frames)


@pytest.fixture
def mini(tmp_path):
    from nasa_video.model import Generator

    def build(section):
        return MiniGenerator(**section)

    def cast(model, device, dtype):
        return model.to(device=device, dtype=dtype)

    register_architecture(Architecture("mini", build, cast, description="not Wan (test)"))
    cfg = OmegaConf.to_container(load_config("tiny"))
    cfg["name"] = "mini"
    cfg["generator"] = {"arch": "mini", "in_channels": 4, "text_dim": cfg["generator"]["text_dim"]}
    path = tmp_path / "mini.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    assert isinstance(MiniGenerator(), Generator)
    yield path
    ARCHITECTURES.pop("mini")


def test_a_generator_with_only_the_protocol_streams_batches_and_benchmarks(mini):
    """Nothing Wan-specific is needed by the stream, the batch or the benchmark: a generator that implements only
    the Generator protocol streams with NASA (which acts), makes the same videos in a batch as alone, and is
    timed by the speed report."""
    from nasa_video import StreamingGenerator
    from nasa_video.bench import speed_report

    gen = StreamingGenerator.from_config(str(mini), device="cpu", dtype="fp32", attention_backend="sdpa")
    assert type(gen.model) is MiniGenerator
    guided = list(gen.stream(PROMPT, "red circle", 1.0, seed=1))
    plain = list(gen.stream(PROMPT, "red circle", 0.0, seed=1))
    assert [c.frames.shape for c in guided] == [(9, 64, 64, 3), (12, 64, 64, 3)]
    assert any((a.latents - b.latents).abs().max() > 1e-4 for a, b in zip(guided, plain))  # NASA acts
    specs = [dict(prompt=PROMPT, negative="red circle", scale=1.0, seed=1), dict(prompt=PROMPT, seed=2)]
    batch = list(gen.stream_batch(specs, decode=False))
    for block, chunk in enumerate(guided):
        assert_close_to_scale(batch[block][0].latents, chunk.latents, 1e-5, f"batch vs alone, block {block}")
    report = speed_report(gen, ["none", "nasa"], repeats=1, flops={"none": 1, "nasa": 1})
    assert set(report["methods"]) == {"none", "nasa"}
    # without shift_positions a rolling batch cannot re-base, so its shared positions would run out for a late
    # stream: it takes no one in once running
    rolling = gen.stream_batch(specs, rolling=True, decode=False)
    rolling.step()
    assert not rolling.accepts_joins
