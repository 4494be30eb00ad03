"""torchrun with 2 gloo processes on the CPU: after a few AdvMoE steps both ranks hold the
same weights (DDP averaged the gradients of each step, the router's included), and the
weights did move."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import make_fashion_like


def test_two_ranks_hold_identical_weights(tmp_path):
    (tmp_path / "data").mkdir()
    data = make_fashion_like(tmp_path / "data")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(Path(__file__).with_name("ddp_worker.py")), str(out), str(data)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1, initial = (load_file(out / f"{name}.safetensors") for name in ("rank0", "rank1", "initial"))
    assert rank0.keys() == rank1.keys() == initial.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert not all(torch.equal(rank0[k], initial[k]) for k in rank0)
    assert (out / "last" / "model.safetensors").is_file()  # rank 0 wrote the run directory
