"""Smoke check of nasa_video.integrations on upstream Self-Forcing's own model and block loop (CPU, tiny).

    python scripts/self_forcing_check.py PATH_TO_SELF_FORCING_CHECKOUT

Shims: scripts/upstream_shims.py (torchvision stand-in, CUDA device queries, its flash-attn calls on SDPA)."""
import os, sys, tempfile
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from upstream_shims import shim_self_forcing
SF = sys.argv[1]
upstream = shim_self_forcing(SF)  # fp32 SDPA: the default attend is nasa_video's, which runs SDPA on the CPU
ci, cm = upstream.ci, upstream.cm
from omegaconf import OmegaConf

folder = tempfile.mkdtemp()
torch.manual_seed(0)
model = cm.CausalWanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=4, dim=48, ffn_dim=96, freq_dim=32,
                          out_dim=4, num_heads=2, num_layers=2)
with torch.no_grad():
    for p in model.parameters(): p.add_(torch.randn_like(p) * 0.05)
model.save_pretrained(f"{folder}/wan_models/Wan2.1-T2V-1.3B")
from utils.wan_wrapper import WanDiffusionWrapper
cwd = os.getcwd(); os.chdir(folder)
gen = WanDiffusionWrapper(is_causal=True)
os.chdir(cwd)
prompts = {t: torch.randn(1, 16, 4096) for t in ("a cat", "blurry")}
class Text(torch.nn.Module):
    def forward(self, text_prompts): return {"prompt_embeds": torch.cat([prompts[t] for t in text_prompts])}
class VAE(torch.nn.Module):
    def decode_to_pixel(self, latents, use_cache=False): return latents
args = OmegaConf.create({"denoising_step_list": [1000, 750, 500, 250], "warp_denoising_step": False,
                         "num_frame_per_block": 3, "independent_first_frame": False, "context_noise": 0})
pipe = ci.CausalInferencePipeline(args, device="cpu", generator=gen, text_encoder=Text(), vae=VAE())
pipe.num_transformer_blocks, pipe.frame_seq_length = 2, 16
pipe.kv_cache1 = [{"k": torch.zeros(1, 96, 2, 24), "v": torch.zeros(1, 96, 2, 24),
                   "global_end_index": torch.tensor([0]), "local_end_index": torch.tensor([0])} for _ in range(2)]
pipe.crossattn_cache = [{"k": torch.zeros(1, 16, 2, 24), "v": torch.zeros(1, 16, 2, 24), "is_init": False} for _ in range(2)]
def run():
    torch.manual_seed(1)
    noise = torch.randn(1, 6, 4, 8, 8)
    with torch.no_grad():
        out = pipe.inference(noise, ["a cat"], return_latents=True)
    return out[1] if isinstance(out, tuple) else out
from nasa_video.integrations import enable_guidance, UpstreamGuidance
plain = run()
with UpstreamGuidance(pipe, negative="blurry", scale=0.0):
    zero = run()
with enable_guidance(pipe, negative="blurry", scale=0.8):
    guided = run()
after = run()
mods = [b.cross_attn for b in pipe.generator.model.blocks]
print("self-forcing: scale 0 bit-identical:", torch.equal(zero, plain), "| NASA 0.8 changes x0 by max",
      f"{(guided - plain).abs().max():.3f}", "| removed hook restores:", torch.equal(after, plain),
      "and", all("forward" not in m.__dict__ for m in mods))
