"""nasa-video: negative prompts for streaming autoregressive video diffusion, via NASA inside cross-attention."""
from .errors import UserError

__version__ = "0.1.0"

_LAZY = {"NASA": "guidance", "NoGuidance": "guidance", "ScaleSchedule": "guidance", "make_guidance": "guidance",
         "nasa": "guidance", "StreamingGenerator": "pipeline", "Stream": "pipeline", "FrameChunk": "pipeline"}


def __getattr__(name):  # torch, diffusers and transformers only when asked for: `nasa-video` parses without them
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = ["UserError", "NASA", "NoGuidance", "ScaleSchedule", "make_guidance", "nasa", "StreamingGenerator",
           "Stream", "FrameChunk"]
