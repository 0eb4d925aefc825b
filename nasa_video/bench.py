"""Cost of each guidance method for one generated video, counted rather than timed.

FLOPs come from torch.utils.flop_counter over the generator's real forward on the meta device (nothing is
allocated, so the full 1.3B CausVid config counts in seconds on a laptop): every block, every denoising
step and the cache pass, with the KV cache growing as in generation. The counter counts matrix products and
attention, not element-wise work (NAG's norms, the subtraction of NASA), which is a rounding error here.
Memory is computed: weights, self-attention KV cache(s) and text K/V.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import model_spec, pixel_frames
from .errors import UserError
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
    spec = model_spec(cfg)
    video, text_tokens = spec.video, spec.weights.text_max_length
    h, w = video.height // video.vae_stride[1], video.width // video.vae_stride[2]
    fpb, blocks = video.frames_per_block, video.latent_frames // video.frames_per_block
    passes_per_block = len(spec.sampling.steps) + 1  # the denoising steps and the cache pass: same shapes
    guidance = make_guidance(method)
    with torch.device("meta"):
        model = build_from_config(cfg)
        text = TextCache(model, torch.zeros(1, text_tokens, g["text_dim"]))
        if method != "none":
            text.set_negatives(["negative"] * negatives, [1.0] * negatives,
                               [torch.zeros(1, text_tokens, g["text_dim"])] * negatives)
        cache = model.new_kv_cache(1, spec.cache.capacity_frames, h, w, device="meta")
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


def layer_extrapolated_flops(cfg, method: str, negatives: int = 1) -> int:
    """video_flops of cfg, counted on 1- and 2-layer copies and extrapolated to its layer count: every layer has
    the same shapes at every pass, so the count is affine in the layers (tests/test_bench.py checks it) and the
    full CausVid count takes two small counts instead of one 30-layer one."""
    from omegaconf import OmegaConf

    layers = int(generator_section(cfg)[1]["num_layers"])
    if layers <= 2:
        return video_flops(cfg, method, negatives)
    counts = []
    for n in (1, 2):
        small = OmegaConf.merge(cfg, OmegaConf.create({"generator": {"num_layers": n}}))
        counts.append(video_flops(small, method, negatives))
    return counts[0] + (layers - 1) * (counts[1] - counts[0])


def flops_report(model: str = "causvid", methods=("none", "nasa", "nag", "vsf", "cfg")) -> dict:
    cfg = load_config(model)
    results = {m: {"flops": layer_extrapolated_flops(cfg, m), "memory_bytes": memory_bytes(cfg, m)} for m in methods}
    base = results["none"]["flops"] if "none" in results else None
    for r in results.values():
        r["ratio"] = r["flops"] / base if base else None
    spec = model_spec(cfg)
    return {"model": spec.name, "latent_frames": spec.video.latent_frames, "steps": list(spec.sampling.steps),
            "resolution": [spec.video.height, spec.video.width], "methods": results}


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


def random_weight_generator(model: str, device: str, dtype: str, overrides: dict | None = None, vae: str = "auto",
                            **options):
    """A StreamingGenerator of a config with random generator and VAE weights (no downloads). vae="tae": the tiny
    Wan 2.1 decoder (random weights in the published layout) instead of the config's VAE. options go to
    StreamingGenerator (vae_dtype, overlap_decode, ...), compile to set_compile."""
    from diffusers import AutoencoderKLWan

    from .loading import build_generator, resolve_device, resolve_dtype
    from .pipeline import StreamingGenerator

    cfg = load_config(model, overrides)
    device_ = resolve_device(device)
    dtype_ = resolve_dtype(dtype, device_)
    if cfg.weights.source == "random":
        from .loading import build_vae_and_text
        codec, text = build_vae_and_text(cfg, device_, dtype_)
    else:
        codec = None
        text = RandomTextEncoder(int(cfg.generator.text_dim), int(cfg.weights.text_max_length), device_)
    if vae == "tae":
        from .tae import Z_DIM, TinyDecoderCodec, TinyWanDecoder

        if int(generator_section(cfg)[1]["in_channels"]) != Z_DIM:
            raise UserError(f"--vae tae decodes Wan 2.1 latents ({Z_DIM} channels); use a Wan model (self-forcing)")
        codec = TinyDecoderCodec(TinyWanDecoder().to(device_))
    elif codec is None:
        codec = AutoencoderKLWan().to(device_)  # diffusers' defaults are Wan2.1's VAE
    cfg.weights.source = "random"
    cfg.weights.seed = 0
    generator = build_generator(cfg, device_, dtype_)
    compile = options.pop("compile", False)
    gen = StreamingGenerator(cfg, generator, codec, text, device_, dtype_, **options)
    gen.set_compile(compile)
    return gen


def video_latents(gen, method: str = "nasa", seed: int = 0) -> torch.Tensor:
    """One video's latents (no decode) at the method's bench scale: what the variants' errors compare."""
    stream = gen.stream("a fox running through snow", "blurry, low quality", make_guidance(method).bench_scale, method,
                        seed=seed, decode=False)
    return torch.cat([chunk.latents for chunk in stream], 2)


# A replay runs the captured kernels of the eager forward: the same numbers, up to the order a kernel may pick
# again at capture; FP8 rounds weights and activations to 3 mantissa bits (LongLive's recipe).
VARIANT_TOLERANCE = {"cuda_graphs": 1e-2, "fp8": 0.15}  # relative RMS error of a video's latents


def latent_error(value: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = (value.float() - reference.float())
    rms = reference.float().pow(2).mean().sqrt().item()
    return {"max_abs": diff.abs().max().item(), "rel_rms": diff.pow(2).mean().sqrt().item() / max(rms, 1e-12)}


def apply_variants(gen, cuda_graphs: bool = False, fp8: bool = False) -> dict:
    """Turn FP8 and CUDA graphs on, each after measuring one video against the step before it (eager bf16 for FP8,
    eager FP8-or-not for graphs): {variant: latent_error + tolerance + ok}."""
    errors = {}
    if not (cuda_graphs or fp8):
        return errors
    reference = video_latents(gen)
    if fp8:
        from .fp8 import check_fp8, quantize_fp8

        check_fp8(gen.device)
        quantize_fp8(gen.model)
        value = video_latents(gen)
        errors["fp8"] = latent_error(value, reference)
        reference = value
    if cuda_graphs:
        gen.set_cuda_graphs(True)
        errors["cuda_graphs"] = latent_error(video_latents(gen), reference)
    for name, error in errors.items():
        error["tolerance_rel_rms"] = VARIANT_TOLERANCE[name]
        error["ok"] = error["rel_rms"] <= VARIANT_TOLERANCE[name]
    return errors


# bf16 dense (no structured sparsity) tensor-core peaks, TFLOP/s, by a substring of torch's device name; the first
# match wins. Sources: NVIDIA's datasheets, which print the sparse figure (dense = half): H100 SXM 1,979 -> 989
# and H100 PCIe 1,513 -> 756 ("NVIDIA H100 Tensor Core GPU" datasheet), H200 1,979 -> 989 ("NVIDIA H200 Tensor
# Core GPU" datasheet), A100 312 dense ("NVIDIA A100 Tensor Core GPU" datasheet), L40S 362 dense / 733 sparse
# ("NVIDIA L40S" datasheet), RTX 4090 165.2 dense with FP32 accumulate ("NVIDIA Ada GPU Architecture"
# whitepaper, appendix). Variants with other clocks (H100 NVL, H200 NVL) are left unknown rather than guessed.
# What a chip reaches is lower: an 8192^3 bf16 matmul reaches ~790 TFLOP/s on an H200 (docs: REFERENCE.md 5).
PEAK_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    ("H100 NVL", None), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("H200 NVL", None), ("H200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("RTX 4090", 165.0),
)


def peak_tflops(device_name: str | None) -> float | None:
    """The bf16 dense peak of a device by its name (torch.cuda.get_device_name), None where unknown (a CPU)."""
    if not device_name:
        return None
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@dataclass
class VideoTiming:
    """One timed video. denoise_s: the blocks' denoising (the DiT), decode_s: the decodes' own time,
    decode_wait_s: what the loop waited for them (decode_s - decode_wait_s ran beside the denoising)."""

    seconds: float
    first_block_s: float
    denoise_s: float = 0.0
    decode_s: float = 0.0
    decode_wait_s: float = 0.0
    peak_memory_bytes: int | None = None


def time_video(gen, method: str, decode: bool) -> VideoTiming:
    cuda = gen.device.type == "cuda" if isinstance(gen.device, torch.device) else False
    if cuda:
        torch.cuda.reset_peak_memory_stats(gen.device)
    start = time.perf_counter()
    first = None
    denoise = decode_s = wait = 0.0
    scale = make_guidance(method).bench_scale
    for chunk in gen.stream("a fox running through snow", "blurry, low quality", scale, method, decode=decode):
        if first is None:
            first = time.perf_counter() - start
        denoise += chunk.denoise_seconds
        decode_s += chunk.decode_seconds
        wait += chunk.decode_wait_seconds
    seconds = time.perf_counter() - start
    return VideoTiming(seconds, first, denoise, decode_s, wait,
                       torch.cuda.max_memory_allocated(gen.device) if cuda else None)


def throughput(frames: int, timings: list[VideoTiming], flops: int | None, peak: float | None) -> dict:
    """A method's figures from its timed runs (medians): seconds, fps with and without the decode, the split
    denoise / decode / overlap, achieved TFLOP/s = FLOPs / DiT (denoising) time and its share of the peak."""
    med = statistics.median(t.seconds for t in timings)
    denoise = statistics.median(t.denoise_s for t in timings)
    decode = statistics.median(t.decode_s for t in timings)
    wait = statistics.median(t.decode_wait_s for t in timings)
    achieved = flops / denoise / 1e12 if flops and denoise > 0 else None
    memory = [t.peak_memory_bytes for t in timings if t.peak_memory_bytes is not None]
    return {
        "median_s": med, "min_s": min(t.seconds for t in timings), "max_s": max(t.seconds for t in timings),
        "fps": frames / med, "first_block_s": statistics.median(t.first_block_s for t in timings),
        "fps_without_decode": frames / denoise if denoise > 0 else None,
        "denoise_s": denoise, "decode_s": decode, "decode_wait_s": wait, "overlap_s": max(0.0, decode - wait),
        "other_s": max(0.0, med - denoise - wait),  # text caches, host work, the loop itself
        "flops": flops, "achieved_tflops": achieved,
        "peak_share": achieved / peak if achieved is not None and peak else None,
        "peak_memory_bytes": max(memory) if memory else None,
    }


def speed_report(gen, methods, repeats: int = 5, decode: bool = False, flops: dict | None = None) -> dict:
    """Interleaved runs (the method order rotates each round), median and spread, ratio to none, throughput.
    flops: FLOPs per video by method (default: counted for gen.cfg on the meta device)."""
    from . import attention

    methods = list(dict.fromkeys(["none"] + list(methods)))
    if flops is None:
        flops = {m: layer_extrapolated_flops(gen.cfg, m) for m in methods}
    warmup = {}
    for method in methods:  # warm-up: allocator, kernels, text caches, and the compile when compiled
        started = time.perf_counter()
        time_video(gen, method, decode)
        warmup[method] = time.perf_counter() - started
    runs = {m: [] for m in methods}
    for r in range(repeats):
        for method in methods[r % len(methods):] + methods[:r % len(methods)]:
            runs[method].append(time_video(gen, method, decode))
    frames = pixel_frames(gen.spec.video.latent_frames, gen.temporal_stride)
    name = device_name(gen.device)
    peak = peak_tflops(name) if str(gen.device).startswith("cuda") else None
    out = {m: throughput(frames, runs[m], flops.get(m), peak) for m in methods}
    base = out["none"]["median_s"]
    for m, r in out.items():
        r["ratio"] = r["median_s"] / base
        r["warmup_s"] = warmup[m]  # the first video's time (with --compile: the compile), kept out of the figures
    memory = [r["peak_memory_bytes"] for r in out.values() if r["peak_memory_bytes"] is not None]
    report = {"model": gen.spec.name, "device": str(gen.device), "device_name": name, "dtype": str(gen.dtype),
              "repeats": repeats, "decode": decode, "frames": frames, "methods": out,
              "attention": attention.backend(), "compile": gen.compiled, "peak_tflops": peak,
              "cuda_graphs": bool(getattr(gen, "cuda_graphs", False)),
              "fp8": getattr(getattr(gen, "model", None), "fp8_layers", 0) > 0,
              "decoder": type(gen.codec).__name__ if getattr(gen, "codec", None) is not None else None,
              "vae_dtype": str(gen.vae_dtype).replace("torch.", "") if getattr(gen, "vae_dtype", None) else None,
              "overlap_decode": bool(getattr(gen, "overlap_decode", False)) and decode}
    if memory:
        report["peak_gpu_memory_bytes"] = max(memory)
    return report


def format_speed_report(report: dict, label: str | None = None) -> str:
    """The report as the terminal shows it."""
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [f"{label or report['model']} on {report['device']} ({report['device_name']}) {report['dtype']}, "
             f"attention {report['attention']}, compile {'on' if report['compile'] else 'off'}, CUDA graphs "
             f"{'on' if report.get('cuda_graphs') else 'off'}, FP8 {'on' if report.get('fp8') else 'off'}, "
             f"{report['frames']} frames, decode {'on' if report['decode'] else 'off'}"
             + (f" ({report.get('decoder')} {report['vae_dtype']}, overlapped {'yes' if report['overlap_decode'] else 'no'})"
                if report["decode"] else "") + f", {report['repeats']} interleaved runs",
             f"{'method':8} {'median s':>9} {'min-max s':>15} {'ratio':>7} {'fps':>7} {'fps DiT':>8} "
             f"{'first s':>8} {'denoise s':>9} {'decode s':>8} {'overlap s':>9} {'TFLOP/s':>8} {'of peak':>7}"]
    for name, r in report["methods"].items():
        lines.append(f"{name:8} {r['median_s']:9.3f} {r['min_s']:7.3f}-{r['max_s']:<7.3f} {r['ratio']:7.3f} "
                     f"{r['fps']:7.2f} {num(r['fps_without_decode'], '8.2f')} {r['first_block_s']:8.3f} "
                     f"{r['denoise_s']:9.3f} {r['decode_s']:8.3f} {r['overlap_s']:9.3f} "
                     f"{num(r['achieved_tflops'], '8.2f')} {num(r['peak_share'], '7.1%')}")
    if report.get("peak_gpu_memory_bytes") is not None:
        lines.append(f"peak GPU memory {report['peak_gpu_memory_bytes'] / 2**30:.2f} GiB")
    for name, error in report.get("errors", {}).items():
        lines.append(f"{name} vs eager{' bf16' if name == 'fp8' else ''}: latents max abs {error['max_abs']:.3g}, "
                     f"relative RMS {error['rel_rms']:.3g} (tolerance {error['tolerance_rel_rms']:g}: "
                     f"{'ok' if error['ok'] else 'OVER'})")
    if report["peak_tflops"] is None:
        lines.append("peak TFLOP/s of this device unknown (bench.PEAK_BF16_TFLOPS): no share of peak")
    return "\n".join(lines)


# ---- where one block's time goes ------------------------------------------------------------------------------
KERNEL_GROUPS = (
    ("attention", ("attention", "attn", "flash", "fmha", "sdpa", "softmax")),
    ("matrix products", ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear",
                         "cutlass", "xmma", "cublas", "nvjet", "conv")),
)


def kernel_group(name: str) -> str:
    """attention / matrix products / element-wise (everything else: norms, copies, casts, activations)."""
    low = name.lower()
    for group, keys in KERNEL_GROUPS:
        if any(key in low for key in keys):
            return group
    return "element-wise"


def group_kernels(rows: list[tuple[str, float, int]], top: int = 15) -> dict:
    """rows (name, seconds of self time, calls) -> time per group, shares, and the top kernels."""
    total = sum(seconds for _, seconds, _ in rows) or 1.0
    groups = {"attention": 0.0, "matrix products": 0.0, "element-wise": 0.0}
    for name, seconds, _ in rows:
        groups[kernel_group(name)] += seconds
    ranked = sorted(rows, key=lambda r: -r[1])[:top]
    return {"total_s": sum(s for _, s, _ in rows), "groups": groups,
            "shares": {g: v / total for g, v in groups.items()},
            "top": [{"name": n, "group": kernel_group(n), "seconds": s, "calls": c, "share": s / total}
                    for n, s, c in ranked]}


def profile_block(gen, method: str, block: int = 1, top: int = 15) -> dict:
    """torch.profiler over the denoising of one block (block 1 by default: it reads a cached block), DiT only:
    GPU kernels' device time on CUDA, aten ops' self CPU time elsewhere, grouped by kernel_group."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = gen.device.type == "cuda"
    stream = iter(gen.stream("a fox running through snow", "blurry, low quality", make_guidance(method).bench_scale, method,
                             decode=False))
    for _ in range(block):
        next(stream)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        next(stream)
    stream.close()
    rows = []
    for event in prof.key_averages():
        if cuda:
            if event.device_type != DeviceType.CUDA:
                continue
            us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        else:
            us = event.self_cpu_time_total
        if us > 0:
            rows.append((event.key, us / 1e6, int(event.count)))
    return {"block": block, "timing": "GPU kernel time" if cuda else "CPU self time of aten ops",
            **group_kernels(rows, top)}


def format_profile(profiles: dict) -> str:
    """Markdown: per method, time per group and the top kernels."""
    lines = []
    for method, p in profiles.items():
        lines += [f"## {method}: block {p['block']}, {p['timing']}, {p['total_s'] * 1e3:.1f} ms", "",
                  "| group | ms | share |", "|---|---|---|"]
        lines += [f"| {g} | {p['groups'][g] * 1e3:.2f} | {p['shares'][g]:.1%} |" for g in p["groups"]]
        lines += ["", "| kernel | group | calls | ms | share |", "|---|---|---|---|---|"]
        lines += [f"| `{k['name'][:90]}` | {k['group']} | {k['calls']} | {k['seconds'] * 1e3:.2f} | {k['share']:.1%} |"
                  for k in p["top"]]
        lines.append("")
    return "\n".join(lines)


def run_speed(model: str, methods, repeats: int = 5, device: str = "auto", dtype: str = "auto",
              attention_backend: str = "auto", decode: bool = False, json_path: str | None = None,
              profile_path: str | None = None, vae_dtype: str | None = None, overlap_decode: bool | None = None,
              vae: str = "auto", cuda_graphs: bool = False, fp8: bool = False, **options) -> dict:
    """`nasa-video bench speed`: random weights (model `mid` = the tiny config at a mid size), the report printed
    and written (--json), and with profile_path one block's kernels per method (JSON there, markdown beside)."""
    from pathlib import Path

    from . import attention
    from .video_io import write_json

    attention.set_backend(attention_backend)
    name, overrides = ("tiny", MID) if model == "mid" else (model, None)
    if fp8:
        from .fp8 import check_fp8
        from .loading import resolve_device

        check_fp8(resolve_device(device))
    gen = random_weight_generator(name, device, dtype, overrides, vae, vae_dtype=vae_dtype,
                                  overlap_decode=overlap_decode, **options)
    errors = apply_variants(gen, bool(cuda_graphs), fp8)
    report = speed_report(gen, methods, repeats, decode)
    report["errors"] = errors
    if gen.cuda_graphs:
        graphs = gen.model.graphs
        report["graph_captures"], report["graph_runs"] = graphs.captures, graphs.runs
    print(format_speed_report(report, f"{model} (random weights)"))
    if profile_path:
        profiles = {m: profile_block(gen, m) for m in report["methods"]}
        write_json(profile_path, profiles)
        table = Path(profile_path).with_suffix(".md")
        table.write_text(format_profile(profiles))
        print(format_profile(profiles))
        report["profile"] = str(profile_path)
        print(f"wrote {profile_path} and {table}")
    if json_path:
        write_json(json_path, report)
    return report
