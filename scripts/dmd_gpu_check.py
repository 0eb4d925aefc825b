"""DMD / NASA-T at full size on GPUs, without weights: seconds per iteration and peak memory.

Random-initialised networks of the real config (the numbers depend on shapes, not on weight values), a stand-in
text encoder with umT5's output shape, random latent clips of the real size; the trainer, masks, gradient
checkpointing, autocast and (under torchrun) FSDP are the real ones.

    python scripts/dmd_gpu_check.py                                          # one GPU
    torchrun --nproc_per_node 8 scripts/dmd_gpu_check.py                     # FSDP over 8 GPUs
    python scripts/dmd_gpu_check.py --model tiny --device cpu                # the CPU check the tests run
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
import zlib

import torch
from omegaconf import OmegaConf

from nasa_video.train.config import ModelSettings, settings_from
from nasa_video.train.distributed import init_from_env
from nasa_video.train.dmd import DMDConfig, DMDTrainer
from nasa_video.loading import load_config
from nasa_video.model.interface import build_from_config


class StandInText:
    """umT5's output shape [B, text_len, text_dim]; a fixed random embedding per prompt."""

    def __init__(self, length: int, dim: int, device):
        self.length, self.dim, self.device = length, dim, device

    def encode_batch(self, prompts):
        rows = [torch.randn(self.length, self.dim, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                for p in prompts]
        return torch.stack(rows).to(self.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-config", default="configs/causvid_nasa_t_train.yaml")
    parser.add_argument("--model", help="override the training config's model (tiny: the CPU check)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iterations", type=int, default=None,
                        help="timed iterations after a warm-up cycle (default: one generator update and the critic-only "
                             "iterations up to the next)")
    args = parser.parse_args()

    tc = OmegaConf.load(args.train_config)
    model_cfg = load_config(args.model or str(tc.model))
    ctx = init_from_env()
    device = ctx.device if ctx is not None else torch.device(args.device)
    model = ModelSettings.of(model_cfg)
    config = model.generator
    torch.manual_seed(0)
    generator = build_from_config(model_cfg).to(device)
    teacher = build_from_config(model_cfg).to(device)
    latents = torch.randn(4, config["in_channels"], model.latent_frames, *model.latent_hw)
    text = StandInText(model.text_max_length, config["text_dim"], device)
    dmd = settings_from(DMDConfig, OmegaConf.to_container(tc.dmd, resolve=True), "dmd")
    ratio = dmd.dfake_gen_update_ratio
    warmup = ratio  # one whole cycle (compilation, FSDP's lazy set-up, CUDA warm-up) before timing
    timed = args.iterations or ratio
    cfg = dataclasses.replace(dmd, steps=warmup + timed, batch=1)
    trainer = DMDTrainer(generator, teacher, text, model_cfg, cfg, latents, ["a prompt"] * 4, dist=ctx)
    trainer.generator.enable_gradient_checkpointing()
    trainer.fake.enable_gradient_checkpointing()

    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    seconds = {"generator": [], "critic": []}
    with autocast:
        for step in range(warmup + timed):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            record = trainer.train_step()
            if cuda:
                torch.cuda.synchronize()
            took = time.perf_counter() - start
            if step >= warmup:
                seconds["generator" if "generator_loss" in record else "critic"].append(took)
            if ctx is None or ctx.is_main:
                print(json.dumps({**record, "seconds": round(took, 3), "timed": step >= warmup}), flush=True)
    report = {
        "model": args.model or str(tc.model), "ranks": ctx.world_size if ctx else 1, "latents": list(latents.shape[1:]),
        "teacher_forcing_tokens": trainer.mask_tokens, "flex_mask": not isinstance(trainer.mask, torch.Tensor),
        "warmup_iterations": warmup,
        **{f"seconds_{kind}_iteration": round(sum(v) / len(v), 3) if v else None for kind, v in seconds.items()},
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "losses_finite": all(torch.isfinite(torch.tensor(v)).item() for r in trainer.log for k, v in r.items()
                             if k.endswith("loss")),
    }
    if ctx is None or ctx.is_main:
        print(json.dumps(report, indent=2))
    if ctx is not None:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
