"""One Wan block forward on the CPU: the forward as it was (tests/reference_block.py) vs the fused eager forward vs
the compiled one (inductor), for no guidance and NASA with two negatives; aten ops per forward and wall time, as
ratios from one run with interleaved repeats. Random weights, a mid-size config (dim 384, 6 heads x 64, ffn 1536,
a block of 3 frames of 16 x 16 patches = 768 tokens attending to 3 blocks in the cache, 64 text tokens).

    python scripts/cpu_block_speed.py [--dtype fp32|bf16] [--repeats 15] [--json out.json]

GPU figures are not this script's: see `nasa-video bench speed`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nasa_video.guidance import NASA, NoGuidance  # noqa: E402
from nasa_video.model.cache import TextCache  # noqa: E402
from nasa_video.model.causal_wan import CausalWanBlock, CausalWanTransformer, cast_generator  # noqa: E402
from tests import reference_block as ref  # noqa: E402

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=64, in_channels=16, out_channels=16,
              text_dim=256, freq_dim=64, ffn_dim=1536, num_layers=2, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
FRAMES, GRID, BLOCKS_BEFORE, TEXT = 3, (16, 16), 2, 64


def aten_ops(fn) -> int:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    model = cast_generator(CausalWanTransformer(**CONFIG).eval().requires_grad_(False), "cpu", dtype)
    dim = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]
    g = torch.Generator().manual_seed(1)
    contexts = [torch.randn(1, TEXT, CONFIG["text_dim"], generator=g) for _ in range(3)]
    text = TextCache(model, contexts[0])
    text.set_negatives(["a", "b"], [1.0, 0.5], contexts[1:])
    tokens = GRID[0] * GRID[1]
    x = torch.randn(1, FRAMES, tokens, dim, generator=g).to(dtype)
    modulation = torch.randn(1, FRAMES, 6, dim, generator=g) * 0.3
    cache = model.new_kv_cache(1, (BLOCKS_BEFORE + 1) * FRAMES, 2 * GRID[0], 2 * GRID[1])
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape, generator=g))
    for b in range(BLOCKS_BEFORE + 1):
        cache.place(b * FRAMES, FRAMES)
    start = BLOCKS_BEFORE * FRAMES
    block = model.blocks[0]
    old_tables = ref.rope_frequencies(model.rope, torch.arange(start, start + FRAMES), *GRID, "cpu")
    new_tables = model.rope_tables(start, FRAMES, *GRID, "cpu")
    layer = cache.layer(0)
    compiled = torch.compile(CausalWanBlock.forward, fullgraph=True, dynamic=False)

    def runners(method):
        setting = block.attn2.processor.setting
        return {
            "before": lambda: ref.block_forward(block, x, modulation, *old_tables, layer, None, setting.method,
                                                block.attn2.processor.text, setting.alphas),
            "fused": lambda: block(x, modulation, *new_tables, layer),
            "compiled": lambda: compiled(block, x, modulation, *new_tables, layer),
        }

    methods = {"none": (NoGuidance(), 0.0), "nasa": (NASA(), 0.7)}
    results: dict = {"dtype": args.dtype, "config": {**CONFIG, "frames": FRAMES, "grid": GRID, "text": TEXT,
                                                     "cache_blocks": BLOCKS_BEFORE + 1},
                     "threads": torch.get_num_threads(), "torch": torch.__version__}
    warmup = {}
    with torch.no_grad():
        for name, (method, scale) in methods.items():
            model.set_text(text.guide(method, scale))
            block.attn2.processor.prepare()
            t0 = time.perf_counter()
            runners(method)["compiled"]()
            warmup[name] = time.perf_counter() - t0
            for path, fn in runners(method).items():
                results[f"aten_ops/{path}/{name}"] = aten_ops(fn)
        times: dict[str, list[float]] = {}
        for _ in range(args.repeats):  # interleaved: every path and method once per round
            for name, (method, scale) in methods.items():
                model.set_text(text.guide(method, scale))
                block.attn2.processor.prepare()
                for path, fn in runners(method).items():
                    t0 = time.perf_counter()
                    fn()
                    times.setdefault(f"{path}/{name}", []).append(time.perf_counter() - t0)
    results["compile_warmup_s"] = warmup
    results["median_ms"] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    med = results["median_ms"]
    results["ratios"] = {
        **{f"{p}/nasa_over_none": med[f"{p}/nasa"] / med[f"{p}/none"] for p in ("before", "fused", "compiled")},
        **{f"speedup_{p}_vs_before/{m}": med[f"before/{m}"] / med[f"{p}/{m}"] for p in ("fused", "compiled")
           for m in methods},
        **{f"aten_ops_before_over_{p}/{m}": results[f"aten_ops/before/{m}"] / results[f"aten_ops/{p}/{m}"]
           for p in ("fused", "compiled") for m in methods},
    }
    text_out = json.dumps(results, indent=1)
    print(text_out)
    if args.json:
        Path(args.json).write_text(text_out)


if __name__ == "__main__":
    main()
