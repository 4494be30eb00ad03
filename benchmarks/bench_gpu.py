"""The sparse MoE ResNet-18 against its dense twin on a GPU, both in the same execution mode.

    advmoe bench gpu --device cuda --json reports/gpu_sparse.json      # on the GPU machine
    advmoe bench gpu --device cpu --image-sizes 32 --batch-sizes 4     # the same code, eagerly, here

Modes: `eager` (the dense twin's inference preparation against sparse execution, as today) and
`graphs` (both in static execution, each batch a CUDA graph: advmoe/graphs.py). Precisions: fp32,
tf32 (TF32 matmuls and convolutions) and bf16 (the dense model under bf16 autocast; the MoE
model's experts under bf16 autocast, its router in float32). Splits: the share of the batch the
router sends to expert 0 (the router's bias is shifted to it). Timing: `--warmup` calls, then
`--rounds` interleaved rounds, each the median of CUDA-event times; a graph's capture time and
memory, kernels per forward (the profiler's CUDA kernels) and whether a forward synchronises
with the host (`torch.cuda.set_sync_debug_mode("error")` around one call) are recorded too.
Rows are added until `--budget-s` is spent, in the order given: put what matters first.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

import advmoe
from advmoe.calibrate import balance_routing, untrained
from advmoe.device import unavailable
from advmoe.graphs import GraphedModel
from advmoe.io import atomic_write_text

PRECISIONS = ("bf16", "tf32", "fp32")
MODES = ("graphs", "eager")


class Timed:
    """A model in one mode and precision, called as f(x) -> (logits, routing). With bf16 the model's
    expert_dtype puts its experts (a dense model: all of it) under bf16 autocast; a router stays
    in float32."""

    def __init__(self, model, mode: str, precision: str, batch: int):
        dtype = torch.bfloat16 if precision == "bf16" else None
        if mode == "graphs":
            self.graphed = GraphedModel(model, batch_buckets=(batch,), expert_dtype=dtype)
            self.call = self.graphed
        else:
            advmoe.set_execution(model, "sparse")
            model.expert_dtype = dtype
            self.call = model.forward_with_routing

    def __call__(self, x):
        with torch.inference_mode():
            return self.call(x)


def median_ms(timed: dict, x: torch.Tensor, rounds: int, warmup: int) -> dict[str, float]:
    cuda = x.device.type == "cuda"
    for f in timed.values():
        for _ in range(warmup):
            f(x)
    samples = {name: [] for name in timed}
    for _ in range(rounds):
        for name, f in timed.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                f(x)
                end.record()
                torch.cuda.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                f(x)
                samples[name].append((time.perf_counter() - begin) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def kernels_per_call(f, x: torch.Tensor) -> int | None:
    if x.device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        f(x)
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def syncs_with_host(f, x: torch.Tensor) -> bool | None:
    """Whether one call makes the host wait for the GPU (None on a CPU)."""
    if x.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        f(x)
        return False
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")


def row(image: int, batch: int, precision: str, mode: str, share: float, device: str, rounds: int, warmup: int,
        router_stride: int, width: float = 1.0) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    x = torch.rand(batch, 3, image, image)
    models = {"dense": untrained("resnet18", x, image_size=image, width=width),
              "moe": untrained("moe_resnet18", x, image_size=image, width=width, router_stride=router_stride,
                               router_blocks=1)}
    balance_routing(models["moe"], x, share)  # `share` of the batch to expert 0
    x = x.to(device)
    timed = {name: Timed(m.to(device).eval(), mode, precision, batch) for name, m in models.items()}
    ms = median_ms(timed, x, rounds, warmup)
    with torch.inference_mode():
        routing = timed["moe"](x)[1]
    graphs = {name: next(iter(t.graphed.graphs.values()), None) for name, t in timed.items() if mode == "graphs"}
    return {"image": image, "batch": batch, "precision": precision, "mode": mode, "split": share,
            "dense_ms": ms["dense"], "moe_ms": ms["moe"], "speedup": ms["dense"] / ms["moe"],
            "expert0_share": routing[:, 0].eq(0).float().mean().item(),
            "mac_ratio": advmoe.count_macs(models["dense"], (3, image, image)) / advmoe.count_macs(models["moe"], (3, image, image)),
            "capture_s": {n: g.capture_seconds for n, g in graphs.items() if g is not None} or None,
            "graph_mib": {n: g.memory_bytes / 2**20 for n, g in graphs.items() if g is not None} or None,
            "kernels": {n: kernels_per_call(t, x) for n, t in timed.items()},
            "syncs": {n: syncs_with_host(t, x) for n, t in timed.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advmoe bench gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224, 32])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 1, 16, 256, 512, 1024])
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["bf16", "tf32", "fp32"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--splits", type=float, nargs="+", default=[0.5, 0.75, 1.0],
                        help="share of the batch routed to expert 0")
    parser.add_argument("--router-stride", type=int, choices=(1, 2), default=2)
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1: the paper's ResNet-18)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop adding rows after this many seconds")
    parser.add_argument("--json", help="also write the rows to this JSON file (rewritten after each row)")
    args = parser.parse_args(argv)
    if problem := unavailable(args.device):
        parser.error(problem)
    if any(not 0 <= s <= 1 for s in args.splits):
        parser.error("--splits: shares in [0, 1]")
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.machine()
    print(f"# advmoe {advmoe.__version__}, torch {torch.__version__}, {where}, {args.rounds} rounds, "
          f"{args.warmup} warm-up calls\n")
    print("| image | batch | precision | mode | split (routed) | dense ms | MoE ms | speed-up | MAC ratio "
          "| kernels dense / MoE | syncs dense / MoE |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows, started = [], time.perf_counter()
    for image in args.image_sizes:
        for batch in args.batch_sizes:
            for precision in args.precisions:
                for mode in args.modes:
                    for share in args.splits if batch > 1 else args.splits[:1]:
                        if time.perf_counter() - started > args.budget_s:
                            print(f"\n(budget of {args.budget_s:.0f} s spent: rows left out)")
                            return 0
                        r = row(image, batch, precision, mode, share, args.device, args.rounds, args.warmup,
                                args.router_stride, args.width)
                        rows.append(r)
                        print(f"| {image} | {batch} | {precision} | {mode} | {share:.2f} ({r['expert0_share']:.2f}) "
                              f"| {r['dense_ms']:.3f} "
                              f"| {r['moe_ms']:.3f} | {r['speedup']:.2f}x | {r['mac_ratio']:.2f}x "
                              f"| {r['kernels']['dense']} / {r['kernels']['moe']} "
                              f"| {r['syncs']['dense']} / {r['syncs']['moe']} |", flush=True)
                        if args.json:
                            atomic_write_text(args.json, json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
