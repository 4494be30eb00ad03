"""torchrun with gloo processes on the CPU: after a few AdvMoE steps every rank holds the
same weights (DDP averaged the gradients of each step, the router's included), and the
weights did move. One rank joins the group too (the path `--nproc_per_node 1` takes on a
machine of one GPU). A collapse guard decided on rank 0's validation is followed by every rank."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_fashion_like


def torchrun(tmp_path: Path, ranks: int, *args: str) -> Path:
    """ddp_worker.py under torchrun; the run directory."""
    (tmp_path / "data").mkdir()
    data = make_fashion_like(tmp_path / "data")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
         str(Path(__file__).with_name("ddp_worker.py")), str(out), str(data), *args],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("ranks", [1, 2])
def test_ranks_hold_identical_weights(tmp_path, ranks):
    out = torchrun(tmp_path, ranks)
    initial = load_file(out / "initial.safetensors")
    weights = [load_file(out / f"rank{rank}.safetensors") for rank in range(ranks)]
    assert all(w.keys() == initial.keys() for w in weights)
    assert all(torch.equal(w[k], weights[0][k]) for w in weights for k in initial)
    assert not all(torch.equal(weights[0][k], initial[k]) for k in initial)
    assert (out / "last" / "model.safetensors").is_file()  # rank 0 wrote the run directory


def test_every_rank_follows_rank_0s_collapse_guard(tmp_path):
    """Rank 0's validation collapses in epoch 2 and rank 1's does not (each rank validates with its
    own BatchNorm statistics): both roll back, with the stronger attack, and end on the same weights
    (a rank that went its own way would leave the other waiting in a collective)."""
    out = torchrun(tmp_path, 2, "collapse")
    histories = [json.loads((out / f"history{rank}.json").read_text()) for rank in range(2)]
    for history in histories:
        assert [r["epoch"] for r in history] == [1, 2, 2]
        assert history[1]["collapse_guard"]["best_epoch"] == 1
        assert [r["training_attack_steps"] for r in history] == [2, 2, 3]
    weights = [load_file(out / f"rank{rank}.safetensors") for rank in range(2)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
