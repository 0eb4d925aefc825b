"""The drop-in hook on upstream CausVid's own code: a tiny random upstream CausalWanModel run through
upstream's InferencePipeline block loop with the hook gives the same per-block x0 as nasa-video's generator
loaded from the same weights in CausVid layout, with and without NASA; scale 0 leaves upstream unchanged and
removing the hook restores the original forwards.

Upstream is CPU-hostile in a few places, which the fixture shims (nothing else of upstream is touched):
t5.py calls torch.cuda.current_device() at import; its image-to-video module imports torchvision (an empty
stand-in: unused for text-to-video); its attention functions need flash-attn / CUDA (replaced by an fp32 SDPA);
its block loop builds a tensor with device="cuda" (the device argument is dropped).
"""
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from nasa_video.cli import main

ROOT = Path(__file__).parents[1]
UPSTREAM = os.environ.get("NASA_VIDEO_CAUSVID") or str(ROOT / "third_party" / "causvid")
HAVE_UPSTREAM = (Path(UPSTREAM) / "causvid" / "models" / "wan" / "causal_model.py").is_file()
needs_upstream = pytest.mark.skipif(
    not HAVE_UPSTREAM, reason="upstream CausVid code not present: `git submodule update --init third_party/causvid` "
                              "(or set NASA_VIDEO_CAUSVID to a checkout) and pip install easydict ftfy")

STEPS = [1000, 757, 522]
TEXT_LEN, FRAMES, HW = 16, 6, 8  # latent frames 6 = 2 blocks of 3; 8x8 latents = 16 tokens per frame
TEXT_DIM = 4096  # umT5's width: upstream leaves text_dim out of its saved config, so from_pretrained needs it


def sdpa_fp32(q, k, v, *args, **kwargs):
    """Stand-in for upstream's flash_attention / attention: [B, L, N, D] in, same out, in q's dtype."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).to(q.dtype),
                                                           v.transpose(1, 2).to(q.dtype))
    return out.transpose(1, 2).contiguous()


class CpuTorch(types.ModuleType):
    """upstream's causal_inference sees this as `torch`: device="cuda" dropped, randn_like draws recorded."""

    def __init__(self, draws):
        super().__init__("torch")
        self.draws = draws

    def __getattr__(self, name):
        return getattr(torch, name)

    def ones(self, *args, device=None, **kwargs):
        return torch.ones(*args, **kwargs)

    def randn_like(self, x, **kwargs):
        out = torch.randn_like(x, **kwargs)
        self.draws.append(out.clone())
        return out


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    pytest.importorskip("easydict")
    pytest.importorskip("ftfy")
    from omegaconf import OmegaConf

    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(UPSTREAM)
        mp.setattr(torch.cuda, "current_device", lambda: "cpu")
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            if name not in sys.modules:  # imported by upstream's image-to-video code only
                mp.setitem(sys.modules, name, types.ModuleType(name))
        import causvid.models.wan.causal_inference as ci
        import causvid.models.wan.causal_model as cm
        import causvid.models.wan.wan_base.modules.model as wm
    for module, name in ((cm, "attention"), (wm, "flash_attention")):
        setattr(module, name, sdpa_fp32)

    folder = tmp_path_factory.mktemp("upstream")
    torch.manual_seed(0)
    model = cm.CausalWanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=TEXT_LEN, in_dim=4, dim=48,
                              ffn_dim=96, freq_dim=32, text_dim=TEXT_DIM, out_dim=4, num_heads=2, num_layers=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # widen the zero-initialised projections
    model.save_pretrained(folder / "wan_models" / "Wan2.1-T2V-1.3B")

    g = torch.Generator().manual_seed(3)
    prompts = {}
    for text, length in (("a cat", 5), ("a dog", 4), ("blurry", 3)):
        e = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
        e[:, length:] = 0  # upstream's text encoder zeroes the padding
        prompts[text] = e

    class StubText(torch.nn.Module):
        def forward(self, text_prompts):
            return {"prompt_embeds": torch.cat([prompts[t] for t in text_prompts])}

    class StubVAE(torch.nn.Module):
        def decode_to_pixel(self, latents):
            return latents

    args = OmegaConf.create({"model_name": "causal_wan", "generator_name": "causal_wan",
                             "denoising_step_list": STEPS + [0], "warp_denoising_step": False,
                             "num_frame_per_block": 3})
    cwd = os.getcwd()
    os.chdir(folder)  # upstream's wrapper loads wan_models/Wan2.1-T2V-1.3B/ relative to its working directory
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ci, "get_text_encoder_wrapper", lambda model_name: StubText)
            mp.setattr(ci, "get_vae_wrapper", lambda model_name: StubVAE)
            pipe = ci.InferencePipeline(args, device="cpu")
    finally:
        os.chdir(cwd)
    pipe.eval()
    pipe.num_transformer_blocks, pipe.frame_seq_length = 2, (HW // 2) ** 2
    tokens = FRAMES * pipe.frame_seq_length
    pipe.kv_cache1 = [{"k": torch.zeros(1, tokens, 2, 24), "v": torch.zeros(1, tokens, 2, 24)} for _ in range(2)]
    pipe.crossattn_cache = [{"k": torch.zeros(1, TEXT_LEN, 2, 24), "v": torch.zeros(1, TEXT_LEN, 2, 24),
                             "is_init": False} for _ in range(2)]
    draws = []
    ci.torch = CpuTorch(draws)
    torch.save({"generator": pipe.generator.state_dict()}, folder / "model.pt")  # upstream's own layout
    yield types.SimpleNamespace(pipe=pipe, draws=draws, prompts=prompts, checkpoint=folder / "model.pt", ci=ci)
    ci.torch = torch


def run_upstream(up, prompt="a cat", seed=1):
    up.draws.clear()
    torch.manual_seed(seed)
    noise = torch.randn(1, FRAMES, 4, HW, HW)
    with torch.no_grad():
        _, latents = up.pipe.inference(noise, [prompt], return_latents=True)
    return noise, list(up.draws), latents


def run_ours(up, noise, draws, negative, scale, prompt="a cat"):
    """nasa-video's generator from upstream's model.pt, fed the same noise in the same order."""
    from nasa_video.pipeline import StreamingGenerator

    gen = StreamingGenerator.from_config(
        "tiny", checkpoint=str(up.checkpoint), device="cpu", dtype="fp32", attention_backend="sdpa",
        overrides={"sampling": {"steps": STEPS, "shift": 8.0}, "generator": {"text_dim": TEXT_DIM},
                   "video": {"height": HW * 8, "width": HW * 8, "latent_frames": FRAMES}})
    for text, e in up.prompts.items():
        gen.text._memo[text] = e
    feed = []
    per_block = len(STEPS) - 1
    for b in range(FRAMES // 3):
        feed.append(noise[:, 3 * b:3 * b + 3].permute(0, 2, 1, 3, 4))
        feed += [d.view(1, 3, 4, HW, HW).permute(0, 2, 1, 3, 4) for d in draws[b * per_block:(b + 1) * per_block]]
    randn = torch.randn
    torch.randn = lambda *a, **k: feed.pop(0).clone()
    try:
        chunks = list(gen.stream(prompt, negative, scale, "nasa" if negative else "none", decode=False))
    finally:
        torch.randn = randn
    assert not feed
    return torch.cat([c.latents for c in chunks], 2).permute(0, 2, 1, 3, 4)  # upstream's [B, F, C, H, W]


@needs_upstream
def test_without_guidance_upstream_equals_nasa_video(upstream):
    noise, draws, latents = run_upstream(upstream)
    ours = run_ours(upstream, noise, draws, None, 0.0)
    torch.testing.assert_close(ours, latents.float(), rtol=1e-4, atol=1e-4)


@needs_upstream
def test_hooked_upstream_equals_nasa_video_with_nasa(upstream):
    from nasa_video.integrations import enable_guidance

    plain = run_upstream(upstream)[2]
    with enable_guidance(upstream.pipe, negative="blurry", scale=0.8) as hook:
        noise, draws, latents = run_upstream(upstream)
        assert hook._negative_kv is not None and len(hook._negative_kv) == 2
    assert (latents - plain).abs().max() > 1e-2  # the negative prompt did something
    ours = run_ours(upstream, noise, draws, "blurry", 0.8)
    torch.testing.assert_close(ours, latents.float(), rtol=1e-4, atol=1e-4)


@needs_upstream
def test_scale_zero_leaves_upstream_unchanged_and_remove_restores(upstream):
    from nasa_video.integrations import UpstreamGuidance

    plain = run_upstream(upstream)[2]
    modules = [b.cross_attn for b in upstream.pipe.generator.model.blocks]
    with UpstreamGuidance(upstream.pipe, negative="blurry", scale=0.0):
        assert all("forward" in m.__dict__ for m in modules)
        assert torch.equal(run_upstream(upstream)[2], plain)
    assert all("forward" not in m.__dict__ for m in modules)
    assert torch.equal(run_upstream(upstream)[2], plain)


@needs_upstream
def test_hook_takes_embeddings_and_a_per_block_schedule(upstream):
    from nasa_video.integrations import enable_guidance

    plain = run_upstream(upstream)[2]
    # alpha 0 on block 0, 0.8 on block 1: block 0 as without guidance, block 1 not.
    with enable_guidance(upstream.pipe, negative_embeddings=upstream.prompts["blurry"], scale=[0.0, 0.8]):
        latents = run_upstream(upstream)[2]
    torch.testing.assert_close(latents[:, :3], plain[:, :3], rtol=0, atol=0)
    assert (latents[:, 3:] - plain[:, 3:]).abs().max() > 1e-2


def test_upstream_command_names_the_fetch_command_when_the_code_is_missing(tmp_path, capsys):
    assert main(["upstream", "causvid", "--repo", str(tmp_path), "--negative", "blurry", "--",
                 "--config_path", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "git submodule update --init third_party/causvid" in err and "--repo" in err


def test_upstream_command_wraps_upstreams_inference_in_the_hook(tmp_path, monkeypatch, capsys):
    """A stand-in upstream checkout with the same file names: the entry script runs with upstream's own
    arguments, and inside pipeline.inference() the cross-attention is patched (and restored after)."""
    pkg = tmp_path / "causvid" / "models" / "wan"
    pkg.mkdir(parents=True)
    for folder in (tmp_path / "causvid", tmp_path / "causvid" / "models", pkg):
        (folder / "__init__.py").write_text("")
    (pkg / "causal_inference.py").write_text('''
import torch
class CrossAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(8, 8) for _ in range(4))
        self.norm_q, self.norm_k = torch.nn.Identity(), torch.nn.Identity()
        self.num_heads, self.head_dim = 2, 4
    def forward(self, x, context, context_lens=None, crossattn_cache=None):
        return x
class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cross_attn = CrossAttention()
class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block()])
        self.text_embedding = torch.nn.Linear(8, 8)
        self.text_len = 4
class Generator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Model()
class Text(torch.nn.Module):
    def forward(self, text_prompts):
        return {"prompt_embeds": torch.ones(1, 4, 8)}
class InferencePipeline(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.generator, self.text_encoder = Generator(), Text()
    def inference(self, prompt):
        patched = "forward" in self.generator.model.blocks[0].cross_attn.__dict__
        return patched
''')
    script = tmp_path / "minimal_inference"
    script.mkdir()
    (script / "autoregressive_inference.py").write_text('''
import sys
from causvid.models.wan.causal_inference import InferencePipeline
pipe = InferencePipeline()
print("UPSTREAM", sys.argv[1:], pipe.inference("x"))
print("AFTER", "forward" in pipe.generator.model.blocks[0].cross_attn.__dict__)
''')
    monkeypatch.setenv("NASA_VIDEO_CAUSVID", str(tmp_path))
    for name in [m for m in sys.modules if m == "causvid" or m.startswith("causvid.")]:
        monkeypatch.delitem(sys.modules, name)  # a real upstream imported by other tests; restored after
    assert main(["upstream", "causvid", "--negative", "blurry", "--scale", "0.7", "--",
                 "--prompt_file_path", "p.txt"]) == 0
    out = capsys.readouterr().out
    assert "UPSTREAM ['--prompt_file_path', 'p.txt'] True" in out and "AFTER False" in out
    for name in [m for m in sys.modules if m == "causvid" or m.startswith("causvid.")]:
        del sys.modules[name]  # the stand-in's modules


SELF_FORCING = os.environ.get("NASA_VIDEO_SELF_FORCING") or str(ROOT / "third_party" / "self_forcing")


@pytest.mark.skipif(not (Path(SELF_FORCING) / "pipeline" / "causal_inference.py").is_file(),
                    reason="upstream Self-Forcing code not present: set NASA_VIDEO_SELF_FORCING to a checkout")
def test_hook_on_upstream_self_forcing():
    import subprocess

    script = ROOT / "scripts" / "self_forcing_check.py"
    done = subprocess.run([sys.executable, str(script), SELF_FORCING], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    assert "scale 0 bit-identical: True" in line and "restores: True and True" in line, line


@pytest.mark.skipif(not (Path(SELF_FORCING) / "pipeline" / "causal_inference.py").is_file(),
                    reason="upstream Self-Forcing code not present: set NASA_VIDEO_SELF_FORCING to a checkout")
def test_the_side_by_side_bench_runs_upstream_self_forcing(tmp_path):
    """scripts/upstream_bench.py at tiny sizes on the CPU: both loops run and the report has both ratios (a check
    of the script the GPU bench runs at full size; no figure is asserted)."""
    import json
    import subprocess

    script = ROOT / "scripts" / "upstream_bench.py"
    out = tmp_path / "side.json"
    done = subprocess.run([sys.executable, str(script), "--repo", SELF_FORCING, "--device", "cpu", "--smoke",
                           "--repeats", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["median_s"]) == {"none", "nasa", "upstream"} and report["nasa_over_upstream"] > 0, report
