"""Each GPU code path once, on a small Fashion-MNIST problem: whether it runs, and how fast.

    python -m benchmarks.gpu_paths --out runs/gpu-paths            # on a machine with CUDA
    python -m benchmarks.gpu_paths --out runs/gpu-paths --only train-fp32 eval-cuda

The paths: training in fp32, under bf16 and fp16 autocast (fp16 with its gradient scaler), in
channels-last memory format, under torch.compile, and under torchrun's DDP over NCCL (one rank
per GPU there is, one included); `advmoe eval` on the GPU, its clean accuracy against the same
evaluation on the CPU; the ONNX export run by onnxruntime's CUDA provider, its logits against
torch's on the same GPU. Each check runs the project's own commands in a process of its own,
as a user would, so one failure does not stop the others. The table says passed, failed (with
the end of the error) or unavailable (what is missing), and the training throughput of each.
The sparse path's speed on the GPU is `advmoe bench sparse --device cuda`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from advmoe.io import atomic_write_text

# One epoch of a small adversarial training run: long enough to learn well above chance (10 %),
# short enough that every path together takes a few minutes on one GPU.
TRAIN = ["--preset", "fmnist-tiny", "--width", "0.25", "--train-examples", "8192", "--val-examples", "256",
         "--epochs", "1", "--test-examples", "500"]
CHANCE_MARGIN = 0.2  # a run passes with test clean accuracy over 2x chance: it learned
EVAL_EXAMPLES = 500
NO_CHECKPOINT = "needs train-fp32's checkpoint, which it did not write"


@dataclass
class Check:
    name: str
    what: str
    status: str = "not run"  # passed, failed, unavailable
    seconds: float = 0.0
    numbers: dict = field(default_factory=dict)
    detail: str = ""

    def fail(self, why: str) -> None:
        self.status, self.detail = "failed", why


def _command(args: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, float]:
    """Run `python args...` with its output in `log`; (exit status, seconds)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            rc = subprocess.run([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n[timed out after {timeout:.0f} s]\n")
            rc = 124
    return rc, time.perf_counter() - start


def _exited(rc: int, log: Path, lines: int = 6) -> str:
    """A failed command's exit status and the last lines it printed."""
    tail = " / ".join(line.strip() for line in log.read_text(errors="replace").splitlines()[-lines:] if line.strip())
    return f"exit {rc}: {tail}"


def _train(check: Check, out: Path, flags: list[str], data_dir: str | None, timeout: float, launcher=()) -> None:
    run = out / check.name
    args = [*launcher, "-m", "cli", "train", *TRAIN, "--device", "cuda", *flags, "--out", str(run)]
    args += ["--data-dir", data_dir] if data_dir else []
    rc, check.seconds = _command(args, out / f"{check.name}.log", timeout)
    if rc != 0:
        check.fail(_exited(rc, out / f"{check.name}.log"))
        return
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    test = json.loads((run / "best" / "metrics.json").read_text())
    check.numbers = {"samples_per_second": round(history[-1]["samples_per_second"]),
                     "test_clean_accuracy": test.get("test_clean_accuracy"),
                     "test_pgd_accuracy": test.get("test_pgd_accuracy")}
    learned = (test.get("test_clean_accuracy") or 0) > CHANCE_MARGIN
    check.status = "passed" if learned else "failed"
    check.detail = "" if learned else f"test clean accuracy {test.get('test_clean_accuracy')}: it did not learn"


def _evaluate(check: Check, out: Path, data_dir: str | None, timeout: float) -> None:
    best = out / "train-fp32" / "best"
    if not best.is_dir():
        check.fail(NO_CHECKPOINT)
        return
    common = [str(best), "--n-examples", str(EVAL_EXAMPLES)] + (["--data-dir", data_dir] if data_dir else [])
    gpu = ["-m", "cli", "eval", *common, "--device", "cuda", "--attacks", "pgd", "apgd", "route-fixed", "router",
           "--pgd-steps", "10", "--out", str(out / "eval-cuda")]
    rc, check.seconds = _command(gpu, out / "eval-cuda.log", timeout)
    if rc != 0:
        check.fail(_exited(rc, out / "eval-cuda.log"))
        return
    cpu = ["-m", "cli", "eval", *common, "--device", "cpu", "--attacks", "pgd", "--pgd-steps", "1",
           "--out", str(out / "eval-cpu")]
    rc, _ = _command(cpu, out / "eval-cpu.log", timeout)
    if rc != 0:
        check.fail(f"the CPU evaluation beside it: {_exited(rc, out / 'eval-cpu.log')}")
        return
    on_gpu, on_cpu = (json.loads((out / d / "eval.json").read_text()) for d in ("eval-cuda", "eval-cpu"))
    check.numbers = {k: on_gpu["accuracy"][k] for k in ("clean", "pgd-10", "apgd", "route-fixed", "router", "robust")
                     if k in on_gpu["accuracy"]} | {"clean_on_cpu": on_cpu["accuracy"]["clean"]}
    # Same weights and images: a GPU's other summation order may flip an image on the edge, not more.
    agree = abs(on_gpu["accuracy"]["clean"] - on_cpu["accuracy"]["clean"]) <= 2 / EVAL_EXAMPLES
    check.status = "passed" if agree else "failed"
    check.detail = "" if agree else "clean accuracy on the GPU and the CPU differ by more than 2 images"


def _onnx_cuda(check: Check, out: Path, timeout: float) -> None:
    try:
        import onnxruntime
    except ImportError:
        check.status, check.detail = "unavailable", "onnxruntime is not installed (the gpu extra: onnxruntime-gpu)"
        return
    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        check.status = "unavailable"
        check.detail = f"this onnxruntime {onnxruntime.__version__} has {providers}: install the gpu extra (onnxruntime-gpu)"
        return
    best, export = out / "train-fp32" / "best", out / "export"
    if not best.is_dir():
        check.fail(NO_CHECKPOINT)
        return
    rc, check.seconds = _command(["-m", "cli", "export", str(best), "--format", "onnx", "--out", str(export), "--force"],
                                 out / "onnx-cuda.log", timeout)
    if rc != 0:
        check.fail(f"export: {_exited(rc, out / 'onnx-cuda.log')}")
        return
    import advmoe

    model = advmoe.load_checkpoint(best, map_location="cuda").eval()
    advmoe.set_execution(model, "sparse")
    cfg = model.cfg
    x = torch.rand(64, cfg.in_channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference, routing = (t.cpu() for t in model.forward_with_routing(x.cuda()))
    session = onnxruntime.InferenceSession(str(next(export.rglob("*.onnx"))), providers=["CUDAExecutionProvider"])
    logits, onnx_routing = (torch.from_numpy(a) for a in session.run(["logits", "routing"], {"input": x.numpy()}))
    diff = (logits - reference.float()).abs().max().item()
    same = bool((logits.argmax(1) == reference.argmax(1)).all() and torch.equal(onnx_routing, routing.to(onnx_routing.dtype)))
    check.numbers = {"max_abs_diff": diff, "provider": session.get_providers()[0]}
    ok = same and diff < 1e-3 and session.get_providers()[0] == "CUDAExecutionProvider"
    check.status = "passed" if ok else "failed"
    check.detail = "" if ok else f"logits differ from torch's by {diff:.2e}; predictions and routes equal: {same}"


def checks(data_dir: str | None, timeout: float) -> dict[str, tuple[str, callable]]:
    """name -> (what it runs, the function that runs it into a Check)."""
    def train(*flags, launcher=()):
        return lambda c, out: _train(c, out, list(flags), data_dir, timeout, launcher)

    ddp = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(max(torch.cuda.device_count(), 1))]
    return {
        "train-fp32": ("advmoe train --device cuda (AdvMoE, fp32, as the reference trains)", train()),
        "train-bf16-channels-last": ("... --amp bf16 --channels-last", train("--amp", "bf16", "--channels-last")),
        "train-fp16": ("... --amp fp16 (with the gradient scaler)", train("--amp", "fp16")),
        "ddp-nccl": ("torchrun --nproc_per_node <GPUs> -m cli train --device cuda (DDP over NCCL)", train(launcher=ddp)),
        "eval-cuda": (f"advmoe eval --device cuda on {EVAL_EXAMPLES} test images (PGD-10, APGD, route-fixed, router), "
                      "clean accuracy against --device cpu", lambda c, out: _evaluate(c, out, data_dir, timeout)),
        "onnx-cuda": ("advmoe export --format onnx, run by onnxruntime's CUDAExecutionProvider against torch on the GPU",
                      lambda c, out: _onnx_cuda(c, out, timeout)),
        # last: the slowest path (76 s on an H200, compiling included)
        "train-compile": ("... --compile", train("--compile")),
    }


def table(results: list[Check]) -> str:
    lines = ["| path | what runs | status | seconds | numbers | detail |", "|---|---|---|---|---|---|"]
    for c in results:
        numbers = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in c.numbers.items())
        lines.append(f"| {c.name} | {c.what} | {c.status} | {c.seconds:.0f} | {numbers} | {c.detail} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_paths", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the runs, logs and gpu_paths.json / .md")
    parser.add_argument("--data-dir", help="Fashion-MNIST's files (default: advmoe.data's)")
    parser.add_argument("--only", nargs="+", metavar="PATH", help="run these paths only (names in the table)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds each command may take")
    args = parser.parse_args(argv)
    available = checks(args.data_dir, args.timeout)
    unknown = sorted(set(args.only or []) - set(available))
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: no such path; the paths are {', '.join(available)}")
    if not torch.cuda.is_available():
        parser.error("no CUDA device is available here: these checks run the GPU paths (on a CPU, `make test` covers the rest)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
              "cuda": torch.version.cuda}
    print(f"# {device['gpu']} x{device['gpus']}, torch {device['torch']} (CUDA {device['cuda']})", flush=True)
    results = []
    for name, (what, run) in available.items():
        if args.only and name not in args.only:
            continue
        check = Check(name, what)
        try:
            run(check, out)
        except Exception as e:  # a check's own bug must not hide the other paths' results
            check.fail(f"{type(e).__name__}: {e}")
        results.append(check)
        print(f"{name}: {check.status} in {check.seconds:.0f} s {check.numbers or ''} {check.detail}", flush=True)
        atomic_write_text(out / "gpu_paths.json", json.dumps({"device": device, "checks": [c.__dict__ for c in results]},
                                                           indent=1) + "\n")
    atomic_write_text(out / "gpu_paths.md", f"{device['gpu']} x{device['gpus']}, torch {device['torch']} "
                                            f"(CUDA {device['cuda']})\n\n{table(results)}\n")
    print(table(results))
    return 0 if all(c.status != "failed" for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
