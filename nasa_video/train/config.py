"""The training YAML: loading it with its model config, its sections, the weights it must name."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import UserError


def settings_from(cls, values, section: str):
    """A DMDConfig / ODEConfig from a YAML section, unknown keys named."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in {section}:; known: {sorted(known)}")
    return cls(**(values or {}))


def training_setup(config):
    """(training config, model config, torchrun context or None, device)."""
    from omegaconf import OmegaConf

    from ..loading import load_config, resolve_device
    from .distributed import init_from_env

    if not Path(config).is_file():
        raise UserError(f"no training config at {config}")
    tc = OmegaConf.load(config)
    if not tc.get("model"):
        raise UserError(f"{config}: set model (a model config name or YAML, e.g. causvid)")
    model_cfg = load_config(str(tc.model))
    ctx = init_from_env()
    return tc, model_cfg, ctx, ctx.device if ctx is not None else resolve_device(tc.get("device"))


def require_weights(tc, model_cfg, config, key: str, what: str) -> None:
    """Real models need their weights named in the YAML (random and bundled models carry their own)."""
    if not tc.get(key) and str(model_cfg.weights.source) not in ("random", "bundled"):
        raise UserError(f"{config}: set {key}: ({what})")


def section(tc, key: str, config) -> dict:
    from omegaconf import OmegaConf

    if tc.get(key) is None:
        raise UserError(f"{config} has no {key}: section (configs/causvid_ode_train.yaml has ode_pairs: and ode:, "
                        f"configs/causvid_nasa_t_train.yaml has dmd:)")
    return OmegaConf.to_container(tc[key], resolve=True)


