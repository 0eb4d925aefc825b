"""Configs and the components a config names: generator, VAE, text encoder. One path for every model;
the real and the small ones differ only by config and weights."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"
MODEL_ALIASES = {"self-forcing": "self_forcing", "self_forcing": "self_forcing"}
# A variant is a config plus overrides: the NASA-T student ships beside the NASA-I one in the same folder.
VARIANTS = {"toy-nasa-t": ("toy", {"name": "toy-nasa-t", "weights": {"generator": "generator_nasa_t.safetensors"},
                                   "description": "bundled shapes-world student distilled with NASA-T (DMD)"})}


def available_models() -> list[str]:
    names = [p.stem.replace("_", "-") for p in CONFIG_DIR.glob("*.yaml") if not p.stem.endswith("_train")]
    return sorted(names + list(VARIANTS))


def load_config(model: str = "toy", overrides: dict | None = None) -> DictConfig:
    """A bundled config by name (tiny, causvid, self-forcing, ...) or a YAML path, with overrides merged."""
    if model in VARIANTS:
        base, variant = VARIANTS[model]
        return load_config(base, OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(variant),
                                                                           OmegaConf.create(overrides or {}))))
    path = Path(model)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = CONFIG_DIR / f"{MODEL_ALIASES.get(model, model.replace('-', '_'))}.yaml"
    if not path.exists():
        raise UserError(f"unknown model {model!r}; choose one of {', '.join(available_models())} or give a YAML path")
    cfg = OmegaConf.load(path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    return cfg


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise UserError(f"unknown --dtype {name!r}; use fp32, bf16 or fp16")
    return table[name]


def resolve_device(name: str | None) -> torch.device:
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
    return device


def build_generator(cfg: DictConfig, device, dtype, checkpoint: str | None = None):
    from .model.causal_wan import CausalWanTransformer, cast_generator
    from .model.checkpoint import load_generator_weights

    config = OmegaConf.to_container(cfg.generator, resolve=True)
    config["patch_size"] = tuple(config["patch_size"])
    source = cfg.weights.source
    checkpoint = checkpoint or cfg.weights.get("checkpoint")
    if checkpoint is None and source == "random":
        torch.manual_seed(int(cfg.weights.seed))
        model = CausalWanTransformer(**config)
    elif checkpoint is None and source == "bundled":
        model = CausalWanTransformer(**config)
        load_generator_weights(model, bundled_path(cfg, cfg.weights.generator))
    else:
        if checkpoint is None:
            raise UserError(f"model {cfg.name} needs its generator weights: pass --checkpoint PATH "
                            f"(e.g. the {cfg.name} model.pt / .pt / .safetensors)")
        with torch.device("meta"):
            model = CausalWanTransformer(**config)
        model = model.to_empty(device="cpu")
        # to_empty leaves non-persistent buffers uninitialised: rebuild the RoPE tables on the CPU.
        model.rope = type(model.rope)(config["attention_head_dim"], config["patch_size"], config["rope_max_seq_len"])
        load_generator_weights(model, checkpoint)
    return cast_generator(model, device, dtype).eval().requires_grad_(False)


def bundled_path(cfg: DictConfig, name: str) -> Path:
    path = Path(__file__).parent / cfg.weights.get("folder", "toy/weights") / name
    if not path.exists():
        command = "train toy-nasa-t" if "nasa_t" in name else "train toy"
        raise UserError(f"bundled weights {path} are missing: train them with "
                        f"`nasa-video {command} --export {path.parent}` (CPU, under an hour)")
    return path


def _wan_folder(wan: str) -> str:
    """A local Diffusers-format Wan folder, or a hub id resolved from the local cache or the hub."""
    if os.path.isdir(wan):
        return wan
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(wan, allow_patterns=["vae/*", "text_encoder/*", "tokenizer/*", "model_index.json"])
    except Exception as exc:
        raise UserError(f"cannot get {wan!r} ({type(exc).__name__}): the hub is unreachable and it is not cached. "
                        f"Place a Diffusers-format Wan2.1-T2V-1.3B folder (with vae/, text_encoder/, tokenizer/) "
                        f"on disk and pass --wan /path/to/Wan2.1-T2V-1.3B-Diffusers") from None


def build_vae_and_text(cfg: DictConfig, device, dtype, wan: str | None = None):
    """(AutoencoderKLWan, TextEncoder) for a config."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    from .text import TextEncoder

    source = cfg.weights.source
    if source == "random":
        from transformers import ByT5Tokenizer

        torch.manual_seed(int(cfg.weights.seed) + 1)
        vae = AutoencoderKLWan(**OmegaConf.to_container(cfg.weights.vae, resolve=True))
        encoder = UMT5EncoderModel(UMT5Config(**OmegaConf.to_container(cfg.weights.text_encoder, resolve=True)))
        text = TextEncoder(ByT5Tokenizer(), encoder.to(device), int(cfg.weights.text_max_length))
        return vae.to(device).eval(), text
    if source == "bundled":
        from .toy.text import load_toy_text_encoder

        from .toy.codec import ShuffleCodec

        codec = bundled_path(cfg, "codec")
        vae = ShuffleCodec.load(codec) if (codec / "codec.json").exists() else AutoencoderKLWan.from_pretrained(str(codec))
        return vae.to(device).eval(), load_toy_text_encoder(bundled_path(cfg, "text"), device)
    folder = _wan_folder(wan or cfg.weights.wan)
    for sub in ("vae", "text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise UserError(f"{folder} has no {sub}/ folder; --wan must point at a Diffusers-format Wan2.1-T2V-1.3B "
                            f"folder holding vae/, text_encoder/ and tokenizer/")
    from transformers import AutoTokenizer

    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    encoder = UMT5EncoderModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    return vae.to(device).eval(), TextEncoder(tokenizer, encoder.to(device), int(cfg.weights.text_max_length))
