"""bf16 vs fp32 streaming VAE decode on random Wan VAE weights: the error behind vae.BF16_DECODE_TOLERANCE.

    python scripts/vae_precision.py [--device cuda] [--full] [--latent-frames 21] [--size 60 104] [--json F]

--full uses diffusers' default AutoencoderKLWan (Wan2.1's architecture, 16 latent channels) with random
weights; without it, the tiny config's VAE. Latents are standard normal (the generator's latents are
per-channel standardised), decoded block by block as the pipeline does.
"""
import argparse
import json
import time

import torch
from omegaconf import OmegaConf


def main() -> None:
    from diffusers import AutoencoderKLWan

    from nasa_video.loading import load_config
    from nasa_video.vae import decode_precision

    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--full", action="store_true")
    p.add_argument("--latent-frames", type=int, default=6)
    p.add_argument("--size", type=int, nargs=2, default=[8, 8], help="latent height width")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        if args.full:
            vae = AutoencoderKLWan()
        else:
            vae = AutoencoderKLWan(**OmegaConf.to_container(load_config("tiny").weights.vae, resolve=True))
        vae = vae.to(args.device).eval()
        z = torch.randn(1, vae.config.z_dim, args.latent_frames, *args.size,
                        generator=torch.Generator().manual_seed(100 + seed)).to(args.device)
        start = time.perf_counter()
        report = decode_precision(vae, z, 3)
        report.update(seed=seed, seconds=time.perf_counter() - start)
        print(json.dumps(report))
        results.append(report)
    summary = {"vae": "wan2.1 (random weights)" if args.full else "tiny (random weights)", "device": args.device,
               "latent_shape": [args.latent_frames, *args.size], "max_abs": max(r["max_abs"] for r in results),
               "mean_abs": max(r["mean_abs"] for r in results), "max_uint8": max(r["max_uint8"] for r in results),
               "within_tolerance": all(r["within_tolerance"] for r in results), "runs": results}
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
