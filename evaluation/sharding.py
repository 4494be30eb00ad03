"""Evaluating over several processes. The images are cut into units of `batch_size`, and every
attack runs on one unit at a time with seeds drawn from the unit's index, so a unit's results do
not depend on which process evaluates it: the units are dealt out to the ranks and rank 0 gathers
the per-example results into the same eval.json one process writes. The ranks come from torchrun,
or from `evaluate_in_processes`, which starts them itself as torchrun would."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from advmoe.settings import ConfigError

from .document import Results


def units(n: int, batch_size: int) -> list[slice]:
    """The units of n images: consecutive slices of at most batch_size."""
    return [slice(start, min(n, start + batch_size)) for start in range(0, n, batch_size)]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(mine: list[tuple[int, Results]], rank: int, world: int) -> list[Results] | None:
    """Rank 0: every unit's results in unit order; the other ranks: None."""
    if world == 1:
        return [r for _, r in sorted(mine, key=lambda t: t[0])]
    everything = [None] * world if rank == 0 else None
    dist.gather_object(mine, everything, dst=0)
    if rank != 0:
        return None
    ordered = sorted((item for part in everything for item in part), key=lambda t: t[0])
    return [r for _, r in ordered]


def evaluate_in_processes(processes: int, checkpoint: str | os.PathLike, threads: int | None = None,
                          **kwargs) -> dict:
    """evaluate_checkpoint sharded over `processes` local CPU processes (gloo), started by this
    call as torchrun would start them, each with `threads` torch threads; returns the document
    rank 0 wrote. The per-example results are one process's. On a 2-core CPU, two one-thread
    processes attack faster than one two-thread process (docs/evaluation.md)."""
    from .robustness import evaluate_checkpoint  # here, not above: robustness's imports lead back to this module

    if processes < 1:
        raise ConfigError(f"processes must be >= 1, got {processes}")
    if processes == 1:
        return evaluate_checkpoint(checkpoint, **kwargs)
    if kwargs.get("device", "cpu") != "cpu":
        raise ConfigError("evaluate_in_processes shards over CPU processes; on GPUs run `torchrun -m cli eval`, one per GPU")
    with socket.socket() as free:  # a port for the group's rendezvous, as torchrun --standalone picks one
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    try:
        torch.multiprocessing.spawn(_evaluate_rank, args=(processes, port, threads, str(checkpoint), kwargs),
                                    nprocs=processes)
    except torch.multiprocessing.ProcessRaisedException as e:  # the rank's own error, not its traceback
        error, _, message = str(e).strip().splitlines()[-1].partition(": ")
        raise (ConfigError if error.endswith("ConfigError") else RuntimeError)(message or error) from None
    return json.loads((Path(kwargs.get("out") or checkpoint) / "eval.json").read_text())


def _evaluate_rank(rank: int, processes: int, port: int, threads: int | None, checkpoint: str, kwargs: dict) -> None:
    """One rank of evaluate_in_processes: the variables torchrun would set, then the evaluation."""
    from .robustness import evaluate_checkpoint  # here, not above: robustness's imports lead back to this module

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(threads)
    evaluate_checkpoint(checkpoint, **kwargs)

