"""Caches of the streaming generator: self-attention K/V of past frames, and text K/V of the prompts."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..guidance import Guidance, NoGuidance, TextKV, merge_text_kv
from .cross_attention import CrossAttentionProcessor, GuidanceSetting


@dataclass
class PromptEmbeddings:
    """Text encoder outputs [B, L, text_dim] of the positive prompt and its negatives, handed to the generator's
    forward instead of a TextCache: the K/V are then built inside the forward (training, FSDP)."""

    positive: torch.Tensor
    negatives: list[torch.Tensor] = field(default_factory=list)
    lengths: tuple[int, ...] | None = None


class SelfAttentionCache:
    """Per-layer K/V of the latent frames generated so far (RoPE already applied at absolute positions).

    Frame slots are filled left to right. A block's forward passes write its own slots (the last pass, the
    clean cache pass, is what later blocks see) and attend to every slot up to the block's end.
    rolling=False: a fixed cache of capacity_frames (CausVid: 21); a longer video is an error.
    rolling=True (Self-Forcing style): when a new block does not fit, the oldest frames after the first
    sink_frames are evicted, so the window is the sink frames plus the most recent frames.
    `frames` holds each slot's temporal RoPE position; shift_positions() moves the non-sink frames back (an
    endless stream re-bases its positions so it never runs past the RoPE table).
    Rows joined mid-run (add_rows: a stream joining a batch) hold nothing in the slots filled before they came:
    `valid` [B, capacity_frames] says which slots each row may attend to, and key_mask() hides the others. It is
    None while every row may see every filled slot (the unmasked fast path), and drops back to None once the
    slots a late row never filled have rolled out of the window.
    """

    def __init__(self, num_layers: int, batch: int, capacity_frames: int, tokens_per_frame: int, heads: int,
                 head_dim: int, dtype: torch.dtype, device, rolling: bool = False, sink_frames: int = 0,
                 buffers: tuple[list, list] | None = None):
        """buffers: (K, V) per layer of a finished cache of this shape to reuse (zeroed here), instead of new ones:
        CUDA graphs captured on them replay for this cache (model.graphs)."""
        if rolling and not 0 <= sink_frames < capacity_frames:
            raise UserError(f"sink_frames must be in [0, {capacity_frames}) for a rolling cache of {capacity_frames} frames")
        shape = (batch, capacity_frames * tokens_per_frame, heads, head_dim)
        if buffers is not None:
            self.k, self.v = list(buffers[0]), list(buffers[1])
            for buffer in (*self.k, *self.v):
                buffer.zero_()
        else:
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity_frames = capacity_frames
        self.tokens_per_frame = tokens_per_frame
        self.rolling = rolling
        self.sink_frames = sink_frames if rolling else 0
        self.frames: list[int] = []  # absolute latent-frame index held by each filled slot
        self.slots = (0, 0)  # token range of the block being generated, set by place()
        self.valid: torch.Tensor | None = None  # bool [B, capacity_frames]; None: every row sees every filled slot

    @staticmethod
    def nbytes_for(num_layers, batch, capacity_frames, tokens_per_frame, heads, head_dim, dtype) -> int:
        return 2 * num_layers * batch * capacity_frames * tokens_per_frame * heads * head_dim * dtype.itemsize

    def reset(self) -> None:
        self.frames = []
        self.slots = (0, 0)
        self.valid = None

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def add_rows(self, count: int) -> None:
        """Append `count` empty rows (streams joining the batch): the slots filled so far are hidden from them; the
        blocks they make from now on are theirs to see."""
        for buffers in (self.k, self.v):
            for i, buffer in enumerate(buffers):
                buffers[i] = torch.cat([buffer, buffer.new_zeros(count, *buffer.shape[1:])])
        old = self.batch - count
        valid = torch.ones(self.batch, self.capacity_frames, dtype=torch.bool, device=self.k[0].device)
        if self.valid is not None:
            valid[:old] = self.valid
        valid[old:, :len(self.frames)] = False
        self.valid = valid
        self._settle()

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the rows in `index` (streams that left the batch are dropped), in that order."""
        index = index.to(self.k[0].device)
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        if self.valid is not None:
            self.valid = self.valid.index_select(0, index)
            self._settle()

    def _settle(self) -> None:
        """Back to the unmasked fast path once every row may see every filled slot."""
        if self.valid is not None and bool(self.valid[:, :len(self.frames)].all()):
            self.valid = None

    def key_mask(self) -> torch.Tensor | None:
        """bool [B, 1, 1, end] (True = attend) over the window the block attends to, or None when no row has slots
        hidden from it."""
        if self.valid is None:
            return None
        start_frame, end_frame = (slot // self.tokens_per_frame for slot in self.slots)
        visible = self.valid[:, :end_frame].clone()
        # A block always sees its own slots: a re-cache pass over a block made before a row joined would otherwise
        # leave that row nothing to attend to (NaN in some kernels); what it writes there stays hidden from it.
        visible[:, start_frame:end_frame] = True
        return visible.repeat_interleave(self.tokens_per_frame, 1)[:, None, None, :]

    def place(self, start_frame: int, num_frames: int) -> None:
        """Choose the slots of the block [start_frame, start_frame + num_frames); roll the cache if needed.
        Repeated passes over the same block reuse its slots; a pass over an earlier block still held (a re-cache at a
        prompt switch) rewrites that block's slots and attends to the slots up to its end, as it did the first time."""
        block = list(range(start_frame, start_frame + num_frames))
        held = self._held_at(block)
        if held is not None and self.frames[-num_frames:] != block:  # a re-cache pass over an earlier held block
            tpf = self.tokens_per_frame
            self.slots = (held * tpf, (held + num_frames) * tpf)
            return
        if self.frames[-num_frames:] != block:
            if self.frames and start_frame != self.frames[-1] + 1:
                raise ValueError(f"blocks must arrive in order: cache ends at frame {self.frames[-1]}, got {start_frame}")
            overflow = len(self.frames) + num_frames - self.capacity_frames
            if overflow > 0:
                self._evict(overflow, start_frame + num_frames)
            if self.valid is not None:  # every row writes the new block's slots
                self.valid[:, len(self.frames):len(self.frames) + num_frames] = True
            self.frames += block
            self._settle()
        end = len(self.frames) * self.tokens_per_frame
        self.slots = (end - num_frames * self.tokens_per_frame, end)

    def _held_at(self, block: list[int]) -> int | None:
        """The slot index of the first frame of `block` when every frame of it is held in order, else None."""
        if not block or block[0] not in self.frames:
            return None
        first = self.frames.index(block[0])
        return first if self.frames[first:first + len(block)] == block else None

    def still_held(self, blocks: dict, frames_per_block: int) -> dict:
        """The entries of {start frame: anything} whose whole block is still in the cache (the inputs kept for a
        re-cache, pruned as the window rolls on)."""
        return {s: item for s, item in blocks.items()
                if self._held_at(list(range(s, s + frames_per_block))) is not None}

    def _evict(self, count: int, frames_needed: int) -> None:
        if not self.rolling:
            raise UserError(f"the video needs {frames_needed} latent frames but the self-attention cache holds "
                            f"{self.capacity_frames}; ask for fewer frames or use a rolling cache (--rolling)")
        sink, keep_from, held = self.sink_frames, self.sink_frames + count, len(self.frames)
        if keep_from > held:
            raise UserError(f"a block of {count} frames does not fit a rolling cache of {self.capacity_frames} "
                            f"frames with {sink} sink frames; enlarge the cache")
        tpf = self.tokens_per_frame
        for cache in (*self.k, *self.v):
            cache[:, sink * tpf:(held - count) * tpf] = cache[:, keep_from * tpf:held * tpf].clone()
        if self.valid is not None:
            self.valid[:, sink:held - count] = self.valid[:, keep_from:held].clone()
        self.frames = self.frames[:sink] + self.frames[keep_from:]

    def shift_positions(self, delta: int, rotate) -> None:
        """Move every held non-sink frame back by delta temporal positions; the sink frames keep theirs.
        rotate(k) turns K [B, N, H, D] stored at position p into K at position p - delta (RoPE rotations compose:
        the model's rotation by -delta on the temporal channels). V carries no position and is kept. Frames whose
        new position falls below the sinks' are only those the next place() evicts."""
        sink, held, tpf = self.sink_frames, len(self.frames), self.tokens_per_frame
        if delta <= 0 or held <= sink:
            return
        for k in self.k:
            k[:, sink * tpf:held * tpf] = rotate(k[:, sink * tpf:held * tpf])
        self.frames = self.frames[:sink] + [f - delta for f in self.frames[sink:]]

    def nbytes(self) -> int:
        """Bytes the cache's K/V buffers hold (fixed at construction: the cache never grows)."""
        return sum(t.nbytes for t in (*self.k, *self.v))

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """One layer's (K buffer, V buffer, start, end): the block writes its K/V into tokens [start, end) and
        attends to [0, end). No layer index reaches the block, so a compiled block serves every layer."""
        start, end = self.slots
        return self.k[layer], self.v[layer], start, end

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this block's K/V for one layer; return the K/V window the block attends to (views, no copy)."""
        start, end = self.slots
        self.k[layer][:, start:end] = k
        self.v[layer][:, start:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]


class TextCache:
    """Per-layer cross-attention K/V of the positive prompt and of each weighted negative prompt, held by one
    cross-attention processor per layer (model.cross_attention.CrossAttentionProcessor; generator.set_text installs them).

    Built once per video. set_negatives() recomputes only the negative K/V (the positive is kept), so a
    running stream can change its negative prompt between blocks. guide() sets the method and the alphas
    (scale x each negative's weight) that every layer's processor uses from the next forward on.
    """

    def __init__(self, model, positive: torch.Tensor):
        self.model = model
        self.heads = model.config.num_attention_heads
        self.positive = model.text_kv(positive)
        self.negative_texts: list[str] = []
        self.weights: list[float] = []
        self.negative_builds = 0
        self.positive_builds = 1
        self._negative_kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per negative, per layer
        self._lengths: list[int] | None = None
        self.setting = GuidanceSetting(NoGuidance())
        self._set_layers([TextKV(k, v, self.heads) for k, v in self.positive])

    def _set_layers(self, layers: list[TextKV]) -> None:
        self.processors = [CrossAttentionProcessor(kv, self.setting) for kv in layers]

    @property
    def layers(self) -> list[TextKV]:
        return [p.text for p in self.processors]

    def set_negatives(self, texts: list[str], weights: list[float], embeddings: list[torch.Tensor],
                      lengths: list[int] | None = None) -> None:
        """lengths: real token count of each negative (VSF drops the padding)."""
        self.negative_texts, self.weights = list(texts), list(weights)
        self._negative_kv = [self.model.text_kv(e) for e in embeddings]
        self._lengths = lengths
        if embeddings:
            self.negative_builds += 1
        self._merge()

    def set_positive(self, embedding: torch.Tensor) -> None:
        """Replace the positive prompt (encoder output [1, L, text_dim]); the negatives' K/V are kept."""
        self.positive = self.model.text_kv(embedding)
        self.positive_builds += 1
        self._merge()

    def _merge(self) -> None:
        if not self._negative_kv:
            self._set_layers([TextKV(k, v, self.heads) for k, v in self.positive])
            return
        self._set_layers([merge_text_kv(positive, [neg[layer] for neg in self._negative_kv], self.heads, self._lengths)
                          for layer, positive in enumerate(self.positive)])

    def alphas(self, scale: float) -> list[float]:
        return [scale * w for w in self.weights]

    def guide(self, method: Guidance, scale: float = 0.0) -> "TextCache":
        """Use this method with alpha_i = scale * weight_i in every layer from the next forward on."""
        self.setting.method, self.setting.alphas = method, tuple(self.alphas(scale))
        return self

    def nbytes(self) -> int:
        return sum(kv.k.nbytes + kv.v.nbytes for kv in self.layers)
