"""Throughput of N streams in one batched forward (StreamBatch) against the same N streams run one after another.

    PYTHONPATH=. python scripts/bench_stream_batch.py --model tiny --streams 4 --frames 21
Prints the seconds of each way and the ratio (sequential / batched); no decode, fp32 on the CPU by default.
Also times the server's pattern, viewers arriving one block apart and joining the running batch (rolling cache),
against the same streams one after another, and a prompt switch's re-cache (LongLive style) against a block's
denoise time.
"""
import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    from nasa_video.pipeline import StreamingGenerator

    torch.set_grad_enabled(False)
    gen = StreamingGenerator.from_config(args.model, device=args.device, dtype=args.dtype, attention_backend="sdpa")
    shapes = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    specs = [dict(prompt=f"{shapes[i % 4]} moving left", negative=[("red circle", 1.0)] * (i % 3),
                  scale=0.2 * (i % 3), seed=i) for i in range(args.streams)]

    def sequential():
        for s in specs:
            for _ in gen.stream(s["prompt"], s["negative"], s["scale"], frames=args.frames, seed=s["seed"], decode=False):
                pass

    def batched():
        for _ in gen.stream_batch(specs, frames=args.frames, decode=False):
            pass

    def best(fn):
        fn()  # warm-up
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    from nasa_video.pipeline import pixel_frames

    # A rolling stream without a length is endless: give the joining comparison the same length as the others.
    frames = args.frames or pixel_frames(int(gen.spec.video.latent_frames), gen.temporal_stride)

    def sequential_rolling():
        for s in specs:
            for _ in gen.stream(s["prompt"], s["negative"], s["scale"], frames=frames, seed=s["seed"],
                                rolling=True, decode=False):
                pass

    def staggered():  # stream i joins after block i - 1, as viewers arriving at a server do
        batch = gen.stream_batch(specs[:1], frames=frames, decode=False, rolling=True)
        joined = 1
        for _ in batch:
            if joined < len(specs):
                batch.add(dict(specs[joined], name=joined))
                joined += 1

    seq, bat = best(sequential), best(batched)
    blocks = sum(1 for _ in gen.stream(specs[0]["prompt"], frames=args.frames, decode=False))
    print(f"{args.model} {args.device} {args.dtype}: {args.streams} streams x {blocks} blocks, no decode")
    print(f"sequential {seq:.3f}s, batched {bat:.3f}s, throughput ratio {seq / bat:.2f}x")
    seq_r, stag = best(sequential_rolling), best(staggered)
    print(f"joining one block apart (rolling cache): sequential {seq_r:.3f}s, staggered batch {stag:.3f}s, "
          f"throughput ratio {seq_r / stag:.2f}x")

    # re-cache cost: a switch before the last block re-runs the cache pass over every cached block
    stream = gen.stream(specs[0]["prompt"], frames=args.frames, decode=False)
    denoise = []
    for chunk in stream:
        denoise.append(chunk.denoise_seconds)
        if chunk.block + 2 == blocks:
            stream.set_prompt("a green triangle", recache=True)
    block, seconds = stream.recaches[-1]
    per_block = sum(denoise[:-1]) / max(1, len(denoise) - 1)
    print(f"re-cache before block {block} (one cache pass over each of the {block} cached blocks): {seconds:.3f}s "
          f"= {seconds / per_block:.2f} x a block's denoise ({per_block:.3f}s: {len(gen.steps)} steps + cache pass)")


if __name__ == "__main__":
    main()
