"""Where a sparse forward spends its time: torch's profiler (or onnxruntime's), operator by
operator, for a checkpoint's MoE model in sparse execution next to its dense twin.

    python -m benchmarks.profile_sparse                   # or: advmoe bench profile
    python -m benchmarks.profile_sparse --checkpoint checkpoints/fmnist-moe --batch-sizes 1 64 --threads 2
    python -m benchmarks.profile_sparse --runtime onnxruntime --threads 1   # as the service runs it

The twin is the same architecture dense at the same width (`advmoe.create_model` of
`advmoe.dense_twin`), untrained, with BatchNorm calibrated on the inputs and prepared for inference
as the project prepares dense models (`set_execution(..., "sparse")`: BatchNorm folded,
channels_last), as in benchmarks/bench_sparse.py. Inputs: the checkpoint's dataset's test images
when they are on this machine (so the router splits them as in service), uniform noise otherwise.

With `--runtime onnxruntime` both models are exported as `advmoe export` exports them and run in
the project's onnxruntime session; its profiler gives each operator type's kernel time and calls
per run (after onnxruntime's graph fusions: a Conv there may hold its ReLU and Add).

Per batch size it prints the wall time per forward (no profiler; median of interleaved rounds),
the self CPU time of all operators under the profiler, the operator calls per forward (every operator the profiler records, nested ones included), and a
table of the operators with the most self CPU time in either model: self CPU ms and calls per
forward, side by side.
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import advmoe
from advmoe.calibrate import untrained
from advmoe.card import read_card
from advmoe.runtimes import onnx_session
from export.graph import export_onnx
from export.timing import timing_inputs

from .bench_sparse import time_interleaved

CHECKPOINT = "checkpoints/fmnist-moe"
MOE_ONLY = ("num_experts", "expert_ratio", "router", "top_k", "router_width", "router_blocks", "router_stride",
            "gate_grad")


def twin_args(cfg) -> dict:
    """The dense twin's arguments: a MoE model's config without what only a MoE model has."""
    return {k: getattr(cfg, k) for k in cfg.field_names() if k not in MOE_ONLY}


@dataclass
class Profile:
    """One model at one batch size: per-forward figures."""
    ms_per_forward: float  # wall time without the profiler
    calls_per_forward: float  # operator calls the profiler records, nested ones included
    operators: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (self CPU ms, calls)

    @property
    def self_cpu_ms(self) -> float:
        """Self CPU ms per forward of every operator, under the profiler (which adds its own cost)."""
        return sum(ms for ms, _ in self.operators.values())


def models(checkpoint: str | Path, x: torch.Tensor) -> dict[str, torch.nn.Module]:
    """The checkpoint's model in sparse execution and its dense twin, prepared alike."""
    moe = advmoe.set_execution(advmoe.load_checkpoint(checkpoint), "sparse").eval()
    twin = untrained(advmoe.dense_twin(moe.model_name), x, **twin_args(moe.cfg))
    return {"sparse MoE": moe, "dense twin": advmoe.set_execution(twin, "sparse").eval()}


@torch.inference_mode()
def profile_model(model: torch.nn.Module, x: torch.Tensor, calls: int) -> tuple[float, dict[str, tuple[float, float]]]:
    """(operator calls per forward, {operator: (self CPU ms, calls) per forward})."""
    model(x)  # warm-up: the sparse fold, first-call allocations
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            model(x)
    operators = {e.key: (e.self_cpu_time_total / 1e3 / calls, e.count / calls) for e in prof.key_averages()}
    return sum(n for _, n in operators.values()), operators


class OnnxModel:
    """A model exported to ONNX in `folder` and run in the project's onnxruntime session (one per
    call of `session`: profiling is a session option)."""

    def __init__(self, model: torch.nn.Module, folder: Path, threads: int):
        folder.mkdir(parents=True)
        advmoe.set_execution(model, "sparse", channels_last=False)  # NCHW, as `advmoe export` exports
        self.path, self.threads = export_onnx(model, folder / "model.onnx"), threads
        self.plain = onnx_session(self.path, threads)

    def __call__(self, x: torch.Tensor):
        return self.plain.run(None, {self.plain.get_inputs()[0].name: x.numpy()})


def profile_onnx(model: OnnxModel, x: torch.Tensor, calls: int,
                 by_shape: bool = False) -> tuple[float, dict[str, tuple[float, float]]]:
    """(kernel calls per run, {operator type: (kernel ms, calls) per run}) from onnxruntime's profiler;
    by_shape: by operator type and its input and output shapes (as onnxruntime runs them: blocked
    layouts pad the channels to the vector width)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = model.threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as onnx_session sets it
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = str(Path(folder) / "ort")
        session = ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        session.run(None, feed)  # warm-up, profiled too: subtracted below
        for _ in range(calls):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(kernels) / len(runs)  # every run launches the same kernels
    kernels = kernels[round(per_run):]  # the warm-up's
    operators = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        key = e["args"]["op_name"]
        if by_shape:
            shapes = [list(s.values())[0] for s in e["args"].get("input_type_shape", [])[:1] + e["args"].get("output_type_shape", [])]
            key += " " + " -> ".join("x".join(map(str, shape)) for shape in shapes)
        operators[key][0] += e["dur"] / 1e3
        operators[key][1] += 1
    return per_run, {op: (ms / calls, n / calls) for op, (ms, n) in operators.items()}


def run(checkpoint: str | Path = CHECKPOINT, batch_sizes=(1, 64), calls: int = 20, rounds: int = 7,
        runtime: str = "torch", by_shape: bool = False) -> dict:
    """{batch: {model: Profile}}."""
    card = read_card(checkpoint)
    pool, inputs = timing_inputs(card, max(batch_sizes))
    pool = torch.from_numpy(pool)
    built = models(checkpoint, pool)
    print(f"# inputs: {inputs}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        if runtime == "onnxruntime":
            built = {name: OnnxModel(model, Path(scratch, str(i)), torch.get_num_threads())
                     for i, (name, model) in enumerate(built.items())}
        profiler = (lambda m, x, n: profile_onnx(m, x, n, by_shape)) if runtime == "onnxruntime" else profile_model
        found = {}
        for batch in batch_sizes:
            x = pool[:batch]
            with torch.inference_mode():
                wall = time_interleaved(built, x, rounds, max(1, calls // batch))
            found[batch] = {}
            for name, model in built.items():
                per_forward, operators = profiler(model, x, calls)
                found[batch][name] = Profile(wall[name], per_forward, operators)
    return found


def table(profiles: dict[str, Profile], top: int) -> list[str]:
    """The `top` operators by self CPU time in either model, side by side (Markdown)."""
    names = list(profiles)
    ranked = sorted({op for p in profiles.values() for op in p.operators},
                    key=lambda op: -max(p.operators.get(op, (0.0, 0.0))[0] for p in profiles.values()))
    lines = ["| operator | " + " | ".join(f"{n}: self CPU ms | {n}: calls" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for op in ranked[:top]:
        cells = []
        for n in names:
            ms, count = profiles[n].operators.get(op, (0.0, 0.0))
            cells += [f"{ms:.3f}", f"{count:g}"]
        lines.append(f"| `{op}` | " + " | ".join(cells) + " |")
    return lines


def report(found: dict, top: int) -> list[str]:
    lines = []
    for batch, profiles in found.items():
        lines += [f"\n## batch {batch} (per forward)\n",
                  "| model | ms per forward (no profiler) | self CPU ms (profiled) | operator calls |", "|---|---|---|---|"]
        lines += [f"| {n} | {p.ms_per_forward:.2f} | {p.self_cpu_ms:.2f} | {p.calls_per_forward:g} |"
                  for n, p in profiles.items()]
        lines += [""] + table(profiles, top)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advmoe bench profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=CHECKPOINT, help="a MoE checkpoint (default: %(default)s)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--calls", type=int, default=20, help="forwards profiled per model and batch")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the wall time (median taken)")
    parser.add_argument("--top", type=int, default=15, help="operators listed per batch")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's); "
                        "onnxruntime gets as many")
    parser.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                        help="eager torch in sparse execution, or the ONNX export in onnxruntime (the service's)")
    parser.add_argument("--by-shape", action="store_true", help="onnxruntime: list kernels by operator type and "
                        "input and output shapes, not by type alone")
    args = parser.parse_args(argv)
    if min(args.batch_sizes + [args.calls, args.rounds, args.top]) < 1:
        parser.error("--batch-sizes, --calls, --rounds and --top must be positive")
    if not (Path(args.checkpoint) / "config.json").is_file():
        parser.error(f"{args.checkpoint}: no checkpoint there (config.json missing)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# advmoe {advmoe.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {args.checkpoint}, {args.runtime}, {args.calls} profiled calls, "
          f"{args.rounds} rounds", flush=True)
    if args.by_shape and args.runtime != "onnxruntime":
        parser.error("--by-shape needs --runtime onnxruntime")
    found = run(args.checkpoint, tuple(args.batch_sizes), args.calls, args.rounds, args.runtime, args.by_shape)
    print("\n".join(report(found, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
