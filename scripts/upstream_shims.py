"""Upstream Self-Forcing's own modules, imported from a checkout with the shims its code needs off its home machine
(used by scripts/self_forcing_check.py and scripts/upstream_bench.py; tests/test_upstream.py shims CausVid alike):
- a torchvision stand-in (its inference modules import it; torchvision does not install beside the CPU torch here),
  installed after transformers and diffusers have looked for the real one, so they do not take it for torchvision;
- torch.cuda.current_device on a machine without CUDA;
- its attention calls (flash-attn 3 / 2 in its code) routed to `attend` (default: nasa_video.attention.attend, the
  kernel nasa-video runs: the same flash-attn or SDPA on both sides of a comparison)."""
from __future__ import annotations

import importlib.machinery
import sys
import types
from types import SimpleNamespace

import torch


def shim_self_forcing(repo: str, attend=None) -> SimpleNamespace:
    """Modules ci (pipeline.causal_inference), cm (wan.modules.causal_model), wm (wan.modules.model) and ww
    (utils.wan_wrapper) of the checkout at `repo`."""
    import diffusers.hooks  # noqa: F401  (imports transformers and peft now, before the stand-in exists)
    import transformers.modeling_utils  # noqa: F401

    if attend is None:
        from nasa_video.attention import attend as ours

        def attend(q, k, v, *args, **kwargs):
            return ours(q, k, v).contiguous()

    sys.path.insert(0, repo)
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = module
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: 0
    import pipeline.causal_inference as ci
    import utils.wan_wrapper as ww
    import wan.modules.causal_model as cm
    import wan.modules.model as wm

    cm.attention = attend
    wm.flash_attention = attend
    return SimpleNamespace(ci=ci, cm=cm, wm=wm, ww=ww)
