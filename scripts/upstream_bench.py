"""nasa-video beside upstream Self-Forcing's own inference loop, on one device in one run.

    python scripts/upstream_bench.py --repo PATH_TO_SELF_FORCING [--device cuda] [--repeats 3] [--json out.json]
    python scripts/upstream_bench.py --repo PATH --device cpu --smoke      (tiny sizes: checks the script, no figures)

Both sides run the DiT at full size with random weights in their own layout (upstream: its CausalWanModel, 30
layers of Wan2.1-T2V-1.3B; nasa-video: the self-forcing config), bf16 on CUDA: 81 frames at 480x832 = 21 latent
frames, 7 blocks of 3, 4 steps and the cache pass per block. The decode is left out on both sides (upstream's VAE
is a stand-in returning the latents; nasa-video runs decode=False), and the text encoders are stand-ins returning
seeded random embeddings, so what is timed is the denoising loop each project ships. Upstream's attention calls go
to nasa_video.attention.attend (scripts/upstream_shims.py): the same kernel (flash-attn 3 / 2 where installed,
else SDPA) on both sides. Runs interleave (none, NASA, upstream, rotating), after one warm-up each; medians.
Prints seconds per video, fps, and nasa-video none / upstream and nasa-video NASA / upstream (below 1: faster).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Wan2.1-T2V-1.3B in upstream's argument names (its wan_models/Wan2.1-T2V-1.3B/config.json)
FULL = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=1536, ffn_dim=8960, freq_dim=256,
            text_dim=4096, out_dim=16, num_heads=12, num_layers=30)
SMOKE = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=64, in_dim=4, dim=48, ffn_dim=96, freq_dim=32,
             text_dim=32, out_dim=4, num_heads=2, num_layers=2)
PROMPT = "a fox running through snow"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def upstream_pipeline(repo: str, device, dtype, smoke: bool, latent_hw: tuple[int, int], fpb: int):
    """Upstream's CausalInferencePipeline around its own CausalWanModel (random weights, built on the device: no
    5 GB checkpoint on disk), with stand-ins for its text encoder and VAE."""
    from omegaconf import OmegaConf

    from upstream_shims import shim_self_forcing

    up = shim_self_forcing(repo)
    arch = SMOKE if smoke else FULL
    torch.manual_seed(0)
    with torch.device(device):
        model = up.cm.CausalWanModel(**arch, local_attn_size=-1, sink_size=0)
    model = model.to(dtype).eval().requires_grad_(False)

    class Prebuilt:  # what WanDiffusionWrapper loads with from_pretrained("wan_models/...")
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return model

    up.ww.CausalWanModel = Prebuilt
    wrapper = up.ww.WanDiffusionWrapper(is_causal=True).to(device)
    embeds = torch.randn(1, arch["text_len"], arch["text_dim"], generator=torch.Generator().manual_seed(1)).to(
        device, dtype)

    class Text(torch.nn.Module):
        def forward(self, text_prompts):
            return {"prompt_embeds": embeds.expand(len(text_prompts), -1, -1)}

    class LatentsOut(torch.nn.Module):
        def decode_to_pixel(self, latents, use_cache=False):
            return latents

    args = OmegaConf.create({"denoising_step_list": [1000, 750, 500, 250], "warp_denoising_step": True,
                             "num_frame_per_block": fpb, "independent_first_frame": False, "context_noise": 0})
    with contextlib.redirect_stdout(io.StringIO()):
        pipe = up.ci.CausalInferencePipeline(args, device=device, generator=wrapper, text_encoder=Text(),
                                             vae=LatentsOut())
    h, w = latent_hw
    if smoke:  # upstream sizes its caches for Wan2.1-1.3B at 480x832; give the tiny model its own
        heads, head_dim = arch["num_heads"], arch["dim"] // arch["num_heads"]
        pipe.num_transformer_blocks = arch["num_layers"]
        pipe.frame_seq_length = (h // 2) * (w // 2)
        tokens = 21 * pipe.frame_seq_length
        pipe.kv_cache1 = [{"k": torch.zeros(1, tokens, heads, head_dim, dtype=dtype, device=device),
                           "v": torch.zeros(1, tokens, heads, head_dim, dtype=dtype, device=device),
                           "global_end_index": torch.tensor([0], device=device),
                           "local_end_index": torch.tensor([0], device=device)} for _ in range(arch["num_layers"])]
        pipe.crossattn_cache = [{"k": torch.zeros(1, arch["text_len"], heads, head_dim, dtype=dtype, device=device),
                                 "v": torch.zeros(1, arch["text_len"], heads, head_dim, dtype=dtype, device=device),
                                 "is_init": False} for _ in range(arch["num_layers"])]
    return pipe, arch["in_dim"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="an upstream Self-Forcing checkout (NASA_VIDEO_SELF_FORCING)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attention", default="auto", help="nasa-video's backend, used by both sides")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device: checks the script")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not (Path(args.repo) / "pipeline" / "causal_inference.py").is_file():
        print(f"upstream_bench: {args.repo} is not a Self-Forcing checkout (no pipeline/causal_inference.py)")
        return 2

    from nasa_video import attention
    from nasa_video.bench import device_name, random_weight_generator, time_video

    device = torch.device(args.device)
    backend = attention.set_backend(args.attention)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    overrides = {"video": {"latent_frames": 21, "height": 64, "width": 64}, "cache": {"capacity_frames": 21}} \
        if args.smoke else None
    ours = random_weight_generator("tiny" if args.smoke else "self-forcing", args.device,
                                   "bf16" if dtype == torch.bfloat16 else "fp32", overrides)
    video = ours.spec.video
    h, w = video.height // video.vae_stride[1], video.width // video.vae_stride[2]
    latent_frames, fpb = video.latent_frames, video.frames_per_block
    pipe, channels = upstream_pipeline(args.repo, device, dtype, args.smoke, (h, w), fpb)
    noise = torch.randn(1, latent_frames, channels, h, w, generator=torch.Generator().manual_seed(2)).to(device, dtype)

    def upstream() -> float:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # it prints every step
            pipe.inference(noise, [PROMPT], return_latents=True)
        sync(device)
        return time.perf_counter() - start

    runs = {"none": lambda: time_video(ours, "none", decode=False).seconds,
            "nasa": lambda: time_video(ours, "nasa", decode=False).seconds,
            "upstream": upstream}
    names = list(runs)
    for name in names:  # warm-up: kernels, allocator, text caches
        runs[name]()
    seconds = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % 3:] + names[:r % 3]:
            seconds[name].append(runs[name]())
    frames = 4 * (latent_frames - 1) + 1
    median = {name: statistics.median(v) for name, v in seconds.items()}
    report = {"device": str(device), "device_name": device_name(device), "attention": backend, "dtype": str(dtype),
              "frames": frames, "latent_frames": latent_frames, "smoke": args.smoke, "repeats": args.repeats,
              "seconds": seconds, "median_s": median, "fps": {n: frames / s for n, s in median.items()},
              "none_over_upstream": median["none"] / median["upstream"],
              "nasa_over_upstream": median["nasa"] / median["upstream"]}
    print(f"DiT only, {frames} frames ({latent_frames} latent, blocks of {fpb}), {len(ours.steps)} steps (upstream "
          f"{len(pipe.denoising_step_list)}) + cache pass, "
          f"{report['device_name']}, {dtype}, attention {backend}, {args.repeats} interleaved runs"
          + (" [SMOKE: tiny sizes, not figures]" if args.smoke else ""))
    print(f"{'run':22} {'median s':>9} {'fps':>8}")
    for name, label in (("none", "nasa-video none"), ("nasa", "nasa-video NASA"), ("upstream", "upstream Self-Forcing")):
        print(f"{label:22} {median[name]:9.3f} {frames / median[name]:8.2f}")
    print(f"nasa-video none / upstream = {report['none_over_upstream']:.3f}; "
          f"nasa-video NASA / upstream = {report['nasa_over_upstream']:.3f} (below 1: nasa-video is faster)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
