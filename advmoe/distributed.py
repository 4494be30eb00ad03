"""Joining a torch.distributed process group, one rule for training and evaluation.

The rule: a process joins a group when its environment describes one, that is when the launcher
set the variables of torch's env:// rendezvous (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
torchrun sets them for every rank, one rank included (`--nproc_per_node 1` runs the same path as
eight), and so does a launcher that spawns its ranks itself (`mp.spawn` with those variables). A
group that is initialised already is used as it is, and left to whoever started it.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .settings import ConfigError

RENDEZVOUS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process's environment describes a process group to join. WORLD_SIZE above 1
    with the other variables missing is an error: a launcher meant a group and left out its address."""
    missing = [name for name in RENDEZVOUS if name not in os.environ]
    if not missing:
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: "
                          "start the ranks with torchrun")
    return False


def setup(device: str | torch.device) -> tuple[int, int, bool]:
    """(rank, world size, started here). Joins the group the environment describes (NCCL for a
    CUDA device, gloo otherwise); (0, 1, False) when there is none. started here: this call
    initialised the group, so the caller tears it down (`teardown`)."""
    started = False
    if not dist.is_initialized() and launched():
        dist.init_process_group(backend="nccl" if torch.device(device).type == "cuda" else "gloo")
        started = True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), started
    return 0, 1, False


def teardown(started: bool) -> None:
    """Destroy the group if `setup` started it; a group started elsewhere is left alone."""
    if started and dist.is_initialized():
        dist.destroy_process_group()
