"""The ComfyUI node pack against ComfyUI's own code: a tiny Wan model built by ComfyUI (comfy.model_base.WAN21 from
comfy.supported_models.WAN21_T2V, comfy.ldm.wan.model.WanModel), sampled by comfy.sample through its ModelPatcher.

ComfyUI is not a dependency: set NASA_VIDEO_COMFYUI to a ComfyUI checkout outside this repository (its Python
requirements installed, or on PYTHONPATH); without it these tests skip and say so. The folder's loader and the
input checks run everywhere.
"""
import copy
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from nasa_video import UserError
from nasa_video.comfyui import NASANegativeWan, negative_embeddings, real_length

ROOT = Path(__file__).resolve().parents[1]
COMFY = os.environ.get("NASA_VIDEO_COMFYUI")
STEPS, LAYERS, TEXT_DIM = 3, 2, 32


def test_the_folder_loads_the_node_for_comfyui():
    spec = importlib.util.spec_from_file_location("nasa_video_nodes", ROOT / "integrations" / "comfyui" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS == {"NASANegativeWan": NASANegativeWan}
    assert module.NODE_DISPLAY_NAME_MAPPINGS["NASANegativeWan"] == "NASA negative (Wan)"
    inputs = NASANegativeWan.INPUT_TYPES()
    assert inputs["required"]["model"] == ("MODEL",) and inputs["required"]["negative"] == ("CONDITIONING",)
    assert NASANegativeWan.RETURN_TYPES == ("MODEL",) and hasattr(NASANegativeWan(), NASANegativeWan.FUNCTION)


def test_conditioning_checks_need_no_comfyui():
    embeds = torch.zeros(1, 512, TEXT_DIM)
    embeds[:, :7] = 1.0
    assert real_length(embeds) == 7
    assert torch.equal(negative_embeddings([[embeds, {}]], TEXT_DIM, 512)[0], embeds)  # padding kept, as Wan reads it
    for bad, message in ((embeds, "must be a CONDITIONING"), ([[torch.ones(1, 77, 768), {}]], "width 32"),
                         ([[torch.ones(1, 600, TEXT_DIM), {}]], "over the limit of 512")):
        with pytest.raises(UserError, match=message) as info:
            negative_embeddings(bad, TEXT_DIM, 512)
        assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def comfy():
    if not COMFY:
        pytest.skip("set NASA_VIDEO_COMFYUI to a ComfyUI checkout (outside this repository) to test the node "
                    "against ComfyUI's own Wan model and ModelPatcher")
    sys.path.insert(0, COMFY)
    # ComfyUI imports every model family when its sampler loads; a few import torchvision at module level, which
    # cannot be installed beside the CPU torch of this project (README). The Wan path never calls it.
    if importlib.util.find_spec("torchvision") is None:
        for name in ("torchvision", "torchvision.ops", "torchvision.transforms"):
            stub = mock.MagicMock()
            stub.__spec__, stub.__path__ = importlib.machinery.ModuleSpec(name, None), []
            sys.modules[name] = stub
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before model_management is imported: no CUDA here
        modules = {name: importlib.import_module(f"comfy.{name}") for name in
                   ("supported_models", "model_base", "model_patcher", "sample", "model_management")}
        modules["wan"] = importlib.import_module("comfy.ldm.wan.model")
    except ImportError as error:
        pytest.skip(f"ComfyUI at {COMFY} does not import here ({error}); install its requirements.txt")
    return modules


def tiny_wan(comfy):
    config = comfy["supported_models"].WAN21_T2V({"image_model": "wan2.1", "model_type": "t2v", "dim": 64,
                                                  "ffn_dim": 128, "freq_dim": 32, "text_dim": TEXT_DIM, "in_dim": 16,
                                                  "out_dim": 16, "num_heads": 2, "num_layers": LAYERS})
    config.set_inference_dtype(torch.float32, None)
    torch.manual_seed(0)
    base = comfy["model_base"].WAN21(config, device="cpu")
    with torch.no_grad():  # ComfyUI leaves weights empty until a checkpoint loads: random ones, large enough to matter
        for p in base.diffusion_model.parameters():
            p.normal_(0, 0.1)
    cpu = torch.device("cpu")
    return comfy["model_patcher"].ModelPatcher(base, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope="module")
def setup(comfy):
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 512, TEXT_DIM, generator=g)
    negative = torch.zeros(1, 512, TEXT_DIM)
    negative[:, :12] = torch.randn(1, 12, TEXT_DIM, generator=g)  # 12 tokens, zero-padded as ComfyUI encodes
    noise = torch.randn(1, 16, 2, 8, 8, generator=g)
    return tiny_wan(comfy), [[text, {}]], [[negative, {}]], noise


def sample(comfy, model, setup, cfg=1.0):
    _, positive, negative, noise = setup
    return comfy["sample"].sample(model, noise, STEPS, cfg, "euler", "simple", positive, negative,
                                  torch.zeros_like(noise), disable_pbar=True, seed=0)


def test_scale_zero_is_the_unpatched_model_and_nasa_changes_it(comfy, setup):
    model, _, negative, _ = setup
    plain = sample(comfy, model, setup)
    (zero,) = NASANegativeWan().patch(model, negative, 0.0)
    assert torch.equal(sample(comfy, zero, setup), plain)
    (guided,) = NASANegativeWan().patch(model, negative, 1.0)
    changed = (sample(comfy, guided, setup) - plain).abs().max().item()
    assert changed > 1e-3, f"NASA at alpha 1 moved the latents by only {changed:.2e}"
    (outside,) = NASANegativeWan().patch(model, negative, 1.0, start_step=STEPS, end_step=STEPS + 5)
    assert torch.equal(sample(comfy, outside, setup), plain)  # no step in the window: untouched
    for method, scale in (("nag", 4.0), ("vsf", 1.0)):
        (other,) = NASANegativeWan().patch(model, negative, scale, method=method)
        assert (sample(comfy, other, setup) - plain).abs().max().item() > 1e-3, method


def _naive_negative_part(layer, x, negative_context, alpha):
    """-alpha W_o Z- in float64, Z- = softmax(Q K-^T / sqrt(d)) V-, K- = norm_k(k(c-)): the formula, written out."""
    a = copy.deepcopy(layer).double()
    heads = a.num_heads
    q = a.norm_q(a.q(x.double())).unflatten(2, (heads, -1)).transpose(1, 2)
    k = a.norm_k(a.k(negative_context.double())).unflatten(2, (heads, -1)).transpose(1, 2)
    v = a.v(negative_context.double()).unflatten(2, (heads, -1)).transpose(1, 2)
    z = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
    return -alpha * (z.transpose(1, 2).flatten(2) @ a.o.weight.T.double())


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_the_patched_layer_equals_the_formula(comfy, kind):
    """Guided - ComfyUI's own layer = -alpha W_o Z- (NASA is linear in Z before the output projection); for
    image-to-video the image branch is ComfyUI's own. With CFG's batch [cond, uncond] only the cond row changes."""
    ops = importlib.import_module("comfy.ops")
    torch.manual_seed(1)
    wan = comfy["wan"].WanModel(model_type=kind, dim=64, ffn_dim=128, freq_dim=32, text_dim=TEXT_DIM, in_dim=16,
                                out_dim=16, num_heads=2, num_layers=1, device="cpu", dtype=torch.float32,
                                operations=ops.disable_weight_init)
    with torch.no_grad():
        for p in wan.parameters():
            p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(2)
    negative = torch.randn(1, 9, TEXT_DIM, generator=g)

    class Patcher:  # what the node reads of a ModelPatcher, over ComfyUI's real Wan model
        def get_model_object(self, name):
            obj = wan
            for part in name.split(".")[1:]:
                obj = getattr(obj, part)
            return obj

        def clone(self):
            clone = Patcher()
            clone.object_patches = {}
            clone.add_object_patch = clone.object_patches.__setitem__
            return clone
    (patched,) = NASANegativeWan().patch(Patcher(), [[negative, {}]], 0.8)
    layer = patched.object_patches["diffusion_model.blocks.0.cross_attn"]
    original = layer.original
    x = torch.randn(2, 20, 64, generator=g)
    image = 5 if kind == "i2v" else None
    context = torch.randn(2, 16 + (image or 0), 64, generator=g)
    options = {"cond_or_uncond": [0, 1]}
    with torch.no_grad():
        got = layer(x, context, context_img_len=image, transformer_options=options)
        plain = original(x, context, context_img_len=image, transformer_options=options)
        want = _naive_negative_part(original, x[:1], wan.text_embedding(negative), 0.8)
    # the unconditional row: ComfyUI's own layer, run on that row alone (a batch of one rounds apart from two)
    uncond = ((got[1] - plain[1]).abs().max() / plain[1].abs().max()).item()
    assert uncond < 1e-6, f"the unconditional row moved by {uncond:.2e} of its size"
    diff = ((got[:1] - plain[:1]).double() - want).abs().max() / want.abs().max()
    assert diff < 1e-4, f"guided - plain differs from -alpha W_o Z- by {diff:.2e} of its size"  # fp32 vs float64


def test_the_negative_kv_once_per_run_and_the_patch_undone(comfy, setup):
    model, _, negative, _ = setup
    comfy["model_management"].unload_all_models()  # an earlier test's patched model may still be loaded
    diffusion = model.model.diffusion_model
    originals = [block.cross_attn for block in diffusion.blocks]
    plain = sample(comfy, model, setup)
    (patched,) = NASANegativeWan().patch(model, negative, 1.0)
    assert model.object_patches == {} and all(b.cross_attn is o for b, o in zip(diffusion.blocks, originals))
    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1
    hooks = [o.k.register_forward_hook(count) for o in originals]  # the layers' own K projections
    try:
        # at CFG 3 ComfyUI batches cond and uncond rows: k() runs on the uncond rows (ComfyUI's own layer) and on
        # the cond rows (guided), and on the negative once per run and layer
        for cfg, passes in ((1.0, 1), (3.0, 2)):
            calls["n"] = 0
            sample(comfy, patched, setup, cfg=cfg)
            assert calls["n"] == passes * STEPS * LAYERS + LAYERS, (cfg, calls["n"])
    finally:
        for h in hooks:
            h.remove()
    comfy["model_management"].unload_all_models()  # ComfyUI undoes object patches when it unloads the model
    assert all(b.cross_attn is o for b, o in zip(diffusion.blocks, originals))
    assert torch.equal(sample(comfy, model, setup), plain)


def test_bad_input_is_one_line_and_patches_nothing(comfy, setup):
    model, _, negative, _ = setup
    cpu = torch.device("cpu")
    not_wan = comfy["model_patcher"].ModelPatcher(torch.nn.Module(), load_device=cpu, offload_device=cpu)
    not_wan.model.diffusion_model = torch.nn.Linear(2, 2)
    cases = [(lambda: NASANegativeWan().patch(not_wan, negative, 0.5), "patches Wan models"),
             (lambda: NASANegativeWan().patch(model, negative[0][0], 0.5), "must be a CONDITIONING"),
             (lambda: NASANegativeWan().patch(model, [[torch.ones(1, 77, 768), {}]], 0.5), "width 32"),
             (lambda: NASANegativeWan().patch(model, [[torch.ones(1, 600, TEXT_DIM), {}]], 0.5), "over the limit"),
             (lambda: NASANegativeWan().patch(model, negative, 5.0), "out of range for nasa"),
             (lambda: NASANegativeWan().patch(model, negative, 0.5, method="nag"), "out of range for nag"),
             (lambda: NASANegativeWan().patch(model, negative, 0.5, start_step=4, end_step=2), "start_step"),
             (lambda: NASANegativeWan().patch(model, negative + negative, 1.0, method="vsf"), "at most 1"),
             (lambda: NASANegativeWan().patch(NASANegativeWan().patch(model, negative, 0.5)[0], negative, 0.5),
              "chaining two")]
    for make, message in cases:
        with pytest.raises(UserError, match=message) as info:
            make()
        assert "\n" not in str(info.value)
        assert model.object_patches == {}


def test_install_from_the_package_writes_a_loader(tmp_path, capsys):
    from nasa_video.comfyui import main

    assert main([str(tmp_path)]) == 2 and "no custom_nodes/" in capsys.readouterr().err
    (tmp_path / "custom_nodes").mkdir()
    assert main([str(tmp_path)]) == 0
    loader = tmp_path / "custom_nodes" / "nasa_video_nodes" / "__init__.py"
    spec = importlib.util.spec_from_file_location("installed_nasa_nodes", loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS == {"NASANegativeWan": NASANegativeWan}
    assert [p.name for p in loader.parent.iterdir()] == ["__init__.py"]  # no partial file left
