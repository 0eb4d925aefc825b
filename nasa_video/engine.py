"""The block loop: the one place that knows the order of a block, for any number of videos at once.

    for each block:
        apply each video's queued changes (prompt, negatives, scale); re-cache the window of those that asked
        re-base the positions when the block would pass the RoPE table (rolling caches)
        x = each video's initial noise                                            [B, C, F, h, w]
        for each step t_i:  x0 = G(x_t, t_i)   [guidance inside every cross-attention, per row]
                            x_{t_{i+1}} = (1 - s) x0 + s * fresh noise      (not after the last step)
        one cache pass over the clean x0 at t = context_noise (writes the K/V later blocks read)
        decode each video's block (its own streaming decoder; on a worker while the next block is denoised when
        overlapped) -> one FrameChunk per video

A video is a Stream (its text cache, scale schedule, queued changes, random generator and initial noise); the
engine holds the rows of the shared self-attention cache. A Stream iterated alone is an engine of one video; a
StreamBatch adds and removes videos between blocks. A method with `conditions` > 1 (CFG) takes that many rows
of the same cache per video (its conditional and unconditional passes, one forward) and its `combine` turns them
into the video's prediction; every other method takes one row, guided inside cross-attention with the video's
own alphas (Guidance.prepare_rows).

Joining a running engine: a new video gets empty cache rows and the slots filled before it came are masked out
of its attention (SelfAttentionCache.valid), so it sees only its own frames. The videos share RoPE positions (the
engine's block counter); attention depends on position differences only, so a late video makes the video it
would make alone (within fp32 rounding). That needs a rolling cache without sink frames (a late video has no
frames of its own in the sinks): accepts_joins says so.

Overlapped decode (overlap=True): a video's block k is decoded on a worker (its own CUDA stream) while block
k + 1 is denoised, and its chunk comes out once block k + 1's denoising is done; frames and their order are those
of the sequential loop. A video's first block is the exception: it comes out at once (the first-block latency is
the sequential one). A change (or a remove) made after chunk k therefore acts from block k + 2: block k + 1 is
already made, and is still handed out.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import check_cache_holds
from .errors import UserError
from .guidance import NoGuidance, RowsGuidance, RowsText
from .model.cross_attention import CrossAttentionProcessor, GuidanceSetting
from .vae import OverlappedDecoder, decode_now

_PLAIN = NoGuidance()
JOIN_REFUSED = ("a stream can join a running batch only on a rolling cache without sink frames, on a generator that "
                "re-bases its positions (rolling=True, cache.sink_frames: 0); start another batch for it")


@dataclass
class FrameChunk:
    """One block's output. frames: [T, H, W, 3] uint8 (None when decode=False). latents: the block's clean latents
    [1, C, F, h, w] (float32, CPU), always returned, decoded or not: concatenate them on dim 2 for the video's.
    prompt: the positive prompt the block was made with. recache_seconds: time spent before this block re-caching
    the self-attention window under a new prompt (set_prompt(..., recache=True)); 0 when none ran."""

    block: int
    first_frame: int  # index in the video of frames[0]
    latent_frames: tuple[int, int]  # [start, end) latent frames of this block
    frames: np.ndarray | None
    latents: torch.Tensor  # [1, C, F, h, w] on the CPU, float32
    negative: list[tuple[str, float]]
    scale: float
    denoise_seconds: float
    decode_seconds: float  # the decode's own time (on the worker when overlapped)
    prompt: str = ""
    recache_seconds: float = 0.0
    decode_wait_seconds: float = 0.0  # what the loop waited for it: all of it sequentially, less when overlapped


def sync(device: torch.device) -> None:
    """Wait for this thread's stream (not the whole device: an overlapped decode runs on another stream)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def rebase_positions(gen, kv_cache, held: dict, start: int, offset: int, fpb: int, capacity: int, endless: bool,
                     what: str) -> tuple[int, dict]:
    """(offset, held) for the block at latent frame `start`, given the positions taken off so far (`offset`). When
    the block would pass the RoPE table, a rolling cache re-bases: the cached non-sink frames move back by
    delta = position - (capacity - fpb), so the window left after this block's eviction sits right after the sink
    frames, as when the cache first filled, and the block goes at capacity - fpb. Relative positions inside the
    window are unchanged; the sinks keep positions 0..sink-1, so only the sink-to-window distance changes (back to
    what it was then). `held` ({block: (position, cache-pass input)}, for a re-cache) moves with its frames. A
    fixed cache (or a generator without shift_positions) stops here with one line."""
    position, limit = start - offset, gen.model.max_frame_positions
    if position + fpb <= limit:
        return offset, held
    if not endless or capacity > limit:
        raise UserError(f"{what} reached latent frame {start}, the last position {gen.cfg.name} encodes ({limit}); "
                        f"{'it ends' if what == 'the stream' else 'they end'} here")
    delta = position - (capacity - fpb)
    gen.model.shift_positions(kv_cache, delta)
    sink = kv_cache.sink_frames
    # a window block whose new position falls among the sinks' is the one this block's place() evicts: drop it
    # (kept, it would share a position with a sink block and a re-cache would write it over the sinks)
    return offset + delta, {block: (p if p < sink else p - delta, context) for block, (p, context) in held.items()
                            if p < sink or p - delta >= sink}


class _Video:
    """A video's place in the engine: the block it joined at, its random generator, decoder, frames so far and the
    chunk whose decode is in flight."""

    def __init__(self, name, stream, joined: int, device, decoder):
        self.name, self.stream, self.joined, self.decoder, self.first_frame = name, stream, joined, decoder, 0
        self.rng = stream.generator if stream.generator is not None else \
            torch.Generator(device=device).manual_seed(int(stream.seed))
        self.pending = None  # overlapped: (the chunk's fields, the Future of its frames)

    @property
    def conditions(self) -> int:
        return self.stream.guidance.conditions


class BlockEngine:
    """Runs blocks for the videos it holds (see the module docstring). add() / remove() act from the next block;
    step() makes blocks until some chunk is ready and returns {name: FrameChunk}, or None once no video is left
    and every chunk is out."""

    def __init__(self, gen, rolling: bool, decode: bool = True, overlap: bool = False, alone: bool = False):
        """alone: the engine of one Stream (its errors end it; a batch's video that fails leaves instead)."""
        spec = gen.spec
        self.gen, self.rolling, self.decode, self.alone = gen, bool(rolling), decode, alone
        self.what = "the stream" if alone else "the streams"  # in messages
        self.endless = self.rolling and hasattr(gen.model, "shift_positions")  # re-bases its positions
        self.fpb = spec.video.frames_per_block
        self.capacity = spec.cache.capacity_frames
        self.context_noise = float(spec.sampling.context_noise)
        self.videos: dict = {}
        self._joining: dict = {}
        self._removed: set = set()
        self._leaving: list[_Video] = []  # videos that left with a decode in flight
        self.block = 0  # the engine's block counter: every video's frames sit at its positions
        self.offset = 0  # positions taken off by re-bases
        self.kv_cache = None
        self._released = False
        self.held: dict[int, tuple[int, torch.Tensor]] = {}  # engine block -> (position, cache-pass input [B, ...])
        self.overlap = decode and overlap
        self.worker: OverlappedDecoder | None = None  # made at the first overlapped decode (again after close())
        self._error: UserError | None = None
        self.failed: dict = {}  # name -> the UserError its own inputs gave (it left; the others went on)
        self._sigmas: dict[float, float] = {}
        self._text_key: tuple | None = None
        self._rows_guidance: dict[tuple, RowsGuidance] = {}

    # ---- membership -------------------------------------------------------------------------------------------
    def __contains__(self, name) -> bool:
        return (name in self.videos or name in self._joining) and name not in self._removed

    def __len__(self) -> int:
        return len([n for n in (*self.videos, *self._joining) if n not in self._removed])

    def get(self, name):
        video = self.videos.get(name) or self._joining.get(name)
        return None if video is None else video.stream

    @property
    def running(self) -> bool:
        """A block has been made and some video is still in (a video added now joins a running engine)."""
        return self.kv_cache is not None and bool(self.videos)

    @property
    def accepts_joins(self) -> bool:
        """Whether add() can take a video now: before the first block always; mid-run only on a rolling cache
        without sink frames whose positions re-base (the module docstring says why; without re-bases the engine's
        shared positions would run out for a late video whose own length fits)."""
        return not self.running or (self.endless and not self.gen.spec.cache.sink_frames)

    def check_new(self, name) -> None:
        """Whether a video of this name can be added now (one line if not)."""
        if name in self.videos or name in self._joining:
            raise UserError(f"two streams are named {name!r}")
        if not self.accepts_joins:
            raise UserError(JOIN_REFUSED)

    def add(self, stream, name, decoder) -> None:
        """A video from the next block. decoder: its streaming decoder (None when the engine does not decode)."""
        self.check_new(name)
        if stream.latent_total is not None:
            check_cache_holds(stream.latent_total, self.capacity, self.rolling, self.gen.temporal_stride)
        self._joining[name] = _Video(name, stream, -1, self.gen.device, decoder)

    def remove(self, name) -> None:
        """Stop a video: from the next block the engine runs without it (its cache rows are dropped)."""
        if name not in self:
            raise UserError(f"no stream named {name!r} in the batch")
        self._removed.add(name)

    def close(self) -> None:
        """Let a decode in flight finish and stop the decode worker (a later step() starts another)."""
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def _rows_of(self, indices) -> list[int]:
        """Cache rows of the videos at these indices (each video has `conditions` consecutive rows)."""
        rows, first = [], 0
        wanted = set(indices)
        for i, video in enumerate(self.videos.values()):
            if i in wanted:
                rows += range(first, first + video.conditions)
            first += video.conditions
        return rows

    def _update_videos(self) -> None:
        """Between blocks: drop the videos that left (and their cache rows), then give the joiners theirs."""
        for name in [n for n in self._joining if n in self._removed]:
            del self._joining[name]
        gone = [n for n in self.videos if n in self._removed]
        self._removed = set()
        if gone:
            keep = [i for i, name in enumerate(self.videos) if name not in gone]
            for name in gone:
                video = self.videos[name]
                if video.stream.num_blocks is not None and self.block - video.joined >= video.stream.num_blocks:
                    video.stream.ended = True  # every block is made: a later change would apply to nothing
                if video.pending is not None:
                    self._leaving.append(video)
            if keep:
                device = self.gen.device
                self.kv_cache.select_rows(torch.tensor(self._rows_of(keep), device=device))
                index = torch.tensor(keep, device=device)
                self.held = {b: (p, x.index_select(0, index)) for b, (p, x) in self.held.items()}
            self.videos = {n: v for n, v in self.videos.items() if n not in gone}
            self._rows_guidance = {}  # keyed by the videos' method objects: rebuilt for the new mix
        if not self._joining:
            return
        if not self.videos:  # everyone left (the cache stays for a look until then): the next video starts afresh
            self._release_cache()
            self.kv_cache, self.held, self.block, self.offset = None, {}, 0, 0
        if self.kv_cache is not None:
            self.kv_cache.add_rows(sum(v.conditions for v in self._joining.values()))
            count = len(self._joining)
            self.held = {b: (p, torch.cat([x, x.new_zeros(count, *x.shape[1:])])) for b, (p, x) in self.held.items()}
        for name, video in self._joining.items():
            video.joined = self.block
            self.videos[name] = video
        self._joining = {}
        self._rows_guidance = {}

    # ---- guidance per row -------------------------------------------------------------------------------------
    def _sigma(self, t_value: float) -> float:
        """The noise level of a timestep (computed once per value: no forward copies a timestep to the host)."""
        if t_value not in self._sigmas:
            self._sigmas[t_value] = float(self.gen.flow.sigma(torch.tensor([float(t_value)])).max())
        return self._sigmas[t_value]

    def _processors(self) -> list[CrossAttentionProcessor]:
        """Per layer, a processor holding every row's text K/V; rebuilt only when some video's text changed."""
        texts = []
        for video in self.videos.values():
            stream = video.stream
            texts.append(stream.text_cache.layers)
            if video.conditions > 1:
                texts.append(stream.uncond_cache.layers)
        key = tuple(layers[0] for layers in texts)
        if self._text_key is None or len(key) != len(self._text_key) or any(
                a is not b for a, b in zip(key, self._text_key)):
            self._text_key = key
            self._setting = GuidanceSetting(_PLAIN)
            self._layer_processors = [CrossAttentionProcessor(RowsText([layers[i] for layers in texts]), self._setting)
                                      for i in range(len(texts[0]))]
        return self._layer_processors

    def _guidance_for(self, methods: tuple) -> RowsGuidance:
        key = tuple(id(m) for m in methods)
        if key not in self._rows_guidance:
            self._rows_guidance[key] = RowsGuidance(methods)
        return self._rows_guidance[key]

    def _predict(self, x: torch.Tensor, t_value: float, position: int, step: int, block: int,
                 cache_pass: bool) -> torch.Tensor:
        """One prediction per video (v, or x0 for x0-prediction models) for x [B, C, F, h, w] at t_value: one forward
        over every row, each row guided with its video's method and alphas (at the video's own block), CFG's rows
        combined."""
        gen, sigma = self.gen, self._sigma(t_value)
        videos = list(self.videos.values())
        methods, alphas, scales = [], [], []
        for video in videos:
            stream = video.stream
            scheduled = stream.schedule.at(max(0, block - video.joined), step, stream.guidance)
            if video.conditions > 1:  # its rows are plain passes on their own texts, combined below
                methods += [_PLAIN] * video.conditions
                alphas += [()] * video.conditions
                scales.append(stream.guidance.scale_at(scheduled, sigma))
            else:
                method = stream.cache_pass_guidance if cache_pass else stream.guidance
                methods.append(method)
                alphas.append(tuple(stream.text_cache.alphas(method.scale_at(scheduled, sigma))))
        multi = len(methods) > len(videos)
        rows = torch.cat([x[i:i + 1] for i, v in enumerate(videos) for _ in range(v.conditions)]) if multi else x
        gen.model.set_cross_attention(self._processors())
        self._setting.method, self._setting.alphas = self._guidance_for(tuple(methods)), tuple(alphas)
        t = torch.full((rows.shape[0], self.fpb), float(t_value), device=gen.device)
        out = gen.model(rows, t, position, self.kv_cache)
        if not multi:
            return out
        predictions, first, scale = [], 0, iter(scales)
        for video in videos:
            c = video.conditions
            part = out[first:first + c]
            predictions.append(part if c == 1 else video.stream.guidance.combine(part.unbind(0), next(scale))[None])
            first += c
        return torch.cat(predictions)

    # ---- the block --------------------------------------------------------------------------------------------
    def _draw(self, shape) -> torch.Tensor:
        """Fresh noise for every video from its own generator, in order."""
        draws = [torch.randn(shape, generator=v.rng, device=self.gen.device, dtype=torch.float32)
                 for v in self.videos.values()]
        return draws[0] if len(draws) == 1 else torch.cat(draws)

    def _release_cache(self) -> None:
        """No video is left: hand the cache back to the generator once (with CUDA graphs, its buffers serve the next)."""
        release = getattr(self.gen.model, "release_kv_cache", None)
        if self.kv_cache is not None and not self._released and release is not None:
            release(self.kv_cache)
        self._released = True

    def _start_cache(self) -> None:
        gen, spec = self.gen, self.gen.spec
        h, w = next(iter(self.videos.values())).stream.latent_hw
        rows = sum(v.conditions for v in self.videos.values())
        self.kv_cache = gen.model.new_kv_cache(rows, self.capacity, h, w, self.rolling, spec.cache.sink_frames,
                                               gen.dtype, gen.device)
        self.held, self._released = {}, False

    @torch.no_grad()
    def _recache(self, due: list[int]) -> float:
        """Re-run the cache pass of every held block, oldest first, under the current text caches, for the videos
        at indices `due` (their conditional row; every other row's K/V are restored): each block rewrites its own
        slots and attends to the (re-cached) slots before it, as its first cache pass did."""
        t0 = time.perf_counter()
        cache, last = self.kv_cache, len(self.gen.steps) - 1
        due_rows = set()
        for i in due:
            due_rows.add(self._rows_of([i])[0])
        keep = [r for r in range(cache.batch) if r not in due_rows]
        saved = [(k[keep].clone(), v[keep].clone()) for k, v in zip(cache.k, cache.v)] if keep else None
        for block in sorted(self.held):
            position, context = self.held[block]
            self._predict(context, self.context_noise, position, last, block, cache_pass=True)
        if saved is not None:
            for k, v, (k_old, v_old) in zip(cache.k, cache.v, saved):
                k[keep], v[keep] = k_old, v_old
        sync(self.gen.device)
        return time.perf_counter() - t0

    def _denoise(self, position: int) -> torch.Tensor:
        """The block's clean latents [B, C, F, h, w] for every video; its cache pass written, its input held."""
        gen, flow = self.gen, self.gen.flow
        videos = list(self.videos.values())
        h, w = videos[0].stream.latent_hw
        shape = (1, gen.model.config.in_channels, self.fpb, h, w)
        noise = [v.stream._initial_noise(self.block - v.joined, shape, v.rng) for v in videos]
        x = noise[0] if len(noise) == 1 else torch.cat(noise)
        x0, last = x, len(gen.steps) - 1
        for step, t_value in enumerate(gen.steps):
            t = torch.full((len(videos), self.fpb), float(t_value), device=gen.device)
            output = self._predict(x, t_value, position, step, self.block, cache_pass=False)
            x0 = flow.prediction_to_x0(output.float(), x, t, gen.prediction)
            if step < last:
                x = flow.add_noise(x0, self._draw(shape), torch.full_like(t, gen.steps[step + 1]))
        # Cache pass: rewrite this block's K/V from the clean prediction so later blocks see clean context.
        context = x0
        if self.context_noise > 0:
            t = torch.full((len(videos), self.fpb), self.context_noise, device=gen.device)
            context = flow.add_noise(x0, self._draw(shape), t)
        self._predict(context, self.context_noise, position, last, self.block, cache_pass=True)
        self.held[self.block] = (position, context)
        self.held = {b: (p, x) for b, (p, x) in sorted(self.held.items())  # each block checked at its own position
                     if self.kv_cache.still_held({p: None}, self.fpb)}
        return x0

    def _drop_failing(self) -> None:
        """Each video's own inputs for the next block, checked before anything is drawn: one that fails leaves
        with its error (alone, the stream ends with it), and the others go on."""
        failed = {}
        for name, video in self.videos.items():
            try:
                video.stream._check_block(self.block - video.joined, len(self.gen.steps))
            except UserError as error:
                failed[name] = error
        if not failed:
            return
        if self.alone:
            raise next(iter(failed.values()))
        self.failed.update(failed)
        for name in failed:
            self.videos[name].stream.ended = True
        self._removed |= set(failed)
        self._update_videos()

    @torch.no_grad()
    def _make_block(self) -> list | None:
        """One block of every video: [(name, video, chunk fields, clean latents [1, ...])]; None when none is left."""
        gen = self.gen
        self._update_videos()
        self._drop_failing()
        if not self.videos:
            self._release_cache()
            return None
        if self.kv_cache is None:
            self._start_cache()
        videos = list(self.videos.values())
        due = [i for i, v in enumerate(videos) if v.stream._before_block(self.block - v.joined)]
        recache_seconds = self._recache(due) if due and self.held else 0.0
        for i in due:
            videos[i].stream.recaches.append((self.block - videos[i].joined, recache_seconds))
        start = self.block * self.fpb
        offset, self.held = rebase_positions(gen, self.kv_cache, self.held, start, self.offset, self.fpb,
                                             self.capacity, self.endless, self.what)
        if offset != self.offset:
            for video in videos:
                video.stream.rebases.append(self.block - video.joined)
        self.offset = offset
        t0 = time.perf_counter()
        x0 = self._denoise(start - self.offset)
        sync(gen.device)
        denoise_s = time.perf_counter() - t0
        last = len(gen.steps) - 1
        made = []
        for i, (name, video) in enumerate(self.videos.items()):
            stream, local = video.stream, self.block - video.joined
            fields = dict(block=local, latent_frames=(local * self.fpb, (local + 1) * self.fpb),
                          latents=x0[i:i + 1].float().cpu(), negative=list(stream.negatives),
                          scale=stream.schedule(local, last), denoise_seconds=denoise_s, prompt=stream.prompt,
                          recache_seconds=recache_seconds if i in due else 0.0)
            made.append((name, video, fields, x0[i:i + 1]))
            if stream.num_blocks is not None and local + 1 >= stream.num_blocks:
                self._removed.add(name)  # its last block: it leaves before the next one
        self.block += 1
        return made

    # ---- chunks -----------------------------------------------------------------------------------------------
    @staticmethod
    def _finish(video: _Video, fields: dict, frames, decode_s: float, wait_s: float) -> FrameChunk:
        chunk = FrameChunk(first_frame=video.first_frame, frames=frames, decode_seconds=decode_s,
                           decode_wait_seconds=wait_s, **fields)
        video.first_frame += 0 if frames is None else len(frames)
        return chunk

    def _collect(self, video: _Video) -> FrameChunk:
        fields, future = video.pending
        video.pending = None
        t = time.perf_counter()
        frames, decode_s = future.result()
        return self._finish(video, fields, frames, decode_s, time.perf_counter() - t)

    def _flush(self) -> dict:
        """Every chunk whose decode is in flight (the videos that left first)."""
        ready = self._collect_leavers()
        for name, video in self.videos.items():
            if video.pending is not None:
                ready[name] = self._collect(video)
        return ready

    def _collect_leavers(self) -> dict:
        ready = {video.name: self._collect(video) for video in self._leaving}
        self._leaving = []
        return ready

    def step(self) -> dict | None:
        """Make blocks until some chunk is ready: {name: FrameChunk}; None once no video is left and every chunk is
        out. A failure that ends the videos (a fixed cache at its last position) first hands out the chunks
        already made, then raises on the next call."""
        while True:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            try:
                made = self._make_block()
            except UserError as error:
                ready = self._flush()
                if not ready:
                    raise
                self._error = error
                return ready
            if made is None:
                return self._flush() or None
            ready = self._collect_leavers()  # videos that left after their last block: its chunk, now
            for name, video, fields, x0 in made:
                if not self.decode:
                    ready[name] = self._finish(video, fields, None, 0.0, 0.0)
                elif not self.overlap:
                    frames, decode_s = decode_now(video.decoder, x0)
                    ready[name] = self._finish(video, fields, frames, decode_s, decode_s)
                else:
                    if self.worker is None:
                        self.worker = OverlappedDecoder(None, self.gen.device)
                    future = self.worker.submit(x0, video.decoder)  # decodes while the next block is denoised
                    if video.pending is not None:  # the previous block, decoded while this one was denoised
                        ready[name] = self._collect(video)
                    video.pending = (fields, future)
                    if fields["block"] == 0:  # first-block latency: out now rather than after the next block
                        ready[name] = self._collect(video)
            if ready:
                return ready
