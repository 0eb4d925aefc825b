"""Checkpoints in CausVid, Self-Forcing, original Wan and diffusers layouts load exactly."""
import pytest
import torch
from safetensors.torch import save_file

from nasa_video.errors import UserError
from nasa_video.model.causal_wan import CausalWanTransformer
from nasa_video.model.checkpoint import load_generator_weights, save_generator, to_diffusers_state_dict, to_original_wan

from .conftest import TINY


def fresh():
    torch.manual_seed(123)
    return CausalWanTransformer(**TINY).eval()


def output(model, text_cache_ctx):
    from nasa_video.model.cache import TextCache
    torch.manual_seed(5)
    x, t = torch.randn(1, 4, 3, 8, 8), torch.full((1, 3), 600.0)
    with torch.no_grad():
        model.set_text(TextCache(model, text_cache_ctx))
        return model(x, t)


@pytest.mark.parametrize("layout,suffix", [("causvid", ".pt"), ("self-forcing", ".pt"), ("original-wan", ".pt"),
                                           ("original-wan", ".safetensors"), ("diffusers", ".safetensors"),
                                           ("diffusers", ".pt")])
def test_round_trip(tmp_path, tiny_model, contexts, layout, suffix):
    path = tmp_path / f"model{suffix}"
    save_generator(tiny_model.state_dict(), path, layout)
    model = fresh()
    found = load_generator_weights(model, str(path))  # strict: raises on any missing / unexpected key
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_model.state_dict().values()))
    torch.testing.assert_close(output(model, contexts[0]), output(tiny_model, contexts[0]), rtol=0, atol=0)
    assert ("original Wan" in found) == (layout != "diffusers")


def test_self_forcing_prefers_ema(tiny_model):
    state = {f"model.{k}": v for k, v in to_original_wan(tiny_model.state_dict()).items()}
    ema = {k: v + 1 for k, v in state.items()}
    converted, layout = to_diffusers_state_dict({"generator": state, "generator_ema": ema})
    assert "generator_ema" in layout
    key = "blocks.0.attn1.to_q.weight"
    assert torch.equal(converted[key], tiny_model.state_dict()[key] + 1)


def test_inverse_names_agree_with_diffusers_converter(tiny_model):
    state = tiny_model.state_dict()
    original = to_original_wan(state)
    assert "blocks.0.self_attn.q.weight" in original and "head.head.weight" in original
    assert "blocks.0.norm3.weight" in original  # the cross-attention norm is norm3 in original Wan
    converted, _ = to_diffusers_state_dict(original)
    assert set(converted) == set(state)


def test_fsdp_wrapper_prefixes_are_stripped(tiny_model):
    wrapped = {f"model._fsdp_wrapped_module.{k}": v for k, v in to_original_wan(tiny_model.state_dict()).items()}
    converted, _ = to_diffusers_state_dict({"generator": wrapped})
    assert set(converted) == set(tiny_model.state_dict())


def test_unknown_layout_error(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2)}, str(path))
    with pytest.raises(UserError, match=r"unknown checkpoint layout .* first keys: encoder.layer.0.weight"):
        load_generator_weights(fresh(), str(path))


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    state.pop("blocks.1.attn2.to_k.weight")
    state["blocks.9.attn1.to_q.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"1 missing \(blocks.1.attn2.to_k.weight\); 1 unexpected \(blocks.9"):
        load_generator_weights(fresh(), state)


def test_mismatched_shapes_are_named(tiny_model):
    state = dict(tiny_model.state_dict())
    state["proj_out.bias"] = torch.zeros(3)
    with pytest.raises(UserError, match=r"mis-shaped \(proj_out.bias \(3,\) vs \(16,\)\)"):
        load_generator_weights(fresh(), state)


def test_torch_load_is_weights_only(tmp_path):
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"generator": Payload()}, str(path))
    with pytest.raises(UserError, match="weights-only"):
        load_generator_weights(fresh(), str(path))


def test_missing_file_error(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_generator_weights(fresh(), str(tmp_path / "nope.pt"))
