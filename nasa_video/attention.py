"""One attention entry point. The backend is chosen once; nothing else imports a kernel.

Layout everywhere is flash-attn's: q [B, Sq, H, D], k/v [B, Sk, H, D] -> out [B, Sq, H, D].
flash-attn only runs half precision on CUDA without a mask; everything else goes through PyTorch SDPA,
so fp32 reference runs and masked (training / equivalence) runs always work.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from .errors import UserError

BACKENDS = ("auto", "sdpa", "flash2", "flash3")
_kernel = {"name": "sdpa", "fn": None}


def _import_flash(name: str):
    module = "flash_attn_interface" if name == "flash3" else "flash_attn"
    try:
        return importlib.import_module(module).flash_attn_func
    except ImportError:
        return None


def set_backend(name: str = "auto") -> str:
    """Pick the kernel once: flash-attn 3 on Hopper, else flash-attn 2, else SDPA. Returns the name chosen."""
    if name not in BACKENDS:
        raise UserError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
        candidates = (["flash3"] if hopper else []) + (["flash2"] if torch.cuda.is_available() else [])
        for candidate in candidates:
            fn = _import_flash(candidate)
            if fn is not None:
                _kernel.update(name=candidate, fn=fn)
                return candidate
        _kernel.update(name="sdpa", fn=None)
        return "sdpa"
    if name == "sdpa":
        _kernel.update(name="sdpa", fn=None)
        return name
    fn = _import_flash(name)
    if fn is None:
        package = "flash-attn 3 (flash_attn_interface, built from the hopper/ folder of flash-attention)" if name == "flash3" else "flash-attn"
        raise UserError(f"--attention {name} needs {package}, which is not installed; "
                        f"pip install 'nasa-video[gpu]' on a CUDA machine, or use --attention sdpa")
    if not torch.cuda.is_available():
        raise UserError(f"--attention {name} needs a CUDA GPU; use --attention sdpa on this machine")
    _kernel.update(name=name, fn=fn)
    return name


def backend() -> str:
    return _kernel["name"]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, S, H, D] tensors; mask (bool, True = attend) broadcasts to [B, H, Sq, Sk]."""
    if mask is not None and not isinstance(mask, torch.Tensor):  # a flex-attention BlockMask (training, full size)
        from torch.nn.attention.flex_attention import flex_attention

        kernel = _compiled_flex() if q.is_cuda else flex_attention
        out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)
        return out.transpose(1, 2)
    fn = _kernel["fn"]
    if fn is not None and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = fn(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def attend_prompts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query against P key/value sets in one kernel launch (cross-attention to a positive prompt and its
    negatives): q [B, S, H, D]; k, v [P*B, L, H, D], prompt-major on the batch axis -> [P*B, S, H, D].

    With B == 1 (streaming inference) the query is broadcast along the batch axis with stride 0, so it is not
    copied: PyTorch's CPU flash SDPA, CUDA flash / memory-efficient SDPA and flash-attn take a batch stride
    (cuDNN SDPA makes zero-stride inputs contiguous itself: a copy inside, still one launch). With B > 1 a
    stride-0 batch cannot merge with the real one, so the query is repeated (a copy)."""
    prompts = k.shape[0] // q.shape[0]
    if prompts == 1:
        return attend(q, k, v, mask)
    wide = q.expand(prompts, -1, -1, -1) if q.shape[0] == 1 else q.repeat(prompts, 1, 1, 1)
    return attend(wide, k, v, mask)


_FLEX: dict = {}


def _compiled_flex():
    """flex_attention is only fast compiled; compile it once, on first use on a GPU."""
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _bind_guidance() -> None:
    """guidance.py imports torch and these kernels lazily (the CLI checks a method before torch loads); hand them
    over now, before any of its plans runs inside a compiled region."""
    from . import guidance

    guidance.load_modules()


_bind_guidance()
