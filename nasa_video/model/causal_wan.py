"""The block-causal Wan2.1 generator (CausVid / Self-Forcing), on diffusers' Wan modules and parameter names.

The parameters are exactly diffusers' WanTransformer3DModel (so its configs, from_pretrained and the
original-Wan key converter all apply); only the forward differs:
  - timesteps per latent frame, t [B, F], so modulation is per frame;
  - RoPE temporal positions start at the block's first frame;
  - self-attention reads and writes a SelfAttentionCache (or takes a mask, for the full block-causal forward);
  - cross-attention is each block's attn2 processor (model.cross_attention.CrossAttentionProcessor), installed from a
    TextCache: it holds the prompts' K/V and the guidance method (NASA lives there).
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.utils.checkpoint
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from ..attention import attend
from ..guidance import Guidance, NoGuidance
from .cache import PromptEmbeddings, SelfAttentionCache
from .cross_attention import CrossAttentionProcessor, plain_processors, text_kv
from .graphs import indexed
from .interface import Architecture, register_architecture


def _rope_parts(rope, frame_positions: torch.Tensor, height: int, width: int, device):
    """The fp32 (cos, sin) [1, F*H*W, 1, head_dim] in diffusers' interleaved layout, gathered on `device` from the
    rope module's tables (copied there once and kept: rope._device_tables)."""
    frames = len(frame_positions)
    if int(frame_positions.max()) >= rope.max_seq_len:
        raise ValueError(f"frame {int(frame_positions.max())} is past the RoPE table ({rope.max_seq_len} positions)")
    device = torch.device(device)
    tables = getattr(rope, "_device_tables", {})
    if device not in tables:
        tables[device] = (rope.freqs_cos.to(device).float(), rope.freqs_sin.to(device).float())
        rope._device_tables = tables
    sizes = [rope.t_dim, rope.h_dim, rope.w_dim]
    ranges = [frame_positions.to(device).long(), torch.arange(height, device=device), torch.arange(width, device=device)]
    out = []
    for table in tables[device]:
        t, h, w = (part[idx] for part, idx in zip(table.split(sizes, dim=1), ranges))
        grid = torch.cat([
            t[:, None, None].expand(frames, height, width, -1),
            h[None, :, None].expand(frames, height, width, -1),
            w[None, None, :].expand(frames, height, width, -1),
        ], dim=-1)
        out.append(grid.reshape(1, frames * height * width, 1, -1))
    return out[0], out[1]


def rope_frequencies(rope, frame_positions: torch.Tensor, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, F*H*W, 1, head_dim] (diffusers' interleaved layout) for a grid of patches whose frames sit at
    the given temporal positions (a block starting at frame 6 has positions 6, 7, 8). Built on `device`."""
    return _rope_parts(rope, frame_positions, height, width, device)


def rope_tables(rope, frame_positions: torch.Tensor, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) [1, F*H*W, 1, head_dim] fp32 for apply_rope: the sin of each even channel negated, so the
    rotation of a pair (x0, x1) is x * cos + (x1, x0) * (-sin, sin)."""
    cos, sin = _rope_parts(rope, frame_positions, height, width, device)
    sign = torch.ones(sin.shape[-1], device=sin.device)
    sign[0::2] = -1.0
    return cos.contiguous(), (sin * sign).contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of the head dim in fp32 (cos, signed sin from rope_tables):
    (x0 cos - x1 sin, x1 cos + x0 sin), the same products and sums as diffusers' rotation, in three kernels. A
    bf16 x is promoted by the products (exact), not copied to fp32 first."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return _cast(x * cos + swapped * sin, x.dtype)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.to(dtype) without an op when it already is (fp32 runs then launch nothing)."""
    return x if x.dtype == dtype else x.to(dtype)


def _layer_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """diffusers' FP32LayerNorm: the statistics and the affine in fp32, whatever x's dtype (its choice, kept for
    parity); returns fp32. One fused layer_norm kernel."""
    x = x if x.dtype == torch.float32 else x.float()
    weight, bias = (p if p is None or p.dtype == torch.float32 else p.float() for p in (norm.weight, norm.bias))
    return torch.nn.functional.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """torch.nn.RMSNorm (the QK norms) so it always reaches rms_norm's fused kernel: input and weight in one dtype.
    A weight kept in fp32 under bf16 activations (diffusers' fp32-keep lists, FSDP mixed precision) used to hit
    rms_norm's "Mismatch dtype between input and weight ... Cannot dispatch to fused implementation"; it then
    computes in fp32 and rounds once, as the unfused path did."""
    weight = norm.weight
    if weight is not None and weight.dtype != x.dtype:
        out = torch.nn.functional.rms_norm(x.to(weight.dtype), norm.normalized_shape, weight, norm.eps)
        return out.to(x.dtype)
    return torch.nn.functional.rms_norm(x, norm.normalized_shape, weight, norm.eps)


def _feed_forward(ffn, h: torch.Tensor) -> torch.Tensor:
    """diffusers' FeedForward (gelu-approximate: Linear, tanh-GELU, Dropout, Linear) without its Python module
    walk and the eval-mode dropout call."""
    act = ffn.net[0]
    h = torch.nn.functional.gelu(act.proj(h), approximate=act.approximate)
    return ffn.net[2](h)


def block_causal_mask(num_frames: int, frames_per_block: int, tokens_per_frame: int,
                      window_frames: int | None = None, sink_frames: int = 0, device=None) -> torch.Tensor:
    """Bool [S, S], True = attend: every token sees all frames up to the end of its own block.
    With window_frames (a rolling cache of that many frames), only the sink frames and the most recent
    window_frames - sink_frames frames up to the block's end are visible, as the rolling cache gives."""
    frame = torch.arange(num_frames, device=device)
    block_end = (frame // frames_per_block + 1) * frames_per_block  # exclusive end frame of each frame's block
    q_end, k = block_end[:, None], frame[None, :]
    visible = k < q_end
    if window_frames is not None:
        recent = k >= q_end - (window_frames - sink_frames)
        visible = visible & (recent | (k < sink_frames))
    return visible.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def teacher_forcing_block_mask(num_frames: int, frames_per_block: int, tokens_per_frame: int, device=None,
                               compile: bool = False):
    """The teacher-forcing mask as a flex-attention BlockMask: the same rule, computed per tile, so the
    2 x 21-frame forward of the 1.3B model (65,520 tokens; a dense mask would be 4.3 G entries) fits."""
    from torch.nn.attention.flex_attention import create_block_mask

    total = 2 * num_frames * tokens_per_frame

    def visible(b, h, q_idx, kv_idx):
        q_frame, k_frame = q_idx // tokens_per_frame, kv_idx // tokens_per_frame
        q_noisy, k_noisy = q_frame >= num_frames, k_frame >= num_frames
        q_block = (q_frame % num_frames) // frames_per_block
        k_block = (k_frame % num_frames) // frames_per_block
        clean_query = ~q_noisy & ~k_noisy & (k_block <= q_block)
        noisy_query = q_noisy & ((~k_noisy & (k_block < q_block)) | (k_noisy & (k_block == q_block)))
        return clean_query | noisy_query

    # compile=True builds it tile by tile on the GPU without materialising the dense mask
    return create_block_mask(visible, None, None, total, total, device=device or "cpu", _compile=compile)


def teacher_forcing_mask(num_frames: int, frames_per_block: int, tokens_per_frame: int, device=None) -> torch.Tensor:
    """Bool mask for training on [clean frames | noisy frames] side by side (2 * num_frames frames).
    Clean frames attend block-causally to clean frames (what the cache pass writes at inference); a noisy
    block attends to the clean blocks before it and to itself, exactly what a streamed block sees."""
    frame = torch.arange(2 * num_frames, device=device)
    block = (frame % num_frames) // frames_per_block
    noisy = frame >= num_frames
    q_block, k_block = block[:, None], block[None, :]
    q_noisy, k_noisy = noisy[:, None], noisy[None, :]
    clean_query = ~q_noisy & ~k_noisy & (k_block <= q_block)
    noisy_query = q_noisy & ((~k_noisy & (k_block < q_block)) | (k_noisy & (k_block == q_block)))
    visible = clean_query | noisy_query
    return visible.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


class CausalWanBlock(WanTransformerBlock):
    """diffusers' Wan block (same parameters and keys) with the block-causal forward. Each block's compute is
    its own forward(), so FSDP's per-block hooks and activation checkpointing wrap it as usual. Cross-attention
    is its attn2's processor (a cross_attention.CrossAttentionProcessor: the text K/V and the guidance method).

    The forward is written for few kernels and for torch.compile (CausalWanTransformer.compile_blocks): one
    compiled code serves every layer (the arguments carry no layer index), norms and modulation stay in fp32 as
    diffusers keeps them, casts happen only where a dtype changes (a bf16 operand times an fp32 one is promoted
    by the product itself, exactly), and the cache write takes the layer's buffers rather than the cache object."""

    def forward(self, x, modulation, cos, sin, cache=None, attn_mask=None, contexts=None):
        """x [B, F, HW, D]; modulation [B, F, 6, D] fp32; cos, sin from rope_tables.
        cache: this layer's (K buffer, V buffer, start, end) from SelfAttentionCache.layer(): the block writes its
        K/V into tokens [start, end) and attends to [0, end). attn_mask: the full (masked) forward, no cache.
        contexts: the projected prompt contexts (positive first) and lengths, when the text K/V are built inside
        the forward (training); else the installed processor's own text K/V are used."""
        # Per-frame modulation: each of the six is [B, F, 1, D] and broadcasts over the frame's tokens.
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + modulation).unsqueeze(2).unbind(3)
        dtype, grid = x.dtype, x.shape[:3]

        h = _cast(_layer_norm(self.norm1, x) * (1 + scale) + shift, dtype).flatten(1, 2)
        attn = self.attn1
        heads = attn.heads
        q = apply_rope(_rms_norm(attn.norm_q, attn.to_q(h)).unflatten(2, (heads, -1)), cos, sin)
        k = apply_rope(_rms_norm(attn.norm_k, attn.to_k(h)).unflatten(2, (heads, -1)), cos, sin)
        v = attn.to_v(h).unflatten(2, (heads, -1))
        if cache is not None:
            k_cache, v_cache, start, end = cache
            k_cache[:, start:end] = k
            v_cache[:, start:end] = v
            k, v = k_cache[:, :end], v_cache[:, :end]
        y = attn.to_out[0](attend(q, k, v, attn_mask).flatten(2)).view(*grid, -1)
        x = _cast(x + y * gate, dtype)

        h = _layer_norm(self.norm2, x) if isinstance(self.norm2, torch.nn.LayerNorm) else x
        x = x + self.attn2.processor(self.attn2, _cast(h, dtype).flatten(1, 2), contexts).view(*grid, -1)

        h = _cast(_layer_norm(self.norm3, x) * (1 + c_scale) + c_shift, dtype)
        return _cast(x + _feed_forward(self.ffn, h) * c_gate, dtype)


class CausalWanTransformer(WanTransformer3DModel):
    """WanTransformer3DModel with a block-causal, cached, guided forward. Load any Wan2.1 layout with
    nasa_video.model.checkpoint.load_generator."""

    @functools.wraps(WanTransformer3DModel.__init__)  # keeps the signature diffusers' config machinery reads
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for block in self.blocks:
            block.__class__ = CausalWanBlock
        self.set_guidance(NoGuidance())

    _compiled_block = None
    _repeated_blocks = ["CausalWanBlock"]  # diffusers' regional compilation (compile_repeated_blocks) finds it

    def compile_blocks(self, enable: bool = True, **options) -> "CausalWanTransformer":
        """Regional compilation: one torch.compile of the block forward, shared by every layer (the same code with
        the layer's module as an argument; parameters are inputs, not guards, so 30 layers compile once per shape).
        fullgraph (no graph break) and static shapes: one graph per (cache length, guidance plan kind), reused
        across layers, steps, the cache pass and videos. enable=False goes back to eager. options: torch.compile's.
        """
        if not enable:
            self._compiled_block = None
            return self
        import torch._dynamo

        # Each cache length of a fixed cache (CausVid: 7 blocks) and each plan kind is a graph of its own; the
        # default limit of 8 per code object would fall back to eager on a 21-frame video with guidance.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # fullgraph with PyTorch's SDPA (traceable, tested on the CPU); a flash-attn build that dynamo cannot trace
        # would otherwise fail to compile, so with flash-attn a break around its call is allowed.
        from .. import attention

        fullgraph = attention.backend() == "sdpa"
        self._compiled_block = torch.compile(CausalWanBlock.forward,
                                             **{"fullgraph": fullgraph, "dynamic": False, **options})
        return self

    @property
    def compiled(self) -> bool:
        return self._compiled_block is not None

    def rope_tables(self, start_frame: int, frames: int, height: int, width: int, device,
                    frame_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) for a block, built on the device once per (frame positions, grid, device) and reused by
        every step and the cache pass of the block, and by later videos (a small LRU)."""
        if frame_positions is None:
            key = (start_frame, frames, height, width, str(device))
            positions = lambda: torch.arange(start_frame, start_frame + frames, device="cpu")  # noqa: E731
        else:
            key = (tuple(int(p) for p in frame_positions.tolist()), height, width, str(device))
            positions = lambda: frame_positions  # noqa: E731
        cache = self.__dict__.setdefault("_rope_cache", {})
        if key in cache:
            cache[key] = cache.pop(key)  # most recent last
            return cache[key]
        tables = rope_tables(self.rope, positions(), height, width, device)
        cache[key] = tables
        while len(cache) > 64:
            cache.pop(next(iter(cache)))
        return tables

    @property
    def heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def max_frame_positions(self) -> int:
        """Latent frames the RoPE table has temporal positions for: a fixed cache cannot go past them; a rolling
        stream re-bases its positions (shift_positions) before it would."""
        return self.config.rope_max_seq_len

    def shift_positions(self, kv_cache: SelfAttentionCache, delta: int) -> None:
        """Re-base a rolling cache: every cached non-sink frame's temporal position goes back by delta (its K is
        rotated by -delta on the temporal channels of the head dim; the height/width channels and V are untouched),
        the sink frames keep theirs. Relative positions inside the window are unchanged, so attention among the
        window's frames is too; only the sink-to-window distance shrinks by delta."""
        if not 0 < delta < self.max_frame_positions:
            raise ValueError(f"a position shift of {delta} is outside (0, {self.max_frame_positions})")
        device = kv_cache.k[0].device
        cos, sin = self.rope_tables(delta, 1, 1, 1, device)  # +delta on the temporal channels, identity elsewhere
        kv_cache.shift_positions(delta, lambda k: apply_rope(k, cos, -sin))  # rotation by -delta

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        _, ph, pw = self.config.patch_size
        return (latent_height // ph) * (latent_width // pw)

    def new_kv_cache(self, batch: int, capacity_frames: int, latent_height: int, latent_width: int,
                     rolling: bool = False, sink_frames: int = 0, dtype=None, device=None) -> SelfAttentionCache:
        param = self.patch_embedding.weight
        args = (self.config.num_layers, batch, capacity_frames, self.tokens_per_frame(latent_height, latent_width),
                self.heads, self.config.attention_head_dim, dtype or param.dtype, indexed(device or param.device))
        spare = self._graphs.take_buffers(args) if self._graphs is not None else None
        return SelfAttentionCache(*args, rolling, sink_frames, buffers=spare)

    def release_kv_cache(self, kv_cache: SelfAttentionCache) -> None:
        """A finished stream's cache (the block loop calls this when no video is left): with CUDA graphs on, its
        buffers serve the next cache of the same shape, so the graphs captured on them replay for the next video
        instead of capturing again. The finished cache must not be written after this."""
        if self._graphs is not None:
            k = kv_cache.k[0]
            args = (len(kv_cache.k), k.shape[0], kv_cache.capacity_frames, kv_cache.tokens_per_frame, k.shape[2],
                    k.shape[3], k.dtype, k.device)
            self._graphs.keep_buffers(args, kv_cache.k, kv_cache.v)

    def text_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (K, V) [B, L, H, D] of one prompt's encoder output [B, L, text_dim]; norm_k applied."""
        ctx = self._project_text(context)
        return [text_kv(block.attn2, ctx) for block in self.blocks]

    def set_cross_attention(self, processors: Sequence[CrossAttentionProcessor]) -> None:
        """Install one cross-attention processor per layer (what every following forward uses)."""
        if len(processors) != len(self.blocks):
            raise ValueError(f"{len(processors)} cross-attention processors for {len(self.blocks)} layers")
        for block, processor in zip(self.blocks, processors):
            block.attn2.processor = processor

    def set_text(self, text) -> None:
        """Install a TextCache's processors: its prompts' K/V and its current guidance setting."""
        self.set_cross_attention(text.processors)

    def set_guidance(self, method: Guidance, alphas: Sequence[float] = ()) -> None:
        """Text-less processors with this method, for forwards handed prompts= (training)."""
        self.set_cross_attention(plain_processors(len(self.blocks), method, alphas))

    def _project_text(self, context: torch.Tensor) -> torch.Tensor:
        param = self.patch_embedding.weight
        return self.condition_embedder.text_embedder(context.to(param.device, param.dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor, start_frame: int = 0, kv_cache: SelfAttentionCache | None = None,
                attn_mask: torch.Tensor | None = None, frame_positions: torch.Tensor | None = None,
                prompts: PromptEmbeddings | None = None) -> torch.Tensor:
        """Predict the flow v for latent frames x [B, C, F, H, W] at per-frame timesteps t [B, F].

        Cross-attention runs the installed processors (set_text: a TextCache's prompts and guidance; see
        model.cross_attention.CrossAttentionProcessor). kv_cache: streaming; this block's K/V go into the cache and the block
        attends to the cached window. attn_mask: the full (teacher-forcing) forward over all frames at once, no
        cache. frame_positions: temporal RoPE position of each frame (default start_frame, start_frame + 1, ...);
        training uses it to put a clean copy and a noisy copy of the same frames side by side.
        prompts: text encoder outputs whose K/V are built inside this forward, with the installed processors'
        guidance (training: under FSDP a block's weights exist only inside its forward).
        """
        _, _, frames, height, width = x.shape
        pt, ph, pw = self.config.patch_size
        fp, hp, wp = frames // pt, height // ph, width // pw
        # Everything that reads or changes Python state happens here, before the tensor work (_layers_forward):
        # the RoPE tables, the cache's slots (and its eviction), the key mask and each layer's guidance plan.
        cos, sin = self.rope_tables(start_frame, fp, hp, wp, x.device, frame_positions)
        if kv_cache is not None:
            kv_cache.place(start_frame, fp)
            if attn_mask is None:  # rows that joined a batch late do not see the slots filled before them
                attn_mask = kv_cache.key_mask()
        contexts = None
        if prompts is not None:  # every block builds its own K/V from the projected contexts
            contexts = ([self._project_text(c) for c in (prompts.positive, *prompts.negatives)], prompts.lengths)
        else:  # bring each layer's guidance plan up to date here, outside any compiled region
            for block in self.blocks:
                prepare = getattr(block.attn2.processor, "prepare", None)
                if prepare is not None:
                    prepare()
        layers = [kv_cache.layer(i) for i in range(len(self.blocks))] if kv_cache is not None else None
        graphs = self._graphs
        if graphs is not None and layers is not None and attn_mask is None and contexts is None \
                and not torch.is_grad_enabled():
            processors = [block.attn2.processor for block in self.blocks]
            if all(getattr(p, "plan", None) is not None for p in processors):
                return self._graphed_forward(graphs, x, t, cos, sin, kv_cache, layers, processors)
        return self._layers_forward(x, t, cos, sin, layers, attn_mask, contexts)

    def _graphed_forward(self, graphs, x, t, cos, sin, kv_cache, layers, processors):
        """The cached forward through a captured graph (model/graphs.py): keyed by the shapes, the cache slots and
        each layer's plan structure; bound to the cache's buffers."""
        graphs.bind(tuple(map(id, (*kv_cache.k, *kv_cache.v))))
        key = (tuple(x.shape), x.dtype, tuple(t.shape), tuple(cos.shape), kv_cache.slots)
        return graphs(key, (x, t, cos, sin),
                      lambda x_, t_, cos_, sin_: self._layers_forward(x_, t_, cos_, sin_, layers, None, None),
                      processors)

    def use_cuda_graphs(self, enable: bool = True, capture: bool | None = None, **options) -> "CausalWanTransformer":
        """Serve cached inference forwards from captured CUDA graphs (model/graphs.StepGraphs), or eagerly again
        (enable=False). capture=False: the static-buffer path run eagerly (a CPU; what the tests check)."""
        from .graphs import StepGraphs

        self._graphs = StepGraphs(self.patch_embedding.weight.device, capture, **options) if enable else None
        return self

    _graphs = None

    @property
    def graphs(self):
        """The StepGraphs serving the cached forwards, or None (eager)."""
        return self._graphs

    def _layers_forward(self, x, t, cos, sin, layers, attn_mask, contexts) -> torch.Tensor:
        """The forward's tensor work: embeddings, every layer (cache writes in place), the output head. Reads only
        its arguments and the parameters (plus each layer's installed processor and plan)."""
        batch, _, frames, height, width = x.shape
        pt, ph, pw = self.config.patch_size
        fp, hp, wp = frames // pt, height // ph, width // pw
        dtype = self.patch_embedding.weight.dtype

        hidden = self.patch_embedding(x.to(dtype)).flatten(3).permute(0, 2, 3, 1)  # [B, F, HW, D]
        emb = self.condition_embedder
        sinusoid = emb.timesteps_proj(t.flatten().float())
        temb = emb.time_embedder(sinusoid.to(next(emb.time_embedder.parameters()).dtype)).float()
        modulation = emb.time_proj(emb.act_fn(temb).to(emb.time_proj.weight.dtype)).float()
        temb = temb.view(batch, fp, -1)
        modulation = modulation.view(batch, fp, 6, -1)

        # Training at full size: recompute each layer in the backward pass instead of keeping its activations
        # (diffusers' enable_gradient_checkpointing() sets the flag).
        checkpointing = getattr(self, "gradient_checkpointing", False) and torch.is_grad_enabled() and layers is None
        compiled = self._compiled_block if not checkpointing else None
        for layer, block in enumerate(self.blocks):
            cache = layers[layer] if layers is not None else None
            args = (hidden, modulation, cos, sin, cache, attn_mask, contexts)
            if checkpointing:
                hidden = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            elif compiled is not None:
                hidden = compiled(block, *args)
            else:
                hidden = block(*args)

        shift, scale = (self.scale_shift_table.float().unsqueeze(0) + temb.unsqueeze(2)).unsqueeze(2).unbind(3)
        hidden = (self.norm_out(hidden.float()) * (1 + scale) + shift).to(dtype)
        out = self.proj_out(hidden)  # [B, F, HW, pt*ph*pw*C]
        out = out.reshape(batch, fp, hp, wp, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(batch, -1, fp * pt, hp * ph, wp * pw)  # one copy, not a view (FSDP's hooks want that)


def cast_generator(model: CausalWanTransformer, device, dtype: torch.dtype) -> CausalWanTransformer:
    """Move to device and dtype, keeping diffusers' fp32 modules (norms, modulation, time embedding) in fp32."""
    keep = set(model._keep_in_fp32_modules)
    for name, param in model.named_parameters():
        target = torch.float32 if keep & set(name.split(".")) else dtype
        param.data = param.data.to(device=device, dtype=target)
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            setattr(module, name, buf.to(device))
    return model


def _build_wan(section: dict) -> CausalWanTransformer:
    return CausalWanTransformer(**{**section, "patch_size": tuple(section["patch_size"])})


def _rebuild_rope(model: CausalWanTransformer) -> None:
    """to_empty leaves non-persistent buffers uninitialised: rebuild the RoPE tables on the CPU."""
    c = model.config
    model.rope = type(model.rope)(c.attention_head_dim, tuple(c.patch_size), c.rope_max_seq_len)


register_architecture(Architecture(
    "wan", _build_wan, cast_generator, reset_buffers=_rebuild_rope,
    description="Wan2.1 (CausVid, Self-Forcing): diffusers' WanTransformer3DModel with a block-causal forward"))
