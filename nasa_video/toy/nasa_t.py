"""NASA-T on the bundled world: DMD from the shipped student and teacher, negatives drawn from object names.

    nasa-video train toy-nasa-t [--out FOLDER] [--smoke] [--export nasa_video/toy/weights]

Writes FOLDER/generator_nasa_t.safetensors and FOLDER/nasa_t.json (losses, seconds); FOLDER/dmd.pt is the
resumable checkpoint (a killed run continues where it stopped) and FOLDER/cache/ the re-encoded data.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from ..train.dmd import DMDConfig, DMDTrainer, NegativeSampler
from ..config import model_spec
from ..loading import bundled_path, load_config
from .codec import ShuffleCodec
from .text import load_toy_text_encoder
from .train import encode_dataset, new_generator
from .world import caption_objects

SMOKE = {"data": {"clips": 8}, "dmd": {"steps": 3, "batch": 2, "checkpoint_every": 1}}


def object_negatives(share: float, negatives: list[str]) -> NegativeSampler:
    """NASA-T's negatives on this world: with probability `share` one of the clip's own objects (read from its
    caption), what users ask to remove; otherwise one of `negatives`."""
    def sample(captions: list[str], rng: np.random.Generator) -> list[str]:
        out = []
        for caption in captions:
            if share and rng.random() < share:
                names = caption_objects(caption)
                out.append(names[int(rng.integers(len(names)))])
            else:
                out.append(str(negatives[int(rng.integers(len(negatives)))]))
        return out
    return sample


def load_weights(model, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})


def train_toy_nasa_t(out: str | Path, smoke: bool = False, weights: str | Path | None = None) -> dict:
    from safetensors.torch import load_file, save_file

    out = Path(out)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    model_cfg = load_config("toy", {"weights": {"folder": str(weights)}} if weights else None)
    tc = OmegaConf.load(Path(__file__).parents[1] / "configs" / "toy_nasa_t_train.yaml")
    if smoke:
        tc = OmegaConf.merge(tc, OmegaConf.create(SMOKE))
    torch.manual_seed(int(tc.seed))
    began = time.perf_counter()
    codec = ShuffleCodec.load(bundled_path(model_cfg, "codec"))
    text = load_toy_text_encoder(bundled_path(model_cfg, "text"), "cpu")
    data = out / "cache" / "latents.safetensors"
    if data.exists():
        latents = load_file(str(data))["latents"]
        captions = json.loads((out / "cache" / "captions.json").read_text())
    else:
        # a different world seed from the ODE stage's data, same world
        from ..pipeline import pixel_frames

        frames = pixel_frames(model_spec(model_cfg).video.latent_frames, codec.temporal_stride)
        tc_data = OmegaConf.create({"clip_frames": frames})
        latents, captions = encode_dataset(codec, tc_data, np.random.default_rng([int(tc.seed), 7]),
                                           int(tc.data.clips), model_spec(model_cfg).video.latent_frames)
        save_file({"latents": latents.contiguous()}, str(data))
        (out / "cache" / "captions.json").write_text(json.dumps(captions))
    student, teacher = new_generator(model_cfg, 0), new_generator(model_cfg, 0)
    load_weights(student, bundled_path(model_cfg, str(model_cfg.weights.generator)))
    load_weights(teacher, bundled_path(model_cfg, "teacher.safetensors"))
    cfg = DMDConfig(**OmegaConf.to_container(tc.dmd), seed=int(tc.seed))
    trainer = DMDTrainer(student, teacher, text, model_cfg, cfg, latents, captions,
                         negative_sampler=object_negatives(cfg.negative_from_caption, cfg.negatives))
    log = trainer.run(out / "dmd.pt")
    final = trainer.ema if trainer.ema is not None else trainer.generator
    save_file({k: v.contiguous() for k, v in final.state_dict().items()}, str(out / "generator_nasa_t.safetensors"))
    summary = {"steps": trainer.step, "smoke": smoke, "seconds": round(time.perf_counter() - began, 1),
               "critic_loss_last20": float(np.mean([r["critic_loss"] for r in log[-20:]])),
               "generator_loss_last5": float(np.mean([r["generator_loss"] for r in log if "generator_loss" in r][-5:])),
               "config": OmegaConf.to_container(tc)}
    (out / "nasa_t.json").write_text(json.dumps(summary, indent=2))
    return summary


def export_nasa_t(out: str | Path, dest: str | Path) -> list[Path]:
    import shutil

    out, dest = Path(out), Path(dest)
    for name in ("generator_nasa_t.safetensors", "nasa_t.json"):
        shutil.copy2(out / name, dest / name)
    return [dest / "generator_nasa_t.safetensors", dest / "nasa_t.json"]
