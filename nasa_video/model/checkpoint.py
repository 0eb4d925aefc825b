"""Generator checkpoints in every layout people have, loaded into diffusers' parameter names.

Layouts recognised (the name is reported in errors):
  causvid        model.pt = {"generator": state_dict}, keys "model.<original Wan name>"
  self-forcing   {"generator_ema": ..., "generator": ...}; generator_ema is preferred
  original-wan   bare original Wan2.1 names (blocks.N.self_attn.q.weight, head.head.weight, ...)
  diffusers      WanTransformer3DModel names; a file, or a folder of (sharded) safetensors
Original names are converted with diffusers' own converter; the inverse (for writing CausVid-layout files)
is checked against it in the tests.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

# Wrapper prefixes added by FSDP / activation checkpointing / DDP when a training run saved its state dict.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.")


def _read_safetensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError: empty, truncated or not a safetensors file
        raise UserError(f"cannot read {path} as safetensors ({str(exc).splitlines()[0][:80] or type(exc).__name__}): "
                        f"the file is empty, truncated or not safetensors; download or export it again") from None


def read_weights(path: str | os.PathLike) -> dict:
    """Read a .safetensors / .pt / .pth / .bin file, or a folder of safetensors shards."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise UserError(f"no .safetensors files in {folder}; pass the checkpoint file itself")
        state = {}
        for shard in shards:
            state.update(_read_safetensors(shard))
        return state
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():  # torch's notes on the pickle's protocol: the error below says enough
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors from untrusted or truncated files
        raise UserError(f"cannot read {path} as a weights-only torch file ({type(exc).__name__}); "
                        f"re-save it as .safetensors or a plain state dict") from None


def _strip(state: dict, prefix: str) -> dict:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _clean_names(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        out[key] = value
    return _strip(_strip(out, "model."), "diffusion_model.")


@dataclass(frozen=True)
class Layout:
    """A parameter naming a checkpoint may use: matches(keys) recognises it, convert(state) renames it to the
    generator's own names."""

    name: str
    matches: Callable[[list[str]], bool]
    convert: Callable[[dict], dict]


LAYOUTS: dict[str, list[Layout]] = {}


def register_layout(arch: str, layout: Layout) -> None:
    """Teach the loader a naming for generators of this architecture (tried in registration order)."""
    LAYOUTS.setdefault(arch, []).append(layout)


def _original_wan_to_diffusers(state: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    return convert_wan_transformer_to_diffusers(dict(state))


register_layout("wan", Layout("diffusers names", lambda keys: any(".attn1." in k or k.startswith("condition_embedder.")
                                                                  for k in keys), dict))
register_layout("wan", Layout("original Wan names", lambda keys: any(
    ".self_attn." in k or k.startswith("head.head") or k.startswith("text_embedding.") for k in keys),
    _original_wan_to_diffusers))


def to_diffusers_state_dict(obj: dict, arch: str = "wan") -> tuple[dict, str]:
    """Any supported checkpoint object -> (state dict in the generator's own names, layout name)."""
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    if "generator_ema" in obj and isinstance(obj["generator_ema"], dict):
        state, layout = obj["generator_ema"], "self-forcing (generator_ema)"
    elif "generator" in obj and isinstance(obj["generator"], dict):
        state, layout = obj["generator"], "causvid (generator)"
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        state, layout = obj["state_dict"], "state_dict wrapper"
    else:
        state, layout = obj, "bare state dict"
    state = _clean_names(state)
    keys = list(state)
    for naming in LAYOUTS.get(arch, []):
        if naming.matches(keys):
            return naming.convert(state), f"{layout}, {naming.name}"
    known = ", ".join(n.name for n in LAYOUTS.get(arch, [])) or "none registered"
    raise UserError(f"unknown checkpoint layout ({layout}); first keys: {', '.join(keys[:4]) or 'none'}. "
                    f"Expected a CausVid / Self-Forcing model.pt, original Wan2.1 or diffusers weights "
                    f"(namings known for generator.arch {arch}: {known})")


def load_generator_weights(model: torch.nn.Module, path_or_obj, strict: bool = True, arch: str = "wan") -> str:
    """Load a checkpoint into a generator of that architecture; returns the layout it found.
    Any missing, unexpected or mis-shaped key is a UserError naming the first few and the layout."""
    obj = read_weights(path_or_obj) if isinstance(path_or_obj, (str, os.PathLike)) else path_or_obj
    state, layout = to_diffusers_state_dict(obj, arch)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} mis-shaped ({', '.join(mismatched[:2])})")
    if problems and strict:
        raise UserError(f"checkpoint does not match the model config (layout guessed: {layout}): "
                        f"{'; '.join(problems)}. Check --model matches the checkpoint")
    broken = [k for k, v in state.items()
              if k in expected and torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # they would make every frame NaN (an all-black video) without a word
        raise UserError(f"checkpoint holds NaN or infinite weights in {len(broken)} tensor(s) ({', '.join(broken[:3])}): "
                        f"the file is corrupt or from a diverged run; use another checkpoint")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return layout


# diffusers name -> original Wan name, applied in order (the inverse of diffusers' converter).
_TO_ORIGINAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.norm2\.", ".norm3."),  # diffusers' norm2 is the cross-attention norm, original norm3
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
]


def to_original_wan(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for pattern, replacement in _TO_ORIGINAL:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def save_generator(state: dict, path: str | os.PathLike, layout: str = "diffusers") -> None:
    """Write a diffusers-named state dict in a given layout, atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if layout == "diffusers":
        obj = state
    elif layout == "original-wan":
        obj = to_original_wan(state)
    elif layout == "causvid":
        obj = {"generator": {f"model.{k}": v for k, v in to_original_wan(state).items()}}
    elif layout == "self-forcing":
        original = {f"model.{k}": v for k, v in to_original_wan(state).items()}
        obj = {"generator": original, "generator_ema": dict(original)}
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if path.suffix == ".safetensors":
        if layout in ("causvid", "self-forcing"):
            raise ValueError("CausVid / Self-Forcing layouts are nested dicts; save them as .pt")
        save_file(obj, str(tmp))
    else:
        torch.save(obj, str(tmp))
    os.replace(tmp, path)
