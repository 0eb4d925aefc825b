"""--fp8: the DiT's linear layers in float8 through torchao (e4m3 weights, activations scaled dynamically per row;
the recipe LongLive runs on Hopper). Off by default; the bench reports its output error against bf16 and its
speed. Only the transformer blocks' linear layers are converted (attention projections and feed-forward: where
the FLOPs are); the embeddings, modulation and output head keep their dtype."""
from __future__ import annotations

import torch

from .errors import UserError

MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9) and Hopper (9.0) on
FP8_EXTRA = "pip install torchao (a build matching your torch; or pip install 'nasa-video[fp8]')"


def check_fp8(device) -> None:
    """One line unless this device can run float8 matmuls and torchao is installed."""
    device = torch.device(device)
    if device.type != "cuda":
        raise UserError(f"--fp8 needs a CUDA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or "
                        f"newer (Ada, Hopper); this run is on the {device.type}: drop --fp8")
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        raise UserError(f"--fp8 needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (Ada, Hopper); "
                        f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: drop --fp8")
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as error:
        raise UserError(f"--fp8 needs torchao ({error}): {FP8_EXTRA}; or drop --fp8") from None


def fp8_layer_names(model: torch.nn.Module) -> list[str]:
    """The linear layers --fp8 converts: those inside the transformer blocks whose sizes float8 matmuls take
    (both dimensions multiples of 16)."""
    return [name for name, module in model.named_modules()
            if name.startswith("blocks.") and isinstance(module, torch.nn.Linear)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0]


def quantize_fp8(model: torch.nn.Module) -> int:
    """Convert fp8_layer_names(model) in place; returns how many. Call check_fp8 first (the model on its device)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    names = set(fp8_layer_names(model))
    if not names:
        raise UserError("--fp8 found no linear layer with sizes a float8 matmul takes (multiples of 16); drop --fp8")
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, name: name in names)
    model.fp8_layers = len(names)  # what the bench and the speed report read
    return len(names)
