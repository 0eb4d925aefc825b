"""The block forward and cross-attention guidance as they were before the fused forward (commit bdd60c3), kept
as the reference the fused and compiled paths are tested against: host-built RoPE tables, apply_rope via
unbind/stack, every fp32 cast spelled out, the FeedForward module walk, and the guidance methods on a query
repeated once per prompt (attend on q.repeat) combined with the pure nasa() / nag() / vsf() formulas."""
import torch

from nasa_video.attention import attend
from nasa_video.guidance import NAG, NASA, VSF, NoGuidance, TextKV, nag, nasa, vsf


def rope_frequencies(rope, frame_positions, height, width, device):
    frames = len(frame_positions)
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


def apply_rope(x, cos, sin):
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def attend_all_prompts(q, kv: TextKV):
    prompts = kv.num_prompts
    z = attend(q.repeat(1, 1, prompts, 1), kv.k, kv.v)
    return z.unflatten(2, (prompts, kv.heads))


def cross_attention(method, q, kv: TextKV, alphas):
    """The methods' cross_attention as it was."""
    if isinstance(method, NASA) and kv.num_prompts > 1 and any(alphas):
        z = attend_all_prompts(q, kv)
        return nasa(z[:, :, 0], z[:, :, 1:], alphas)
    if isinstance(method, NAG) and kv.num_prompts > 1 and alphas and alphas[0] > 1.0:
        z = attend_all_prompts(q, kv)
        return nag(z[:, :, 0], z[:, :, 1], alphas[0], method.tau, method.blend)
    if isinstance(method, VSF) and kv.num_prompts > 1 and alphas and alphas[0] != 0.0:
        k_neg, v_neg = kv.prompt(1)
        if kv.negative_lengths is not None:
            k_neg, v_neg = k_neg[:, :kv.negative_lengths[0]], v_neg[:, :kv.negative_lengths[0]]
        return vsf(q, *kv.positive(), k_neg, v_neg, alphas[0], method.bias)
    assert isinstance(method, (NASA, NAG, VSF, NoGuidance))
    return attend(q, *kv.positive())


def block_forward(block, x, modulation, cos, sin, cache, attn_mask, method, kv: TextKV, alphas):
    """The old CausalWanBlock.forward (cos, sin from rope_frequencies above; cache: (K, V, start, end) written the
    way SelfAttentionCache.write did) with the old cross-attention processor inlined."""
    shift, scale, gate, c_shift, c_scale, c_gate = (
        block.scale_shift_table.float().unsqueeze(0) + modulation).unsqueeze(2).unbind(3)
    dtype, grid = x.dtype, x.shape[:3]

    h = (block.norm1(x.float()) * (1 + scale) + shift).to(dtype)
    attn = block.attn1
    heads = attn.heads
    h = h.flatten(1, 2)
    q = apply_rope(attn.norm_q(attn.to_q(h)).unflatten(2, (heads, -1)), cos, sin)
    k = apply_rope(attn.norm_k(attn.to_k(h)).unflatten(2, (heads, -1)), cos, sin)
    v = attn.to_v(h).unflatten(2, (heads, -1))
    if cache is not None:
        k_cache, v_cache, start, end = cache
        k_cache[:, start:end] = k
        v_cache[:, start:end] = v
        k, v = k_cache[:, :end], v_cache[:, :end]
    y = attn.to_out[0](attend(q, k, v, attn_mask).flatten(2)).view(*grid, -1)
    x = (x.float() + y.float() * gate).to(dtype)

    h = block.norm2(x.float()).to(dtype).flatten(1, 2)
    cross = block.attn2
    q = cross.norm_q(cross.to_q(h)).unflatten(2, (cross.heads, -1))
    x = x + cross.to_out[0](cross_attention(method, q, kv, alphas).flatten(2)).view(*grid, -1)

    h = (block.norm3(x.float()) * (1 + c_scale) + c_shift).to(dtype)
    return (x.float() + block.ffn(h).float() * c_gate).to(dtype)
