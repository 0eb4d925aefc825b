"""Cost of each guidance method for one generated video, counted rather than timed.

FLOPs come from torch.utils.flop_counter over the generator's real forward on the meta device (nothing is
allocated, so the full 1.3B CausVid config counts in seconds on a laptop): every block, every denoising
step and the cache pass, with the KV cache growing as in generation. The counter counts matrix products and
attention, not element-wise work (NAG's norms, the subtraction of NASA), which is a rounding error here.
Memory is computed: weights, self-attention KV cache(s) and text K/V.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .guidance import make_guidance
from .loading import load_config
from .model.cache import SelfAttentionCache, TextCache
from .model.causal_wan import CausalWanTransformer, parameter_count


# A scale at which each method is switched on (NAG guides only for nag_scale > 1).
ACTIVE_SCALE = {"nag": 5.0}


def video_flops(cfg, method: str, negatives: int = 1) -> int:
    """FLOPs of the generator for one video of cfg.video.latent_frames frames with the given guidance."""
    if not make_guidance(method).in_attention:  # CFG: a plain pass for each of its two contexts
        return 2 * video_flops(cfg, "none")
    g = dict(cfg.generator)
    g["patch_size"] = tuple(g["patch_size"])
    stride = cfg.video.vae_stride[1]
    h, w = cfg.video.height // stride, cfg.video.width // stride
    fpb, blocks = int(cfg.video.frames_per_block), int(cfg.video.latent_frames) // int(cfg.video.frames_per_block)
    passes_per_block = len(cfg.sampling.steps) + 1  # the denoising steps and the cache pass: same shapes
    guidance = make_guidance(method)
    with torch.device("meta"):
        model = CausalWanTransformer(**g)
        text = TextCache(model, torch.zeros(1, cfg.weights.text_max_length, g["text_dim"]))
        if method != "none":
            text.set_negatives(["negative"] * negatives, [1.0] * negatives,
                               [torch.zeros(1, cfg.weights.text_max_length, g["text_dim"])] * negatives)
        cache = model.new_kv_cache(1, int(cfg.cache.capacity_frames), h, w, device="meta")
        total = 0
        for block in range(blocks):
            x = torch.zeros(1, g["in_channels"], fpb, h, w)
            t = torch.full((1, fpb), 500.0)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(x, t, text.layers, guidance, text.alphas(ACTIVE_SCALE.get(method, 1.0)), block * fpb, cache)
            total += counter.get_total_flops() * passes_per_block
    return int(total)


def memory_bytes(cfg, method: str, dtype=torch.bfloat16, negatives: int = 1) -> int:
    g = cfg.generator
    stride = cfg.video.vae_stride[1]
    tokens_per_frame = (cfg.video.height // stride // g.patch_size[1]) * (cfg.video.width // stride // g.patch_size[2])
    generator = {k: tuple(v) if k == "patch_size" else v for k, v in dict(g).items()}
    weights = parameter_count(generator) * dtype.itemsize
    kv_caches = 1 if make_guidance(method).in_attention else 2  # CFG keeps a second self-attention cache
    kv = kv_caches * SelfAttentionCache.nbytes_for(g.num_layers, 1, cfg.cache.capacity_frames, tokens_per_frame,
                                                   g.num_attention_heads, g.attention_head_dim, dtype)
    prompts = 1 + (negatives if method != "none" else 0)
    text = 2 * g.num_layers * prompts * cfg.weights.text_max_length * g.num_attention_heads * g.attention_head_dim
    return int(weights + kv + text * dtype.itemsize)


def flops_report(model: str = "causvid", methods=("none", "nasa", "nag", "vsf", "cfg")) -> dict:
    cfg = load_config(model)
    results = {m: {"flops": video_flops(cfg, m), "memory_bytes": memory_bytes(cfg, m)} for m in methods}
    base = results["none"]["flops"] if "none" in results else None
    for r in results.values():
        r["ratio"] = r["flops"] / base if base else None
    return {"model": cfg.name, "latent_frames": int(cfg.video.latent_frames), "steps": list(cfg.sampling.steps),
            "resolution": [int(cfg.video.height), int(cfg.video.width)], "methods": results}
