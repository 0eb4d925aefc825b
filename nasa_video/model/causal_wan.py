"""The block-causal Wan2.1 generator (CausVid / Self-Forcing), on diffusers' Wan modules and parameter names.

The parameters are exactly diffusers' WanTransformer3DModel (so its configs, from_pretrained and the
original-Wan key converter all apply); only the forward differs:
  - timesteps per latent frame, t [B, F], so modulation is per frame;
  - RoPE temporal positions start at the block's first frame;
  - self-attention reads and writes a SelfAttentionCache (or takes a mask, for the full block-causal forward);
  - cross-attention is each block's attn2 processor (guidance.CrossAttentionProcessor), installed from a
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
from ..guidance import CrossAttentionProcessor, Guidance, NoGuidance, plain_processors, text_kv
from .cache import PromptEmbeddings, SelfAttentionCache
from .interface import Architecture, register_architecture


def rope_frequencies(rope, frame_positions: torch.Tensor, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, F*H*W, 1, head_dim] for a grid of patches whose frames sit at the given temporal positions
    (a block starting at frame 6 has positions 6, 7, 8)."""
    frames = len(frame_positions)
    if int(frame_positions.max()) >= rope.max_seq_len:
        raise ValueError(f"frame {int(frame_positions.max())} is past the RoPE table ({rope.max_seq_len} positions)")
    sizes = [rope.t_dim, rope.h_dim, rope.w_dim]
    ranges = [frame_positions.long().cpu(), torch.arange(height, device="cpu"), torch.arange(width, device="cpu")]
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        t, h, w = (part[idx.to(part.device)] for part, idx in zip(table.float().split(sizes, dim=1), ranges))
        grid = torch.cat([
            t[:, None, None].expand(frames, height, width, -1),
            h[None, :, None].expand(frames, height, width, -1),
            w[None, None, :].expand(frames, height, width, -1),
        ], dim=-1)
        out.append(grid.reshape(1, frames * height * width, 1, -1).to(device))
    return out[0], out[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of the head dim, in fp32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


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
    is its attn2's processor (a guidance.CrossAttentionProcessor: the text K/V and the guidance method)."""

    def forward(self, x, modulation, cos, sin, layer, kv_cache, attn_mask, contexts=None):
        """contexts: the projected prompt contexts (positive first) and lengths, when the text K/V are built
        inside the forward (training); else the installed processor's own text K/V are used."""
        # Per-frame modulation: each of the six is [B, F, 1, D] and broadcasts over the frame's tokens.
        shift, scale, gate, c_shift, c_scale, c_gate = (
            self.scale_shift_table.float().unsqueeze(0) + modulation).unsqueeze(2).unbind(3)
        dtype, grid = x.dtype, x.shape[:3]

        h = (self.norm1(x.float()) * (1 + scale) + shift).to(dtype)
        attn = self.attn1
        heads = attn.heads
        h = h.flatten(1, 2)
        q = apply_rope(attn.norm_q(attn.to_q(h)).unflatten(2, (heads, -1)), cos, sin)
        k = apply_rope(attn.norm_k(attn.to_k(h)).unflatten(2, (heads, -1)), cos, sin)
        v = attn.to_v(h).unflatten(2, (heads, -1))
        if kv_cache is not None:
            k, v = kv_cache.write(layer, k, v)
        y = attn.to_out[0](attend(q, k, v, attn_mask).flatten(2)).view(*grid, -1)
        x = (x.float() + y.float() * gate).to(dtype)

        h = self.norm2(x.float()).to(dtype).flatten(1, 2)
        x = x + self.attn2.processor(self.attn2, h, contexts).view(*grid, -1)

        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).to(dtype)
        return (x.float() + self.ffn(h).float() * c_gate).to(dtype)


class CausalWanTransformer(WanTransformer3DModel):
    """WanTransformer3DModel with a block-causal, cached, guided forward. Load any Wan2.1 layout with
    nasa_video.model.checkpoint.load_generator."""

    @functools.wraps(WanTransformer3DModel.__init__)  # keeps the signature diffusers' config machinery reads
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for block in self.blocks:
            block.__class__ = CausalWanBlock
        self.set_guidance(NoGuidance())

    @property
    def heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def max_frame_positions(self) -> int:
        """Latent frames the RoPE table has temporal positions for (a stream cannot go past them)."""
        return self.config.rope_max_seq_len

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        _, ph, pw = self.config.patch_size
        return (latent_height // ph) * (latent_width // pw)

    def new_kv_cache(self, batch: int, capacity_frames: int, latent_height: int, latent_width: int,
                     rolling: bool = False, sink_frames: int = 0, dtype=None, device=None) -> SelfAttentionCache:
        param = self.patch_embedding.weight
        return SelfAttentionCache(self.config.num_layers, batch, capacity_frames,
                                  self.tokens_per_frame(latent_height, latent_width), self.heads,
                                  self.config.attention_head_dim, dtype or param.dtype, device or param.device,
                                  rolling, sink_frames)

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
        guidance.CrossAttentionProcessor). kv_cache: streaming; this block's K/V go into the cache and the block
        attends to the cached window. attn_mask: the full (teacher-forcing) forward over all frames at once, no
        cache. frame_positions: temporal RoPE position of each frame (default start_frame, start_frame + 1, ...);
        training uses it to put a clean copy and a noisy copy of the same frames side by side.
        prompts: text encoder outputs whose K/V are built inside this forward, with the installed processors'
        guidance (training: under FSDP a block's weights exist only inside its forward).
        """
        batch, _, frames, height, width = x.shape
        pt, ph, pw = self.config.patch_size
        fp, hp, wp = frames // pt, height // ph, width // pw
        dtype = self.patch_embedding.weight.dtype

        hidden = self.patch_embedding(x.to(dtype)).flatten(3).permute(0, 2, 3, 1)  # [B, F, HW, D]
        if frame_positions is None:
            frame_positions = torch.arange(start_frame, start_frame + fp, device="cpu")
        cos, sin = rope_frequencies(self.rope, frame_positions, hp, wp, x.device)

        emb = self.condition_embedder
        sinusoid = emb.timesteps_proj(t.flatten().float())
        temb = emb.time_embedder(sinusoid.to(next(emb.time_embedder.parameters()).dtype)).float()
        modulation = emb.time_proj(emb.act_fn(temb).to(emb.time_proj.weight.dtype)).float()
        temb = temb.view(batch, fp, -1)
        modulation = modulation.view(batch, fp, 6, -1)

        if kv_cache is not None:
            kv_cache.place(start_frame, fp)
        # Training at full size: recompute each layer in the backward pass instead of keeping its activations
        # (diffusers' enable_gradient_checkpointing() sets the flag).
        checkpointing = getattr(self, "gradient_checkpointing", False) and torch.is_grad_enabled() and kv_cache is None
        contexts = None
        if prompts is not None:  # every block builds its own K/V from the projected contexts
            contexts = ([self._project_text(c) for c in (prompts.positive, *prompts.negatives)], prompts.lengths)
        for layer, block in enumerate(self.blocks):
            args = (hidden, modulation, cos, sin, layer, kv_cache, attn_mask, contexts)
            if checkpointing:
                hidden = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
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
