"""The GPU path checks. Without a GPU: the clear refusal, and each check's commands run on the
CPU instead (their flags and the files they read are the project's own: a renamed flag fails here,
not first on a lent GPU)."""
import json
import os
import subprocess

import pytest

from benchmarks import gpu_paths
from helpers import make_fashion_like


def test_unknown_path_is_refused_with_the_names(capsys):
    with pytest.raises(SystemExit):
        gpu_paths.main(["--out", "x", "--only", "train-fp64"])
    err = capsys.readouterr().err
    assert "train-fp64" in err and "train-fp32" in err and "ddp-nccl" in err


def test_no_gpu_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_paths.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_paths.main(["--out", str(tmp_path / "out")])
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_checks_run_their_commands_on_the_cpu(tmp_path, monkeypatch):
    """train-fp32 and eval-cuda with `cuda` swapped for `cpu` in their commands: both pass, and
    the report holds their numbers; onnx-cuda says what is missing where onnxruntime has no CUDA."""
    (tmp_path / "data").mkdir()
    data = make_fashion_like(tmp_path / "data", n_train=400, n_test=60)
    command = gpu_paths._command
    monkeypatch.setattr(gpu_paths, "_command", lambda args, *a, **k: command(["cpu" if x == "cuda" else x for x in args], *a, **k))
    monkeypatch.setattr(gpu_paths, "TRAIN", ["--preset", "fmnist-tiny", "--width", "0.125", "--train-examples", "128",
                                             "--val-examples", "16", "--epochs", "1", "--test-examples", "32",
                                             "--val-size", "100", "--batch-size", "32", "--val-apgd-iterations", "0"])
    monkeypatch.setattr(gpu_paths, "EVAL_EXAMPLES", 20)
    monkeypatch.setattr(gpu_paths, "CHANCE_MARGIN", -1.0)  # four steps learn nothing; the plumbing is under test
    monkeypatch.setattr(gpu_paths.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_paths.torch.cuda, "get_device_name", lambda *a: "no GPU (test)")
    out = tmp_path / "out"
    rc = gpu_paths.main(["--out", str(out), "--data-dir", str(data), "--only", "train-fp32", "eval-cuda", "onnx-cuda"])
    report = json.loads((out / "gpu_paths.json").read_text())
    status = {c["name"]: c for c in report["checks"]}
    assert status["train-fp32"]["status"] == "passed", status["train-fp32"]["detail"]
    assert status["train-fp32"]["numbers"]["samples_per_second"] > 0
    assert status["eval-cuda"]["status"] == "passed", status["eval-cuda"]["detail"]
    assert {"clean", "pgd-10", "apgd", "route-fixed", "router", "clean_on_cpu"} <= status["eval-cuda"]["numbers"].keys()
    assert status["onnx-cuda"]["status"] in ("unavailable", "failed")  # no CUDA here, whatever the provider list says
    assert rc == (1 if status["onnx-cuda"]["status"] == "failed" else 0)
    assert "| train-fp32 |" in (out / "gpu_paths.md").read_text()


SESSION = "benchmarks/gpu_session.sh"


def _session(tmp_path, **env):
    """gpu_session.sh with a stand-in python that only logs what it was asked to run."""
    log = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    stub.chmod(0o755)
    done = subprocess.run(["bash", SESSION, str(tmp_path / "out"), str(tmp_path / "data"), "100"],
                          env={**os.environ, "PYTHON": str(stub), **env}, capture_output=True, text=True)
    return done, log.read_text().splitlines() if log.exists() else []


def test_session_runs_only_the_stages_asked_for(tmp_path):
    done, calls = _session(tmp_path, STAGES="paths", PATHS="eval-cuda onnx-cuda")
    assert done.returncode == 0, done.stderr
    modules = [c.split()[1] for c in calls if c.startswith("-m ")]
    assert modules == ["benchmarks.gpu_paths"]
    assert "--only eval-cuda onnx-cuda" in calls[-1]


def test_session_runs_every_stage_by_default(tmp_path):
    done, calls = _session(tmp_path)
    assert done.returncode == 0, done.stderr
    modules = [c.split()[1] for c in calls if c.startswith("-m ")]
    assert modules == ["benchmarks.bench_gpu"] * 3 + ["studies.frontier"] * 3 + ["benchmarks.gpu_paths",
                                                       "benchmarks.bench_methods",
                                                       "benchmarks.bench_methods", "benchmarks.bench_sparse",
                                                       "studies.frontier", "studies.frontier"]
    runs = [c for c in calls if c.startswith("-m ")]
    assert "--batch-sizes 64" in runs[0] and "--batch-sizes 512" in runs[1]  # the GPU issue's targets first
    assert sorted(int(r.split("--seeds ")[1].split()[0]) for r in runs[3:6]) == [9, 10, 11]  # at once: any order
    assert all('router_stride=2' in r and '--epochs 10' in r for r in runs[3:6])
    assert "--only" not in runs[6]


def test_session_refuses_an_unknown_stage_before_it_starts(tmp_path):
    done, calls = _session(tmp_path, STAGES="paths bench")
    assert done.returncode == 2
    assert "no stage 'bench'" in done.stderr and "graphs ship paths methods sparse study" in done.stderr
    assert calls == [] and not (tmp_path / "out").exists()
