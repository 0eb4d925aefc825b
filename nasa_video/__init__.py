"""nasa-video: negative prompts for streaming autoregressive video diffusion, via NASA inside cross-attention."""
from .errors import UserError
from .guidance import NASA, NoGuidance, ScaleSchedule, make_guidance, nasa

__version__ = "0.1.0"


def __getattr__(name):  # the heavy imports (diffusers, transformers) only when asked for
    if name in ("StreamingGenerator", "Stream", "FrameChunk"):
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = ["UserError", "NASA", "NoGuidance", "ScaleSchedule", "make_guidance", "nasa", "StreamingGenerator",
           "Stream", "FrameChunk"]
