"""A video in progress (Stream) and several of them in one forward (StreamBatch), over the one block loop
(engine.BlockEngine): a Stream iterated alone is an engine of one video; a StreamBatch adds and removes videos
between blocks. Both take the same per-video inputs and the same mid-stream changes (set_prompt, set_negative,
set_scale, from the next block)."""
from __future__ import annotations

from collections import deque
from typing import Iterator, Sequence

import torch

from .engine import BlockEngine, FrameChunk
from .errors import UserError
from .guidance import Guidance, NoGuidance, ScaleSchedule, ScaleSpec, method_from_config, parse_negatives
from .model.cache import TextCache
from .request import (EMBEDS, Negative, ResolvedRequest, VideoRequest, _text_length, check_embeds,  # noqa: F401
                      check_negatives, check_prompt, embeds_length, negative_embeds_items)

_PLAIN = NoGuidance()


class Stream:
    """One video in progress. set_prompt() / set_negative() / set_scale() take effect from the next block and
    compose: only the changed text K/V are rebuilt, the self-attention cache (the video so far) is kept, unless
    set_prompt(..., recache=True) asks to recompute it under the new prompt."""

    def __init__(self, gen, request: VideoRequest | ResolvedRequest, decode: bool = True,
                 overlap_decode: bool | None = None):
        """request: what to make (request.VideoRequest; checked here, once, unless already resolved)."""
        resolved = request if isinstance(request, ResolvedRequest) else request.resolve(gen)
        spec = gen.spec
        self.gen, self.decode = gen, decode
        self.ended = False  # set when every block is made
        # Overlapped, a negative set after chunk k (k >= 1) applies from block k + 2: block k + 1 is already made.
        self.overlap_decode = gen.overlap_decode if overlap_decode is None else bool(overlap_decode)
        self.fpb = spec.video.frames_per_block
        self.rolling, self.endless, self.latent_total = resolved.rolling, resolved.endless, resolved.latent_total
        self.max_latent_frames = gen.model.max_frame_positions  # temporal positions the generator can encode
        self.rebases: deque[int] = deque(maxlen=1024)  # the latest blocks before which positions were re-based
        self.guidance = resolved.method
        self.uncond_cache: TextCache | None = None  # CFG: the negative (or empty) prompt as its own context
        # CFG always refreshes both caches with their own contexts; attention methods follow the config.
        in_cache = spec.guidance.in_cache_pass or not self.guidance.in_attention
        self.cache_pass_guidance = self.guidance if in_cache else _PLAIN
        self.seed, self.generator = resolved.seed, resolved.generator
        self.latent_hw, self.latents = resolved.latent_hw, resolved.latents
        self.prompt = resolved.prompt
        with torch.no_grad():
            self.text_cache = TextCache(gen.model, resolved.prompt_embeds)
        self._pending_prompt: tuple | None = None
        self.negatives: list[tuple[str, float]] = []
        self._negative_items: list[Negative] = []
        self._negative_key: list = []
        self.schedule = resolved.schedule
        self._pending: tuple | None = (resolved.negatives, resolved.schedule)
        self._apply_pending()
        self.switches, self.recache_at_switch = resolved.switches, resolved.recache  # the prompt schedule
        self._engine: BlockEngine | None = None  # the block loop running this video alone (set by iteration)
        self.recaches: list[tuple[int, float]] = []  # (block, seconds) of each re-cache done

    def _given_noise(self, block: int) -> torch.Tensor | None:
        """The given latents' piece for this block (None when none were given)."""
        if self.latents is None:
            return None
        if isinstance(self.latents, torch.Tensor):
            piece = self.latents[:, :, block * self.fpb:(block + 1) * self.fpb]
        else:
            piece = self.latents[block] if block < len(self.latents) else None
        if piece is None or piece.shape[2] != self.fpb:
            raise UserError(f"the given latents end before block {block}; the stream ends here")
        return piece

    def _check_block(self, block: int, steps: int) -> None:
        """What this block needs of the video's own inputs (its initial noise, its scale at every step), checked
        before anything is drawn for it: in a batch, a video whose inputs fail leaves alone."""
        self._given_noise(block)
        for step in range(steps):
            self.schedule.at(block, step, self.guidance)

    def _initial_noise(self, block: int, shape, rng: torch.Generator) -> torch.Tensor:
        piece = self._given_noise(block)
        if piece is None:
            return torch.randn(shape, generator=rng, device=self.gen.device, dtype=torch.float32)
        return piece.to(device=self.gen.device, dtype=torch.float32)

    @property
    def num_blocks(self) -> int | None:
        return None if self.latent_total is None else self.latent_total // self.fpb

    def set_prompt(self, prompt: str | None = None, recache: bool = False,
                   prompt_embeds: torch.Tensor | None = None) -> None:
        """Replace the positive prompt (text, or the encoder's output prompt_embeds [1, L, text_dim]) from the next
        block; the negatives and scale are kept (and set_negative / set_scale compose with it).

        recache=False: later blocks attend to the video so far as it was cached (under the old prompt).
        recache=True (LongLive's KV re-cache): before the next block, the cache pass is re-run over the clean
        latents of every block still in the self-attention cache, oldest first, under the new prompt, so the
        cached window's K/V agree with the new prompt. Cost: one forward per cached block (up to the cache's
        capacity / frames_per_block), reported in the next FrameChunk's recache_seconds."""
        self._check_running("set_prompt")
        if prompt_embeds is None:
            check_prompt(prompt)
            self.gen.text.check_readable(prompt)
            embeds = self.gen.text.encode(prompt)  # fail now, not in the middle of a block
            label = prompt
        else:
            embeds = check_embeds(prompt_embeds, self.gen.model.config.text_dim,
                                  length=_text_length(self.gen)).to(self.gen.device)
            label = prompt if isinstance(prompt, str) and prompt.strip() else EMBEDS
        self._pending_prompt = (label, embeds, bool(recache))

    def set_negative(self, negative, scale: ScaleSpec | None = None, negative_prompt_embeds=None) -> None:
        """Replace the negative prompt(s) (str, list of str, or (text, weight) pairs, and/or negative_prompt_embeds:
        a tensor [1, L, text_dim], a list of them or of (tensor, weight) pairs) from the next block."""
        self._check_running("set_negative")
        items = [Negative(t, w) for t, w in parse_negatives(negative)]
        items += negative_embeds_items(negative_prompt_embeds, self.gen.model.config.text_dim, _text_length(self.gen))
        self._queue_negatives(items, scale)

    def _queue_negatives(self, items: list[Negative], scale: ScaleSpec | None) -> None:
        schedule = self.schedule if scale is None else ScaleSchedule(scale)
        check_negatives(self.gen, self.guidance, items, schedule)  # now, not in the middle of a block
        self._pending = (items, schedule)

    def set_scale(self, scale: ScaleSpec) -> None:
        self._check_running("set_scale")
        self._queue_negatives(self._negative_items if self._pending is None else self._pending[0], scale)

    def _before_block(self, block: int) -> bool:
        """Between blocks (block: the next one, counted from this video's start): the prompt schedule's switch
        for it (unless a set_prompt is queued for it: that call wins), then the queued changes. True when a re-cache
        is due before it."""
        if block in self.switches and self._pending_prompt is None:
            self.set_prompt(self.switches[block], recache=self.recache_at_switch)
        return self._apply_pending()

    def _apply_pending(self) -> bool:
        """Apply the queued changes; True when a re-cache is due before the next block."""
        recache = False
        if self._pending_prompt is not None:
            label, embeds, recache = self._pending_prompt
            self._pending_prompt = None
            with torch.no_grad():
                self.text_cache.set_positive(embeds)
            self.prompt = label
        if self._pending is None:
            return recache
        items, self.schedule = self._pending
        self._pending = None
        texts, weights = [t for t, _, _ in items], [w for _, w, _ in items]
        key = [t if e is None else id(e) for t, _, e in items]
        if key != self._negative_key:
            text = self.gen.text
            embeddings = [text.encode(t) if e is None else e.to(self.gen.device) for t, _, e in items]
            lengths = [text.token_count(t) if e is None else embeds_length(e) for t, _, e in items]
            with torch.no_grad():
                self.text_cache.set_negatives(texts, weights, embeddings, lengths)
                if not self.guidance.in_attention:
                    self.uncond_cache = TextCache(self.gen.model, embeddings[0] if embeddings else text.encode(""))
        if not self.guidance.in_attention and self.uncond_cache is None:
            with torch.no_grad():
                self.uncond_cache = TextCache(self.gen.model, self.gen.text.encode(""))
        self.text_cache.weights = weights
        self.negatives = [(t, w) for t, w, _ in items]
        self._negative_items, self._negative_key = items, key
        return recache

    def __iter__(self) -> Iterator[FrameChunk]:
        """The blocks, one FrameChunk each: the block loop with this video alone (its decoder is the generator's).
        A stream runs once (its text cache and schedule carry the changes made during the run)."""
        if self._engine is not None:
            raise UserError("a stream runs once: call gen.stream(...) again for another video")
        gen = self.gen
        gen.decoder.reset()
        self._engine = BlockEngine(gen, self.rolling, self.decode, self.decode and self.overlap_decode, alone=True)
        self._engine.add(self, 0, gen.decoder if self.decode else None)
        try:
            while (chunks := self._engine.step()) is not None:
                yield chunks[0]
        finally:
            self._engine.close()
        self.ended = True  # every block is made: a later change would apply to nothing

    @property
    def kv_cache(self):
        """The running video's self-attention cache (CFG: its conditional and unconditional rows); None before."""
        return None if self._engine is None else self._engine.kv_cache

    @property
    def held(self) -> dict:
        """{block: (position, cache-pass input)} of the blocks still in the cache (what a re-cache re-runs)."""
        return {} if self._engine is None else self._engine.held

    def _check_running(self, what: str) -> None:
        if self.ended:
            raise UserError(f"{what} after the stream ended (all its blocks are made) would apply to nothing: "
                            f"start a new stream")


class StreamBatch:
    """Several streams, one batched forward per step. Iterate: one dict {name: FrameChunk} per block (step() makes
    one block), until every stream has made its last block.

    What is batched: the latents [B, C, F, h, w], the self-attention cache (one cache with a row per video, two for
    CFG), and the text K/V: each row's method plans its rows with its own alphas (Guidance.prepare_rows; NASA's
    is one fused launch for the whole batch). What stays per stream: its Stream object (text cache, scale
    schedule, pending changes, random generator, initial noise) and its VAE decoder.

    specs: one request per stream, a request.VideoRequest or a dict of its fields (prompt, negative, scale, seed,
    prompt_embeds, negative_prompt_embeds, latents, generator, prompt_at, recache; frames: its own length, default
    the batch's; method: any registered method, default the batch's), a dict with an optional name (default: its
    index). Change a stream between
    blocks with batch[name].set_prompt / set_negative / set_scale (from the next block); remove(name) drops it
    (its cache rows go) and add(spec) adds one, both from the next block; a join mid-run needs a rolling cache
    without sink frames (engine module docstring). A chunk's block and first_frame count from the stream's own
    start. overlap_decode: decode every stream's block k while block k + 1 is denoised (then a step returns the
    chunks that are ready: a stream's block k one step after it was made, its first block at once)."""

    def __init__(self, gen, specs: Sequence[dict], guidance: str | Guidance | None = None, frames: int | None = None,
                 rolling: bool | None = None, decode: bool = True, overlap_decode: bool = False):
        if not specs:
            raise UserError("a stream batch needs at least one stream")
        self.method = guidance if isinstance(guidance, Guidance) else method_from_config(gen.cfg, guidance)
        self.gen, self.decode, self.frames = gen, decode, frames
        self.rolling = gen.spec.cache.rolling if rolling is None else bool(rolling)
        self.fpb = gen.spec.video.frames_per_block
        self.engine = BlockEngine(gen, self.rolling, decode, decode and bool(overlap_decode))
        self._count = 0
        for spec in specs:
            self.add(spec)

    def __getitem__(self, name) -> Stream:
        stream = self.engine.get(name)
        if stream is None:
            raise KeyError(name)
        return stream

    def __contains__(self, name) -> bool:
        return name in self.engine

    def __len__(self) -> int:
        return len(self.engine)

    @property
    def running(self) -> bool:
        """The batch has made a block (a stream added now joins a running batch)."""
        return self.engine.running

    @property
    def accepts_joins(self) -> bool:
        """Whether add() can take a stream now: before the first block always; mid-run only on a rolling cache
        without sink frames."""
        return self.engine.accepts_joins

    def add(self, spec: dict | VideoRequest, name=None):
        """A new stream, from the next block. Returns its name. Bad arguments raise UserError now, not mid-block."""
        fields = dict(vars(spec)) if isinstance(spec, VideoRequest) else dict(spec)
        name = fields.pop("name", self._count if name is None else name)
        if isinstance(name, bool) or not isinstance(name, (str, int)):
            raise UserError(f"a stream's name is a string or a number, not {type(name).__name__} ({name!r:.40})")
        self.engine.check_new(name)  # before its text is encoded (engine.add checks again)
        if fields.get("rolling") is not None and bool(fields["rolling"]) != self.rolling:
            raise UserError(f"stream {name!r}: the batch's streams share one cache; set rolling on the batch")
        request = VideoRequest.from_spec(fields, f"stream {name!r}", method=self.method, frames=self.frames)
        request.rolling = self.rolling
        stream = Stream(self.gen, request, self.decode)
        self.engine.add(stream, name, self.gen.codec.streaming_decoder() if self.decode else None)
        self._count += 1
        return name

    def remove(self, name) -> None:
        """Stop a stream: from the next block the batch runs without it (its cache rows are dropped)."""
        self.engine.remove(name)

    def __iter__(self) -> Iterator[dict]:
        try:
            while True:
                chunks = self.step()
                if not chunks:
                    return
                yield chunks
        finally:
            self.engine.close()

    def step(self) -> dict:
        """Make one block of every stream: {name: FrameChunk}; {} when no stream is left. Streams whose last block
        this was leave the batch; a stream whose own inputs fail for its next block (its given latents end, its
        scale function gives a bad value) leaves with the error in `failed` and the others go on."""
        return self.engine.step() or {}

    @property
    def failed(self) -> dict:
        """{name: UserError} of the streams that left the batch on an error of their own inputs."""
        return self.engine.failed
