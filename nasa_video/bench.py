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
from .model.cache import TextCache
from .model.interface import build_from_config, generator_section


def video_flops(cfg, method: str, negatives: int = 1) -> int:
    """FLOPs of the generator for one video of cfg.video.latent_frames frames with the given guidance, at
    the method's bench_scale (a scale at which it guides: NAG only for nag_scale > 1)."""
    if not make_guidance(method).in_attention:  # CFG: a plain pass for each of its two contexts
        return 2 * video_flops(cfg, "none")
    g = generator_section(cfg)[1]
    stride = cfg.video.vae_stride[1]
    h, w = cfg.video.height // stride, cfg.video.width // stride
    fpb, blocks = int(cfg.video.frames_per_block), int(cfg.video.latent_frames) // int(cfg.video.frames_per_block)
    passes_per_block = len(cfg.sampling.steps) + 1  # the denoising steps and the cache pass: same shapes
    guidance = make_guidance(method)
    with torch.device("meta"):
        model = build_from_config(cfg)
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
                model.set_text(text.guide(guidance, guidance.bench_scale))
                model(x, t, block * fpb, cache)
            total += counter.get_total_flops() * passes_per_block
    return int(total)


def memory_bytes(cfg, method: str, dtype=torch.bfloat16, negatives: int = 1) -> int:
    """Weights + self-attention KV cache(s) + text K/V (CFG keeps a second KV cache)."""
    from .memory import memory_estimate

    estimate = memory_estimate(cfg, dtype, negatives if method != "none" else 0,
                               kv_caches=1 if make_guidance(method).in_attention else 2)
    return int(estimate["weights"] + estimate["kv_cache"] + estimate["text_cache"])


def flops_report(model: str = "causvid", methods=("none", "nasa", "nag", "vsf", "cfg")) -> dict:
    cfg = load_config(model)
    results = {m: {"flops": video_flops(cfg, m), "memory_bytes": memory_bytes(cfg, m)} for m in methods}
    base = results["none"]["flops"] if "none" in results else None
    for r in results.values():
        r["ratio"] = r["flops"] / base if base else None
    return {"model": cfg.name, "latent_frames": int(cfg.video.latent_frames), "steps": list(cfg.sampling.steps),
            "resolution": [int(cfg.video.height), int(cfg.video.width)], "methods": results}


def flops_table(report: dict) -> str:
    """flops_report() as the text table `nasa-video bench flops` prints."""
    lines = [f"{report['model']}: {report['latent_frames']} latent frames at {report['resolution'][0]}x"
             f"{report['resolution'][1]}, steps {report['steps']} + cache pass, one video",
             f"{'method':8} {'TFLOPs':>10} {'ratio':>8} {'memory GiB':>11}"]
    for name, r in report["methods"].items():
        lines.append(f"{name:8} {r['flops'] / 1e12:10.2f} {r['ratio']:8.4f} {r['memory_bytes'] / 2**30:11.2f}")
    return "\n".join(lines)


# ---- wall time ------------------------------------------------------------------------------------------------
MID = {"generator": {"num_attention_heads": 8, "attention_head_dim": 64, "ffn_dim": 2048, "num_layers": 4},
       "video": {"height": 128, "width": 128}}


class RandomTextEncoder:
    """Benchmark stand-in for umT5: seeded random prompt embeddings of the right shape (text encoding is
    done once per video and is not what is being timed)."""

    def __init__(self, dim: int, max_length: int, device):
        self.dim, self.max_length, self.device = dim, max_length, device

    def token_count(self, prompt: str) -> int:
        return len(prompt.split()) + 1

    def check_readable(self, prompt: str, what: str = "prompt") -> None:
        """Any text reads: the embeddings are random."""

    def encode(self, prompt: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(sum(map(ord, prompt)))
        return torch.randn(1, self.max_length, self.dim, generator=g).to(self.device)


def random_weight_generator(model: str, device: str, dtype: str, overrides: dict | None = None):
    """A StreamingGenerator of a config with random generator and VAE weights (no downloads)."""
    from diffusers import AutoencoderKLWan

    from .loading import build_generator, resolve_device, resolve_dtype
    from .pipeline import StreamingGenerator

    cfg = load_config(model, overrides)
    device_ = resolve_device(device)
    dtype_ = resolve_dtype(dtype, device_)
    if cfg.weights.source == "random":
        from .loading import build_vae_and_text
        vae, text = build_vae_and_text(cfg, device_, dtype_)
    else:
        vae = AutoencoderKLWan().to(device_)  # diffusers' defaults are Wan2.1's VAE
        text = RandomTextEncoder(int(cfg.generator.text_dim), int(cfg.weights.text_max_length), device_)
    cfg.weights.source = "random"
    cfg.weights.seed = 0
    generator = build_generator(cfg, device_, dtype_)
    return StreamingGenerator(cfg, generator, vae, text, device_, dtype_)


def time_video(gen, method: str, decode: bool) -> tuple[float, float]:
    """(seconds for one video, seconds to its first block), at the method's bench_scale."""
    import time

    start = time.perf_counter()
    first = None
    scale = make_guidance(method).bench_scale
    for chunk in gen.stream("a fox running through snow", "blurry, low quality", scale, method, decode=decode):
        if first is None:
            first = time.perf_counter() - start
    return time.perf_counter() - start, first


def speed_report(gen, methods, repeats: int = 5, decode: bool = False) -> dict:
    """Interleaved runs (the method order rotates each round), median and spread, ratio to none."""
    import statistics

    methods = list(dict.fromkeys(["none"] + list(methods)))
    for method in methods:  # warm-up: allocator, kernels, text caches
        time_video(gen, method, decode)
    runs = {m: [] for m in methods}
    firsts = {m: [] for m in methods}
    for r in range(repeats):
        for method in methods[r % len(methods):] + methods[:r % len(methods)]:
            total, first = time_video(gen, method, decode)
            runs[method].append(total)
            firsts[method].append(first)
    base = statistics.median(runs["none"])
    from .pipeline import pixel_frames

    frames = pixel_frames(int(gen.cfg.video.latent_frames), gen.temporal_stride)
    out = {}
    for m in methods:
        med = statistics.median(runs[m])
        out[m] = {"median_s": med, "min_s": min(runs[m]), "max_s": max(runs[m]), "ratio": med / base,
                  "fps": frames / med, "first_block_s": statistics.median(firsts[m])}
    return {"model": gen.cfg.name, "device": str(gen.device), "dtype": str(gen.dtype), "repeats": repeats,
            "decode": decode, "frames": frames, "methods": out}


def speed_benchmark(model: str, methods, repeats: int = 5, device: str = "auto", dtype: str = "auto",
                    attention: str = "auto", decode: bool = False) -> dict:
    """speed_report() on a random-weight generator of `model` ("mid": the tiny config at MID size), with the
    attention backend it ran and, on CUDA, the peak GPU memory."""
    from . import attention as attention_backend

    backend = attention_backend.set_backend(attention)
    model, overrides = ("tiny", MID) if model == "mid" else (model, None)
    gen = random_weight_generator(model, device, dtype, overrides)
    if gen.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(gen.device)
    report = speed_report(gen, methods, repeats, decode)
    report["attention"] = backend
    if gen.device.type == "cuda":
        report["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(gen.device)
    return report


def speed_table(report: dict, model: str) -> str:
    """speed_benchmark() as the text table `nasa-video bench speed` prints; model: the name asked for."""
    lines = [f"{model} (random weights) on {report['device']} {report['dtype']}, attention {report['attention']}, "
             f"{report['frames']} frames, decode {'on' if report['decode'] else 'off'}, "
             f"{report['repeats']} interleaved runs",
             f"{'method':8} {'median s':>9} {'min-max s':>15} {'ratio':>7} {'fps':>8} {'first block s':>14}"]
    for name, r in report["methods"].items():
        lines.append(f"{name:8} {r['median_s']:9.3f} {r['min_s']:7.3f}-{r['max_s']:<7.3f} {r['ratio']:7.3f} "
                     f"{r['fps']:8.2f} {r['first_block_s']:14.3f}")
    if "peak_gpu_memory_bytes" in report:
        lines.append(f"peak GPU memory {report['peak_gpu_memory_bytes'] / 2**30:.2f} GiB")
    return "\n".join(lines)
