"""What a generation needs in memory, estimated before anything large is allocated, and whether it fits."""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from .errors import UserError
from .model.cache import SelfAttentionCache


def memory_estimate(cfg: DictConfig, dtype: torch.dtype, negatives: int = 1, kv_caches: int = 1) -> dict[str, int]:
    """Bytes the generator needs: weights, self-attention cache(s), text cache and the largest activations.
    The generator is built on the meta device (nothing allocated) and asked for its sizes."""
    from .config import model_spec
    from .model.interface import build_from_config

    spec = model_spec(cfg)
    with torch.device("meta"):
        model = build_from_config(cfg)
    g = model.config
    dim = g.num_attention_heads * g.attention_head_dim
    video = spec.video
    tokens_per_frame = model.tokens_per_frame(video.height // video.vae_stride[1], video.width // video.vae_stride[2])
    block_tokens = tokens_per_frame * video.frames_per_block
    text_tokens = spec.weights.text_max_length
    return {
        "weights": sum(p.numel() for p in model.parameters()) * dtype.itemsize,
        "kv_cache": kv_caches * SelfAttentionCache.nbytes_for(g.num_layers, 1, spec.cache.capacity_frames,
                                                              tokens_per_frame, g.num_attention_heads,
                                                              g.attention_head_dim, dtype),
        # K and V of every prompt, plus with negatives the guidance plan's own tensors (NASA: the alpha-scaled V;
        # VSF, the upper bound: the concatenated K and V)
        "text_cache": (4 if negatives else 2) * g.num_layers * (1 + negatives) * text_tokens * dim * dtype.itemsize,
        "activations": 6 * block_tokens * max(getattr(g, "ffn_dim", 0), 4 * dim) * 4,
    }


def available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(cfg: DictConfig, device: torch.device, dtype: torch.dtype, negatives: int = 1) -> dict[str, int]:
    estimate = memory_estimate(cfg, dtype, negatives)
    free = available_memory(device)
    total = sum(estimate.values())
    if free is not None and total > free:
        parts = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in estimate.items())
        raise UserError(f"{cfg.name} needs about {total / 2**30:.1f} GiB on {device} ({parts}) but "
                        f"{free / 2**30:.1f} GiB is free; use --dtype bf16, fewer frames, or a larger device")
    return estimate
