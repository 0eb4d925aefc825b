import pytest
import torch

from nasa_video.model.cache import TextCache
from nasa_video.model.causal_wan import CausalWanTransformer

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    model = CausalWanTransformer(**TINY).eval().requires_grad_(False)
    # Random init leaves the output projections tiny; widen them so guidance visibly matters in tests.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="session")
def contexts():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, 16, TINY["text_dim"], generator=g) for _ in range(3)]


@pytest.fixture
def text_cache(tiny_model, contexts):
    cache = TextCache(tiny_model, contexts[0])
    cache.set_negatives(["neg a", "neg b"], [1.0, 0.5], contexts[1:])
    return cache


def guided(model, text_cache, method=None, scale: float = 0.0):
    """The model with this text cache's processors installed, guided by method at scale (none by default)."""
    from nasa_video.guidance import NoGuidance
    model.set_text(text_cache.guide(method or NoGuidance(), scale))
    return model


_GENERATORS: dict = {}


def shared_generator(model: str = "tiny", overrides: dict | None = None, **options):
    """One StreamingGenerator per (model, overrides, options) for the whole session: tests that only stream share
    it (a build costs 0.1-0.4 s, and the suite asked for dozens). Random-weight configs are built under seed 0 in a
    forked RNG, so their weights do not depend on which test came first. A test that changes its generator (its
    decoder, compile, dtype) builds its own with StreamingGenerator.from_config."""
    import json

    from nasa_video.pipeline import StreamingGenerator

    options = {"device": "cpu", "dtype": "fp32", "attention_backend": "sdpa", **options}
    key = (model, json.dumps(overrides, sort_keys=True), json.dumps(options, sort_keys=True))
    if key not in _GENERATORS:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            _GENERATORS[key] = StreamingGenerator.from_config(model, overrides=overrides, **options)
    return _GENERATORS[key]


@pytest.fixture(scope="session")
def make_generator():
    return shared_generator


@pytest.fixture(scope="session")
def tiny_generator():
    return shared_generator("tiny")


def write_latent_clips(folder, captions, count=4, shape=(4, 6, 8, 8)):
    """A ClipFolder for the DMD command on the tiny config: random latents, captions in the metadata."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        save_file({"latents": torch.randn(*shape, generator=g)}, str(folder / f"{i}.safetensors"),
                  metadata={"caption": captions[i % len(captions)]})
    return folder


def collect_chunks(stream, at=None, action=None):
    """Every chunk of a stream; action(stream) runs after the chunk before block `at` (a change from block at)."""
    out = []
    for chunk in stream:
        out.append(chunk)
        if at is not None and chunk.block + 1 == at:
            action(stream)
    return out


def assert_close_to_scale(got, want, rel: float, what: str = "tensor") -> None:
    """got == want up to rel of want's largest magnitude: for outputs that pass through many layers, steps and
    blocks, where rounding (another vector width, thread count or summation order) grows with the values."""
    scale = max(want.double().abs().max().item(), 1e-12)
    diff = (got.double() - want.double()).abs().max().item()
    assert diff <= rel * scale, f"{what}: max |difference| {diff:.3g} > {rel:g} x {scale:.3g}"
