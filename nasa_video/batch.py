"""Several streams in one forward: a batch of videos with their own prompts, negatives, scales and seeds, advanced
block by block together, one batched forward per denoising step (and one for the cache pass).

What is batched: the latents [B, C, F, h, w], the self-attention cache (one SelfAttentionCache with B rows), and
the text K/V: every stream's positive and negatives side by side as heads, padded to the batch's largest number of
negatives with zero K/V whose alpha is 0, so each stream's NASA output is Z+_b - sum_i alpha_{b,i} Z-_{b,i} with its
own alphas (BatchedNASAPlan). What stays per stream: its Stream object (text cache, scale schedule, pending changes,
random generator, initial noise) and its VAE decoder. A change to one stream (set_prompt, set_negative, set_scale)
acts from the next block for that stream only; the others are untouched.

Joining and leaving: a stream can leave between blocks (remove(): its cache rows go), and a new one can join a
running batch from the next block (add()): it gets an empty cache row, and the slots filled before it came are
masked out of its attention (SelfAttentionCache.valid), so it sees only its own frames, as it would alone. The
batch's streams share RoPE positions (the batch's block counter), so a late stream's frames sit at later
positions than they would alone; attention depends on position differences only, so it makes the same video
(within fp32 rounding, tested). That needs a rolling cache without sink frames (a late stream has no frames of
its own in the sinks); a fixed cache or sinks refuse a join with one line. Each stream has its own length and
leaves the batch after its last block; the batch ends when no stream is left. Long batches re-base their
positions as a single rolling stream does (pipeline.rebase_positions).

Scope: in-attention NASA and none (the project's method and the baseline); NAG / VSF / CFG streams run alone.
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch

from .attention import attend_prompts
from .errors import UserError
from .guidance import AttentionPlan, CrossAttentionProcessor, Guidance, GuidanceSetting, PlainPlan, TextKV
from .pipeline import FrameChunk, Stream, _sync, method_from_config, pixel_frames, rebase_positions
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


SPEC_KEYS = {"prompt", "negative", "scale", "seed", "prompt_embeds", "negative_prompt_embeds", "latents", "generator",
             "frames", "method"}


class _Member:
    """A stream's place in the batch: the block it joined at, its random generator, decoder and frames so far."""

    def __init__(self, stream: Stream, joined: int, device, decoder):
        self.stream, self.joined, self.decoder, self.first_frame = stream, joined, decoder, 0
        self.rng = stream.generator if stream.generator is not None else \
            torch.Generator(device=device).manual_seed(int(stream.seed))


class StreamBatch:
    """Several streams, one batched forward per step. Iterate: one dict {name: FrameChunk} per block (step() makes
    one block), until every stream has made its last block.

    specs: one dict per stream with Stream's per-video arguments (prompt, negative, scale, seed, prompt_embeds,
    negative_prompt_embeds, latents, generator, frames: its own length, default the batch's; method: "nasa" or "none",
    default the batch's) and an optional name (default: its index). Change a stream between blocks with batch[name].set_prompt / set_negative / set_scale
    (from the next block); remove(name) drops it (its cache rows go) and add(spec) adds one, both from the next
    block. A chunk's block and first_frame count from the stream's own start."""

    def __init__(self, gen, specs: Sequence[dict], guidance: str | Guidance | None = None, frames: int | None = None,
                 rolling: bool | None = None, decode: bool = True):
        if not specs:
            raise UserError("a stream batch needs at least one stream")
        method = guidance if isinstance(guidance, Guidance) else method_from_config(gen.cfg, guidance)
        if method.name not in BATCH_METHODS:
            raise UserError(f"stream_batch runs {' and '.join(BATCH_METHODS)}; run {method.name} streams one by one")
        self.gen, self.method, self.decode, self.frames = gen, method, decode, frames
        self.rolling = gen.spec.cache.rolling if rolling is None else bool(rolling)
        self.endless = self.rolling and hasattr(gen.model, "shift_positions")  # re-bases its positions
        self.fpb = gen.spec.video.frames_per_block
        self.members: dict = {}
        self._joining: dict = {}
        self._removed: set = set()
        self.block = 0  # the batch's block counter: every stream's frames sit at its positions
        self.offset = 0  # positions taken off by re-bases
        self.kv_cache = None
        self.held: dict[int, torch.Tensor] = {}  # position -> the batch's cache-pass input [B, C, F, h, w]
        for index, spec in enumerate(specs):
            self.add(spec, index)

    def __getitem__(self, name) -> Stream:
        member = self.members.get(name) or self._joining.get(name)
        if member is None:
            raise KeyError(name)
        return member.stream

    def __contains__(self, name) -> bool:
        return (name in self.members or name in self._joining) and name not in self._removed

    def __len__(self) -> int:
        return len([n for n in (*self.members, *self._joining) if n not in self._removed])

    @property
    def running(self) -> bool:
        """The batch has made a block (a stream added now joins a running batch)."""
        return self.kv_cache is not None

    @property
    def accepts_joins(self) -> bool:
        """Whether add() can take a stream now: before the first block always; mid-run only on a rolling cache
        without sink frames (the module docstring says why)."""
        return not self.running or (self.rolling and not self.gen.spec.cache.sink_frames)

    def add(self, spec: dict, name=None):
        """A new stream, from the next block. On a running batch this needs a rolling cache without sink frames (the
        module docstring says why). Returns its name. Bad arguments raise UserError now, not mid-block."""
        spec = dict(spec)
        name = spec.pop("name", len(self.members) + len(self._joining) if name is None else name)
        if isinstance(name, bool) or not isinstance(name, (str, int)):
            raise UserError(f"a stream's name is a string or a number, not {type(name).__name__} ({name!r:.40})")
        if name in self.members or name in self._joining:
            raise UserError(f"two streams are named {name!r}")
        unknown = set(spec) - SPEC_KEYS
        if unknown:
            raise UserError(f"stream {name!r}: unknown argument {sorted(unknown)[0]!r}")
        cache = self.gen.spec.cache
        if not self.accepts_joins:
            raise UserError("a stream can join a running batch only on a rolling cache without sink frames "
                            "(rolling=True, cache.sink_frames: 0); start another batch for it")
        method = self.method
        if spec.get("method") is not None:
            method = method_from_config(self.gen.cfg, spec["method"])
            if method.name not in BATCH_METHODS:
                raise UserError(f"stream {name!r}: a batch runs {' and '.join(BATCH_METHODS)}, not {method.name}")
        stream = Stream(self.gen, spec.get("prompt"), spec.get("negative"), spec.get("scale"), method,
                        spec.get("frames", self.frames), spec.get("seed", 0), self.rolling, self.decode,
                        prompt_embeds=spec.get("prompt_embeds"),
                        negative_prompt_embeds=spec.get("negative_prompt_embeds"), latents=spec.get("latents"),
                        generator=spec.get("generator"))
        if stream.latent_total is not None and not self.rolling and stream.latent_total > cache.capacity_frames:
            raise UserError(f"{pixel_frames(stream.latent_total, self.gen.temporal_stride)} frames need "
                            f"{stream.latent_total} latent frames but the cache holds {cache.capacity_frames}")
        decoder = self.gen.codec.streaming_decoder() if self.decode else None
        self._joining[name] = _Member(stream, -1, self.gen.device, decoder)
        return name

    def remove(self, name) -> None:
        """Stop a stream: from the next block the batch runs without it (its cache rows are dropped)."""
        if name not in self:
            raise UserError(f"no stream named {name!r} in the batch")
        self._removed.add(name)

    def __iter__(self) -> Iterator[dict]:
        while True:
            chunks = self.step()
            if not chunks:
                return
            yield chunks

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _update_members(self) -> None:
        """Between blocks: drop the streams that left (and their cache rows), then give the joiners theirs."""
        for name in [n for n in self._joining if n in self._removed]:
            del self._joining[name]
        gone = [n for n in self.members if n in self._removed]
        self._removed = set()
        if gone:
            keep = [i for i, name in enumerate(self.members) if name not in gone]
            self.members = {n: m for n, m in self.members.items() if n not in gone}
            if self.kv_cache is not None and keep:
                index = torch.tensor(keep, device=self.gen.device)
                self.kv_cache.select_rows(index)
                self.held = {s: x.index_select(0, index) for s, x in self.held.items()}
            elif not keep:  # everyone left: the next stream starts a fresh cache
                self.kv_cache, self.held, self.block, self.offset = None, {}, 0, 0
        if not self._joining:
            return
        if self.kv_cache is not None:
            count = len(self._joining)
            self.kv_cache.add_rows(count)
            self.held = {s: torch.cat([x, x.new_zeros(count, *x.shape[1:])]) for s, x in self.held.items()}
        for name, member in self._joining.items():
            member.joined = self.block
            self.members[name] = member
        self._joining = {}

    def _text(self) -> list[CrossAttentionProcessor]:
        """The batched text K/V per layer, rebuilt only when some stream's text cache changed."""
        layers = [m.stream.text_cache.layers for m in self.members.values()]
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
        for member in self.members.values():
            stream = member.stream
            if not guided or stream.guidance.name == "none":
                rows.append(tuple(0.0 for _ in stream.negatives))
            else:
                local = max(0, block - member.joined)
                rows.append(tuple(stream.text_cache.alphas(stream.schedule.at(local, step, stream.guidance))))
        return tuple(rows)

    def _forward(self, x, t_value: float, position: int, block: int, step: int, guided: bool = True) -> torch.Tensor:
        model = self.gen.model
        model.set_cross_attention(self._text())
        self._setting.alphas = self._alphas(block, step, guided)
        t = torch.full((x.shape[0], self.fpb), float(t_value), device=self.gen.device)
        return model(x, t, position, self.kv_cache), t

    def _draw(self, shape) -> torch.Tensor:
        return torch.cat([torch.randn(shape, generator=m.rng, device=self.gen.device, dtype=torch.float32)
                          for m in self.members.values()])

    @torch.no_grad()
    def _recache(self, rows: list[int]) -> float:
        """Re-run the cache pass over the held blocks for the streams in `rows` (the others' K/V are restored)."""
        t0 = time.perf_counter()
        cache, context_t, last = self.kv_cache, self.gen.spec.sampling.context_noise, len(self.gen.steps) - 1
        keep = [i for i in range(len(self.members)) if i not in rows]
        saved = [(k[keep].clone(), v[keep].clone()) for k, v in zip(cache.k, cache.v)] if keep else None
        guided = self.gen.spec.guidance.in_cache_pass
        for position in sorted(self.held):
            self._forward(self.held[position], context_t, position, (position + self.offset) // self.fpb, last, guided)
        if saved is not None:
            for (k, v), (k_old, v_old) in zip(zip(cache.k, cache.v), saved):
                k[keep], v[keep] = k_old, v_old
        _sync(self.gen.device)
        return time.perf_counter() - t0

    def _start_cache(self) -> None:
        gen, spec = self.gen, self.gen.spec
        h, w = next(iter(self.members.values())).stream.latent_hw
        self.kv_cache = gen.model.new_kv_cache(len(self.members), spec.cache.capacity_frames, h, w, self.rolling,
                                               spec.cache.sink_frames, gen.dtype, gen.device)
        self.held = {}

    @torch.no_grad()
    def step(self) -> dict:
        """Make one block of every stream: {name: FrameChunk}; {} when no stream is left. Streams whose last block
        this was leave the batch."""
        gen, spec = self.gen, self.gen.spec
        device, flow = gen.device, gen.flow
        self._update_members()
        if not self.members:
            return {}
        if self.kv_cache is None:
            self._start_cache()
        members = list(self.members.values())
        names = list(self.members)
        due = [i for i, m in enumerate(members) if m.stream._apply_pending()]
        recache_seconds = self._recache(due) if due and self.held else 0.0
        start = self.block * self.fpb
        self.offset, self.held = rebase_positions(gen, (self.kv_cache,), self.held, start, self.offset, self.fpb,
                                                  spec.cache.capacity_frames, self.endless, "the streams")
        position = start - self.offset
        h, w = members[0].stream.latent_hw
        shape = (1, gen.model.config.in_channels, self.fpb, h, w)
        t0 = time.perf_counter()
        x = torch.cat([m.stream._initial_noise(self.block - m.joined, shape, m.rng) for m in members])
        x0 = x
        for step, t_value in enumerate(gen.steps):
            output, t = self._forward(x, t_value, position, self.block, step)
            x0 = flow.prediction_to_x0(output.float(), x, t, gen.prediction)
            if step + 1 < len(gen.steps):
                x = flow.add_noise(x0, self._draw(shape), torch.full_like(t, gen.steps[step + 1]))
        context_t = spec.sampling.context_noise
        context = x0
        if context_t > 0:
            context = flow.add_noise(x0, self._draw(shape),
                                     torch.full((len(members), self.fpb), float(context_t), device=device))
        self._forward(context, context_t, position, self.block, len(gen.steps) - 1, spec.guidance.in_cache_pass)
        self.held[position] = context
        self.held = self.kv_cache.still_held(self.held, self.fpb)
        _sync(device)
        t1 = time.perf_counter()
        chunks = {}
        for i, (name, member) in enumerate(zip(names, members)):
            stream, local = member.stream, self.block - member.joined
            d0 = time.perf_counter()
            frames = to_uint8(member.decoder.decode(x0[i:i + 1]))[0].numpy() if self.decode else None
            chunks[name] = FrameChunk(local, member.first_frame, (local * self.fpb, (local + 1) * self.fpb), frames,
                                      x0[i:i + 1].float().cpu(), list(stream.negatives),
                                      stream.schedule(local, len(gen.steps) - 1), t1 - t0,
                                      time.perf_counter() - d0, stream.prompt,
                                      recache_seconds if i in due else 0.0)
            member.first_frame += 0 if frames is None else len(frames)
            if stream.num_blocks is not None and local + 1 >= stream.num_blocks:
                self._removed.add(name)  # its last block: it leaves before the next one
        self.block += 1
        return chunks
