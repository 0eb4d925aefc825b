"""Data-parallel training under torchrun (ODE regression, DMD): FSDP2 per transformer block, per-rank data and
noise, sharded checkpoints. Ranks must share the output folder (a shared filesystem across nodes); rank 0
decides whether there is a checkpoint to resume and tells the others.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `init_from_env` joins the process group (NCCL on GPUs, gloo on
CPUs, which is how the tests run two ranks). Each network is sharded per Wan block and then at the root, with
fp32 parameters: bf16 compute comes from autocast, as on one GPU, so one and many GPUs train the same numbers
(gradients averaged over ranks). Checkpoints go through torch.distributed.checkpoint, each rank writing its
shards, and are swapped in atomically by rank 0 once every rank has written.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def from_main(self, value):
        """Rank 0's value on every rank (a decision all ranks must take alike)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def finish(ctx: Distributed | None) -> None:
    """Leave the process group (NCCL warns, or hangs, at exit otherwise)."""
    if ctx is not None and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def init_from_env() -> Distributed | None:
    """The process group torchrun describes, or None for a plain one-process run."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return None
    if not dist.is_initialized():
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


def rank_seed(seed: int, rank: int) -> int:
    """Each rank draws its own clips and noise; rank 0 keeps the run's seed (one GPU = rank 0 of one)."""
    return seed + 1_000_003 * rank


def shard_transformer(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: one unit per Wan block (all-gathered only for its own forward / backward), the rest at the root."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


# ---- sharded checkpoints ----------------------------------------------------------------------------------
def save_sharded(path: Path, ctx: Distributed, networks: dict, optimizers: dict, rank_state: dict,
                 shared_state: dict) -> None:
    """networks {name: module}, optimizers {name: (module, optimizer)}; rank_state: this rank's JSON-able state
    (random generators, log); shared_state: rank 0's JSON-able state (step). Atomic: written beside, then
    swapped in by rank 0 after every rank has finished."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    partial, old = path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")
    if ctx.is_main:
        shutil.rmtree(partial, ignore_errors=True)
    ctx.barrier()
    state = {name: get_model_state_dict(net) for name, net in networks.items()}
    state.update({name: get_optimizer_state_dict(net, opt) for name, (net, opt) in optimizers.items()})
    dcp.save(state, checkpoint_id=str(partial))
    (partial / f"rank{ctx.rank}.json").write_text(json.dumps(rank_state))
    if ctx.is_main:
        (partial / "trainer.json").write_text(json.dumps({**shared_state, "world_size": ctx.world_size}))
    ctx.barrier()
    if ctx.is_main:
        if path.exists():  # the new one is complete: the previous may go (a leftover .old first)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()


def sharded_checkpoint(path: Path) -> Path | None:
    """The checkpoint to resume from: the folder, or the previous one if a swap was cut short."""
    old = path.with_name(path.name + ".old")
    return path if (path / "trainer.json").exists() else old if (old / "trainer.json").exists() else None


def load_sharded(path: Path, ctx: Distributed, networks: dict, optimizers: dict) -> tuple[dict, dict]:
    """Load into the sharded networks and optimisers; returns (this rank's state, the shared state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    from ..errors import UserError

    shared = json.loads((path / "trainer.json").read_text())
    if shared["world_size"] != ctx.world_size:
        raise UserError(f"{path} was written by {shared['world_size']} ranks; resume it with "
                        f"torchrun --nproc_per_node {shared['world_size']} (the random streams are per rank)")
    state = {name: get_model_state_dict(net) for name, net in networks.items()}
    state.update({name: get_optimizer_state_dict(net, opt) for name, (net, opt) in optimizers.items()})
    dcp.load(state, checkpoint_id=str(path))
    for name, net in networks.items():
        set_model_state_dict(net, state[name])
    for name, (net, opt) in optimizers.items():
        set_optimizer_state_dict(net, opt, state[name])
    return json.loads((path / f"rank{ctx.rank}.json").read_text()), shared


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole unsharded state dict on rank 0 (on the CPU), empty elsewhere: for exporting the student."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
