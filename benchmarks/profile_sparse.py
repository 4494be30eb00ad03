"""Where a sparse forward spends its time: torch's profiler, operator by operator, for a
checkpoint's MoE model in sparse execution next to its dense twin.

    python -m benchmarks.profile_sparse                   # or: advmoe bench profile
    python -m benchmarks.profile_sparse --checkpoint checkpoints/fmnist-moe --batch-sizes 1 64 --threads 2

The twin is the same architecture dense at the same width (`advmoe.create_model` of
`advmoe.dense_twin`), untrained, with BatchNorm calibrated on the inputs and prepared for inference
as the project prepares dense models (`set_execution(..., "sparse")`: BatchNorm folded,
channels_last), as in benchmarks/bench_sparse.py. Inputs: the checkpoint's dataset's test images
when they are on this machine (so the router splits them as in service), uniform noise otherwise.

Per batch size it prints the wall time per forward (no profiler; median of interleaved rounds),
the self CPU time of all operators under the profiler, the operator calls per forward (every operator the profiler records, nested ones included), and a
table of the operators with the most self CPU time in either model: self CPU ms and calls per
forward, side by side.
"""
from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import advmoe
from advmoe.calibrate import calibrate_batchnorm
from advmoe.card import read_card
from export.timing import timing_inputs

from .bench_sparse import time_interleaved

CHECKPOINT = "checkpoints/fmnist-moe"
MOE_ONLY = ("num_experts", "expert_ratio", "router", "top_k", "router_width", "router_blocks", "gate_grad")


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
    twin_args = {k: getattr(moe.cfg, k) for k in moe.cfg.field_names() if k not in MOE_ONLY}
    torch.manual_seed(0)
    twin = advmoe.create_model(advmoe.dense_twin(moe.model_name), **twin_args)
    calibrate_batchnorm(twin, x)
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


def run(checkpoint: str | Path = CHECKPOINT, batch_sizes=(1, 64), calls: int = 20, rounds: int = 7) -> dict:
    """{batch: {model: Profile}}."""
    card = read_card(checkpoint)
    pool, inputs = timing_inputs(card, max(batch_sizes))
    pool = torch.from_numpy(pool)
    built = models(checkpoint, pool)
    print(f"# inputs: {inputs}", flush=True)
    found = {}
    for batch in batch_sizes:
        x = pool[:batch]
        wall = time_interleaved(built, x, rounds, max(1, calls // batch))
        found[batch] = {}
        for name, model in built.items():
            per_forward, operators = profile_model(model, x, calls)
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
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if min(args.batch_sizes + [args.calls, args.rounds, args.top]) < 1:
        parser.error("--batch-sizes, --calls, --rounds and --top must be positive")
    if not (Path(args.checkpoint) / "config.json").is_file():
        parser.error(f"{args.checkpoint}: no checkpoint there (config.json missing)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# advmoe {advmoe.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {args.checkpoint}, {args.calls} profiled calls, "
          f"{args.rounds} rounds", flush=True)
    found = run(args.checkpoint, tuple(args.batch_sizes), args.calls, args.rounds)
    print("\n".join(report(found, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
