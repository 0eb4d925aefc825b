"""Several streams in one forward: a batch of videos with their own prompts, negatives, scales and seeds, advanced
block by block together, one batched forward per denoising step (and one for the cache pass).

What is batched: the latents [B, C, F, h, w], the self-attention cache (one SelfAttentionCache with B rows), and
the text K/V: every stream's positive and negatives side by side as heads, padded to the batch's largest number of
negatives with zero K/V whose alpha is 0, so each stream's NASA output is Z+_b - sum_i alpha_{b,i} Z-_{b,i} with its
own alphas (BatchedNASAPlan). What stays per stream: its Stream object (text cache, scale schedule, pending changes,
random generator, initial noise) and its VAE decoder. A change to one stream (set_prompt, set_negative, set_scale)
acts from the next block for that stream only; the others are untouched.

Scope: in-attention NASA and none (the project's method and the baseline); NAG / VSF / CFG streams run alone.
Streams advance in lockstep (same block, same RoPE positions), so a stream can leave between blocks (remove())
but a new one cannot join a running batch: start another batch (or group) for it.
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch

from .attention import attend_prompts
from .errors import UserError
from .guidance import AttentionPlan, CrossAttentionProcessor, Guidance, GuidanceSetting, PlainPlan, TextKV
from .pipeline import FrameChunk, Stream, _sync, method_from_config, pixel_frames
from .vae import to_uint8

BATCH_METHODS = ("nasa", "none")


class BatchedNASAPlan(AttentionPlan):
    """NASA for a batch whose streams have their own alphas: V of prompt p in row b scaled by w[p, b] (w[0] = 1,
    w[p] = -alpha_{b,p}), every prompt attended in one launch, summed over the prompt axis."""

    def __init__(self, kv: TextKV, alphas: Sequence[Sequence[float]]):
        k, v = kv.stacked()  # [P*B, L, H, D], prompt-major
        batch, prompts = kv.k.shape[0], kv.num_prompts
        dtype = v.dtype if v.dtype == torch.float64 else torch.float32
        weights = torch.zeros(prompts, batch, dtype=dtype, device=v.device)  # padding prompts: weight 0
        weights[0] = 1.0
        for b, row in enumerate(alphas):
            for p, alpha in enumerate(row):
                weights[p + 1, b] = -float(alpha)
        self.prompts, self.k = prompts, k
        self.v = (v.unflatten(0, (prompts, batch)) * weights.view(prompts, batch, 1, 1, 1)).to(v.dtype).flatten(0, 1)

    def __call__(self, q):
        return attend_prompts(q, self.k, self.v).unflatten(0, (self.prompts, q.shape[0])).sum(0)


class BatchedNASA(Guidance):
    """The batch's cross-attention method: alphas are per stream (a tuple of per-negative tuples)."""

    name = "nasa-batch"

    def prepare(self, kv, alphas):
        if kv.num_prompts == 1 or not any(a for row in alphas for a in row):
            return PlainPlan(*kv.positive())
        return BatchedNASAPlan(kv, alphas)


def batched_text(layers_per_stream: list[list[TextKV]], heads: int) -> list[TextKV]:
    """Per layer, one TextKV [B, L, H * P, D]: each stream's prompts, zero-padded to P = 1 + most negatives."""
    prompts = max(layer[0].num_prompts for layer in layers_per_stream)
    lengths = {layer[0].k.shape[1] for layer in layers_per_stream}
    if len(lengths) > 1:
        raise UserError(f"the streams' prompt embeddings have different lengths {sorted(lengths)}: give every stream "
                        f"embeddings of one length (the text encoder's max_length)")

    def pad(t: torch.Tensor) -> torch.Tensor:
        missing = prompts * heads - t.shape[2]
        return t if missing == 0 else torch.cat([t, t.new_zeros(*t.shape[:2], missing, t.shape[3])], 2)

    out = []
    for layer in range(len(layers_per_stream[0])):
        kvs = [stream_layers[layer] for stream_layers in layers_per_stream]
        out.append(TextKV(torch.cat([pad(kv.k) for kv in kvs]), torch.cat([pad(kv.v) for kv in kvs]), heads))
    return out


class StreamBatch:
    """Several streams, one batched forward per step. Iterate: one dict {name: FrameChunk} per block.

    specs: one dict per stream with Stream's per-video arguments (prompt, negative, scale, seed, prompt_embeds,
    negative_prompt_embeds, latents, generator) and an optional name (default: its index). Change a stream between
    blocks with batch[name].set_prompt / set_negative / set_scale (from the next block); remove(name) drops it
    (its cache rows go) from the next block."""

    def __init__(self, gen, specs: Sequence[dict], guidance: str | Guidance | None = None, frames: int | None = None,
                 rolling: bool | None = None, decode: bool = True):
        if not specs:
            raise UserError("a stream batch needs at least one stream")
        method = guidance if isinstance(guidance, Guidance) else method_from_config(gen.cfg, guidance)
        if method.name not in BATCH_METHODS:
            raise UserError(f"stream_batch runs {' and '.join(BATCH_METHODS)}; run {method.name} streams one by one")
        self.gen, self.method, self.decode = gen, method, decode
        self.streams: dict = {}
        for index, spec in enumerate(specs):
            spec = dict(spec)
            name = spec.pop("name", index)
            if name in self.streams:
                raise UserError(f"two streams are named {name!r}")
            unknown = set(spec) - {"prompt", "negative", "scale", "seed", "prompt_embeds", "negative_prompt_embeds",
                                   "latents", "generator"}
            if unknown:
                raise UserError(f"stream {name!r}: unknown argument {sorted(unknown)[0]!r}")
            self.streams[name] = Stream(gen, spec.get("prompt"), spec.get("negative"), spec.get("scale"), method,
                                        frames, spec.get("seed", 0), rolling, decode,
                                        prompt_embeds=spec.get("prompt_embeds"),
                                        negative_prompt_embeds=spec.get("negative_prompt_embeds"),
                                        latents=spec.get("latents"), generator=spec.get("generator"))
        first = next(iter(self.streams.values()))
        self.num_blocks, self.fpb, self.rolling = first.num_blocks, first.fpb, first.rolling
        self._removed: set = set()
        self.kv_cache = None
        self.held: dict[int, torch.Tensor] = {}  # start frame -> the batch's cache-pass input [B, C, F, h, w]

    def __getitem__(self, name) -> Stream:
        return self.streams[name]

    def __len__(self) -> int:
        return len(self.streams)

    def remove(self, name) -> None:
        """Stop a stream: from the next block the batch runs without it (its cache rows are dropped)."""
        if name not in self.streams:
            raise UserError(f"no stream named {name!r} in the batch")
        self._removed.add(name)

    def __iter__(self) -> Iterator[dict]:
        return self._run()

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _drop_removed(self) -> None:
        if not self._removed:
            return
        keep = [i for i, name in enumerate(self.streams) if name not in self._removed]
        self.streams = {n: s for n, s in self.streams.items() if n not in self._removed}
        self._removed = set()
        if self.kv_cache is not None and keep:
            index = torch.tensor(keep, device=self.gen.device)
            cache = self.kv_cache
            cache.k = [k.index_select(0, index) for k in cache.k]
            cache.v = [v.index_select(0, index) for v in cache.v]
            self.held = {s: x.index_select(0, index) for s, x in self.held.items()}

    def _text(self) -> list[CrossAttentionProcessor]:
        """The batched text K/V per layer, rebuilt only when some stream's text cache changed."""
        layers = [s.text_cache.layers for s in self.streams.values()]
        key = [layer[0] for layer in layers]
        if getattr(self, "_text_key", None) is None or len(key) != len(self._text_key) or any(
                a is not b for a, b in zip(key, self._text_key)):
            self._text_key = key
            self._setting = GuidanceSetting(BatchedNASA())
            self._processors = [CrossAttentionProcessor(kv, self._setting)
                                for kv in batched_text(layers, self.gen.model.config.num_attention_heads)]
        return self._processors

    def _alphas(self, block: int, step: int, guided: bool) -> tuple[tuple[float, ...], ...]:
        rows = []
        for stream in self.streams.values():
            if not guided or self.method.name == "none":
                rows.append(tuple(0.0 for _ in stream.negatives))
            else:
                rows.append(tuple(stream.text_cache.alphas(stream.schedule(block, step))))
        return tuple(rows)

    def _forward(self, x, t_value: float, start: int, block: int, step: int, guided: bool = True) -> torch.Tensor:
        model = self.gen.model
        model.set_cross_attention(self._text())
        self._setting.alphas = self._alphas(block, step, guided)
        t = torch.full((x.shape[0], self.fpb), float(t_value), device=self.gen.device)
        return model(x, t, start, self.kv_cache), t

    def _draw(self, rngs, shape) -> torch.Tensor:
        return torch.cat([torch.randn(shape, generator=r, device=self.gen.device, dtype=torch.float32) for r in rngs])

    @torch.no_grad()
    def _recache(self, block: int, rows: list[int]) -> float:
        """Re-run the cache pass over the held blocks for the streams in `rows` (the others' K/V are restored)."""
        t0 = time.perf_counter()
        cache, context_t, last = self.kv_cache, self.gen.spec.sampling.context_noise, len(self.gen.steps) - 1
        keep = [i for i in range(len(self.streams)) if i not in rows]
        saved = [(k[keep].clone(), v[keep].clone()) for k, v in zip(cache.k, cache.v)] if keep else None
        guided = self.gen.spec.guidance.in_cache_pass
        for start in sorted(self.held):
            self._forward(self.held[start], context_t, start, start // self.fpb, last, guided)
        if saved is not None:
            for (k, v), (k_old, v_old) in zip(zip(cache.k, cache.v), saved):
                k[keep], v[keep] = k_old, v_old
        _sync(self.gen.device)
        return time.perf_counter() - t0

    @torch.no_grad()
    def _run(self) -> Iterator[dict]:
        gen, spec = self.gen, self.gen.spec
        model, device, flow = gen.model, gen.device, gen.flow
        first = next(iter(self.streams.values()))
        h, w = first.latent_hw
        capacity = spec.cache.capacity_frames
        if first.latent_total is not None and not self.rolling and first.latent_total > capacity:
            raise UserError(f"{pixel_frames(first.latent_total, gen.temporal_stride)} frames need "
                            f"{first.latent_total} latent frames but the cache holds {capacity}")
        self.kv_cache = model.new_kv_cache(len(self.streams), capacity, h, w, self.rolling, spec.cache.sink_frames,
                                           gen.dtype, device)
        self.held = {}
        rngs = {n: s.generator if s.generator is not None else torch.Generator(device=device).manual_seed(int(s.seed))
                for n, s in self.streams.items()}
        decoders = {n: gen.codec.streaming_decoder() for n in self.streams} if self.decode else {}
        first_frames = {n: 0 for n in self.streams}
        shape = (1, model.config.in_channels, self.fpb, h, w)
        context_t = spec.sampling.context_noise
        block = 0
        while (self.num_blocks is None or block < self.num_blocks) and self.streams:
            self._drop_removed()
            if not self.streams:
                return
            names = list(self.streams)
            due = [i for i, s in enumerate(self.streams.values()) if s._apply_pending()]
            recache_seconds = self._recache(block, due) if due and self.held else 0.0
            start = block * self.fpb
            if start + self.fpb > first.max_latent_frames:
                raise UserError(f"the streams reached latent frame {start}, the last position {gen.cfg.name} "
                                f"encodes ({first.max_latent_frames}); they end here")
            t0 = time.perf_counter()
            streams = list(self.streams.values())
            x = torch.cat([s._initial_noise(block, shape, rngs[n]) for n, s in zip(names, streams)])
            x0 = x
            for step, t_value in enumerate(gen.steps):
                output, t = self._forward(x, t_value, start, block, step)
                x0 = flow.prediction_to_x0(output.float(), x, t, gen.prediction)
                if step + 1 < len(gen.steps):
                    noise = self._draw([rngs[n] for n in names], shape)
                    x = flow.add_noise(x0, noise, torch.full_like(t, gen.steps[step + 1]))
            context = x0
            if context_t > 0:
                context = flow.add_noise(x0, self._draw([rngs[n] for n in names], shape),
                                         torch.full((len(names), self.fpb), float(context_t), device=device))
            self._forward(context, context_t, start, block, len(gen.steps) - 1, spec.guidance.in_cache_pass)
            self.held[start] = context
            for s in list(self.held):
                if self.kv_cache._held_at(list(range(s, s + self.fpb))) is None:
                    del self.held[s]
            _sync(device)
            t1 = time.perf_counter()
            chunks = {}
            for i, (name, stream) in enumerate(zip(names, streams)):
                d0 = time.perf_counter()
                frames = to_uint8(decoders[name].decode(x0[i:i + 1]))[0].numpy() if self.decode else None
                chunks[name] = FrameChunk(block, first_frames[name], (start, start + self.fpb), frames,
                                          x0[i:i + 1].float().cpu(), list(stream.negatives),
                                          stream.schedule(block, len(gen.steps) - 1), t1 - t0,
                                          time.perf_counter() - d0, stream.prompt,
                                          recache_seconds if i in due else 0.0)
                first_frames[name] += 0 if frames is None else len(frames)
            yield chunks
            block += 1
