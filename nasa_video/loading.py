"""Configs and the components a config names: generator, VAE, text encoder. One path for every model;
the real and the small ones differ only by config and weights."""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from .errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"
MODEL_ALIASES = {"self-forcing": "self_forcing", "self_forcing": "self_forcing"}


def available_models() -> list[str]:
    return sorted(p.stem.replace("_", "-") for p in CONFIG_DIR.glob("*.yaml") if not p.stem.endswith("_train"))


def load_config(model: str = "toy", overrides: dict | None = None) -> DictConfig:
    """A bundled config by name (tiny, causvid, self-forcing, ...) or a YAML path, with overrides merged, and
    validated once (config.validate_model_config): a bad file is one line naming it and the key.
    A config with `base: NAME` is that config with its own keys merged over it (a variant)."""
    from .config import validate_model_config

    path = _config_path(model)
    cfg = _read_with_bases(path, ())
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    validate_model_config(cfg, str(path))
    return cfg


def _read_with_bases(path: Path, chain: tuple) -> DictConfig:
    """One YAML and the `base:` configs under it, merged; a syntax error or a cycle of bases is one line."""
    if path.resolve() in chain:
        names = " -> ".join(str(p) for p in chain + (path.resolve(),))
        raise UserError(f"{path}: base: makes a cycle ({names}); a variant names another config as its base")
    try:
        cfg = OmegaConf.load(path)
    except Exception as error:  # yaml's ScannerError / ParserError, omegaconf's own: their first line says where
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read model config {path}: {first}") from None
    if not isinstance(cfg, DictConfig):
        raise UserError(f"{path}: a model config is a mapping of sections, not a {type(cfg).__name__}")
    if "base" in cfg:
        base = cfg.pop("base")
        cfg = OmegaConf.merge(_read_with_bases(_config_path(str(base)), chain + (path.resolve(),)), cfg)
    return cfg


def _config_path(model: str) -> Path:
    path = Path(model)
    if path.suffix in (".yaml", ".yml") and not path.exists():
        raise UserError(f"model config not found: {model} (a YAML path); or name a bundled model: "
                        f"{', '.join(available_models())}")
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = CONFIG_DIR / f"{MODEL_ALIASES.get(model, model.replace('-', '_'))}.yaml"
    if not path.exists():
        raise UserError(f"unknown model {model!r}; choose one of {', '.join(available_models())} or give a YAML path")
    return path


def resolve_dtype(name: str | None, device: "torch.device") -> "torch.dtype":
    import torch

    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise UserError(f"unknown --dtype {name!r}; use fp32, bf16 or fp16")
    return table[name]


def resolve_device(name: str | None) -> "torch.device":
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: nasa-video runs on cpu or cuda (cuda:N); use --device cpu or cuda")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: no Apple GPU (MPS) is available here; use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
    return device


def build_generator(cfg: DictConfig, device, dtype, checkpoint: str | None = None):
    """The config's generator (its generator.arch, Wan by default): random, bundled or checkpoint weights."""
    import torch

    from .model.checkpoint import load_generator_weights
    from .model.interface import architecture, build_from_config, empty_from_config, generator_section

    arch = architecture(generator_section(cfg)[0])
    source = cfg.weights.source
    checkpoint = checkpoint or cfg.weights.get("checkpoint")
    if checkpoint is None and source == "random":
        torch.manual_seed(int(cfg.weights.seed))
        model = build_from_config(cfg)
    elif checkpoint is None and source == "bundled":
        model = build_from_config(cfg)
        load_generator_weights(model, bundled_path(cfg, cfg.weights.generator), arch=arch.name)
    else:
        if checkpoint is None:
            raise UserError(f"model {cfg.name} needs its generator weights: pass --checkpoint PATH "
                            f"(e.g. the {cfg.name} model.pt / .pt / .safetensors)")
        model = empty_from_config(cfg)
        load_generator_weights(model, checkpoint, arch=arch.name)
    return arch.cast(model, device, dtype).eval().requires_grad_(False)


def bundled_path(cfg: DictConfig, name: str) -> Path:
    """A file of a model shipped in the package (weights.folder, relative to nasa_video/ or absolute)."""
    path = Path(__file__).parent / cfg.weights.get("folder", "weights") / name
    if not path.exists():
        hint = cfg.weights.get("train_command")
        raise UserError(f"bundled weights {path} are missing"
                        + (f": train them with `{hint} --export {path.parent}`" if hint else ""))
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


def _checked_wan_folder(cfg: DictConfig, wan: str | None) -> str:
    folder = _wan_folder(wan or cfg.weights.wan)
    for sub in ("vae", "text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise UserError(f"{folder} has no {sub}/ folder; --wan must point at a Diffusers-format Wan2.1-T2V-1.3B "
                            f"folder holding vae/, text_encoder/ and tokenizer/")
    return folder


# ---- the codec and the text encoder a config names (components.codec, components.text_encoder) ------------
# A builder takes (cfg, device, dtype, wan folder or None). A model outside the core (the bundled toy) registers
# its own from a module the config lists under components.plugins, so the core never imports it.
CODECS: dict[str, Callable] = {}
TEXT_ENCODERS: dict[str, Callable] = {}


def register_codec(name: str, builder: Callable) -> None:
    CODECS[name] = builder


def register_text_encoder(name: str, builder: Callable) -> None:
    TEXT_ENCODERS[name] = builder


def _wan_vae(cfg: DictConfig, device, dtype, wan: str | None):
    """Wan's AutoencoderKLWan: random weights from weights.vae (source random), else the Wan folder's (fp32)."""
    import torch
    from diffusers import AutoencoderKLWan

    if cfg.weights.source == "random":
        torch.manual_seed(int(cfg.weights.seed) + 1)
        return AutoencoderKLWan(**OmegaConf.to_container(cfg.weights.vae, resolve=True))
    return AutoencoderKLWan.from_pretrained(_checked_wan_folder(cfg, wan), subfolder="vae", torch_dtype=torch.float32)


def _umt5(cfg: DictConfig, device, dtype, wan: str | None):
    """Wan's umT5 encoder: random weights from weights.text_encoder with the byte-level ByT5 tokenizer (source
    random), else the Wan folder's encoder and tokenizer."""
    from transformers import UMT5Config, UMT5EncoderModel

    from .text import TextEncoder

    if cfg.weights.source == "random":
        from transformers import ByT5Tokenizer

        encoder = UMT5EncoderModel(UMT5Config(**OmegaConf.to_container(cfg.weights.text_encoder, resolve=True)))
        return TextEncoder(ByT5Tokenizer(), encoder.to(device), int(cfg.weights.text_max_length))
    from transformers import AutoTokenizer

    folder = _checked_wan_folder(cfg, wan)
    encoder = UMT5EncoderModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    return TextEncoder(tokenizer, encoder.to(device), int(cfg.weights.text_max_length))


register_codec("wan-vae", _wan_vae)
register_text_encoder("umt5", _umt5)


def _component(cfg: DictConfig, key: str, default: str, registry: dict, what: str) -> Callable:
    components = cfg.get("components") or {}
    for module in components.get("plugins") or []:
        importlib.import_module(module)
    name = components.get(key, default)
    if name not in registry:
        raise UserError(f"unknown {what} {name!r} (components.{key}); known: {', '.join(sorted(registry))}; "
                        f"a plugin module listed under components.plugins can register more")
    return registry[name]


def build_vae_and_text(cfg: DictConfig, device, dtype, wan: str | None = None):
    """(codec, TextEncoder) for a config: the builders its components section names (Wan's VAE and umT5 by
    default). The codec is the raw module (AutoencoderKLWan or a VideoCodec); nasa_video.vae adapts it."""
    return build_codec(cfg, device, dtype, wan), build_text_encoder(cfg, device, dtype, wan)


def build_codec(cfg: DictConfig, device, dtype, wan: str | None = None):
    """The codec the config's components section names (Wan's VAE by default), on the device."""
    codec = _component(cfg, "codec", "wan-vae", CODECS, "codec")
    return codec(cfg, device, dtype, wan).to(device).eval()


def build_text_encoder(cfg: DictConfig, device, dtype, wan: str | None = None):
    """The text encoder the config's components section names (umT5 by default)."""
    text = _component(cfg, "text_encoder", "umt5", TEXT_ENCODERS, "text encoder")
    return text(cfg, device, dtype, wan)


TAE_PUBLISHED = "github.com/madebyollin/taehv (taew2_1.pth or safetensors/taew2_1.safetensors)"


def check_decoder_choice(vae: str, tae) -> None:
    """The decoder asked for (vae "auto" or "tae", with the tiny decoder's weights at `tae`), checked before torch
    loads: the CLI and from_config both ask here."""
    if vae not in ("auto", "tae"):
        raise UserError(f"vae {vae!r}: use 'auto' (the model's own codec) or 'tae' (the tiny Wan 2.1 decoder)")
    if vae == "tae" and tae is None:
        raise UserError("the tiny decoder needs its weights: give --tae PATH with --vae tae (API: tae=PATH with "
                        "vae='tae')")
    if vae != "tae" and tae is not None:
        raise UserError("--tae is the tiny decoder's weights: add --vae tae (API: vae='tae')")
    if tae is not None and not os.path.isfile(tae):
        raise UserError(f"tiny decoder weights not found: {tae}; download taew2_1 from {TAE_PUBLISHED}")
