"""Dense twin vs masked MoE vs sparse MoE on the CPU, measured side by side in one process.

    python -m benchmarks.bench_sparse            # or: advmoe bench sparse
    python -m benchmarks.bench_sparse --archs resnet18 --batch-sizes 1 64 --json out.json
    python -m benchmarks.bench_sparse --checkpoint checkpoints/fmnist-moe   # a trained model (shipped_speed.py)

For each architecture and router, the three models are timed in interleaved rounds (so that
a noisy machine slows them alike), and the table prints milliseconds per batch (median over
rounds), the speed-ups of sparse over dense and over masked, and the MAC ratios. Models are
untrained, with BatchNorm statistics calibrated on the benchmark batch and routers biased to
split it evenly over the experts, as a trained load-balanced router would (the split is
printed). The dense twin runs with the same inference preparation as the sparse model
(BatchNorm folded, channels_last), so the speed-up is the experts' doing, not the folding's.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import advmoe
from advmoe.calibrate import untrained
from advmoe.device import synchronizer, unavailable
from advmoe.io import atomic_write_text
from advmoe.macs import measure_macs
from advmoe.routers import ROUTERS
from advmoe.settings import parse_pairs

ARCHS = ("resnet18", "wrn28_10", "vgg16", "densenet40")


def build(arch: str, router: str, image_size: int, width: float, router_blocks: int, x: torch.Tensor,
          router_stride: int = 1):
    """The dense twin, the MoE model in masked execution and the same weights in sparse execution."""
    dense = advmoe.set_execution(untrained(arch, x, image_size=image_size, width=width), "sparse")
    moe = untrained(f"moe_{arch}", x, image_size=image_size, width=width, router=router, router_blocks=router_blocks,
                    router_stride=router_stride)
    sparse = advmoe.create_model(f"moe_{arch}", image_size=image_size, width=width, router=router,
                                 router_blocks=router_blocks, router_stride=router_stride)
    sparse.load_state_dict(moe.state_dict())
    sparse.eval()
    advmoe.set_execution(sparse, "sparse")
    return {"dense": dense, "masked": moe, "sparse": sparse}


@torch.inference_mode()
def time_interleaved(models: dict, x: torch.Tensor, rounds: int, calls: int, warmup: int = 1) -> dict[str, float]:
    """Median ms per call of each model; every round times each model once, in turn."""
    for model in models.values():
        for _ in range(warmup):
            model(x)  # warm-up (and the sparse fold; TorchScript optimizes after its first calls)
    synchronize = synchronizer(x.device)
    samples = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                model(x)
            synchronize()
            samples[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def run(archs=ARCHS, routers=ROUTERS, batch_sizes=(1, 64), image_size=32, width=1.0, router_blocks=3,
        rounds=5, device: str = "cpu", router_stride: int = 1) -> list[dict]:
    """Models are built, calibrated and counted on the CPU, then timed on `device`."""
    rows = []
    for arch in archs:
        for router in routers:
            torch.manual_seed(0)
            calib = torch.rand(64, 3, image_size, image_size)
            models = build(arch, router, image_size, width, router_blocks, calib, router_stride)
            macs = {name: measure_macs(m, calib[:8]) for name, m in models.items()}
            models = {name: m.to(device) for name, m in models.items()}
            for batch in batch_sizes:
                x = (calib[:batch] if batch <= 64 else torch.rand(batch, 3, image_size, image_size)).to(device)
                calls = 10 if batch == 1 else 1
                ms = time_interleaved(models, x, rounds, calls)
                with torch.inference_mode():
                    (sparse_out, sparse_routes), (masked_out, masked_routes) = (
                        models[name].forward_with_routing(x) for name in ("sparse", "masked"))
                # A route taken differently (a near tie of the router's scores, which the balanced
                # router makes common, read through other arithmetic) changes a whole output; the
                # parity of the arithmetic is over the images routed alike.
                same = (sparse_routes == masked_routes).all(1)
                top2 = models["masked"].router_logits.float().topk(2, dim=-1).values
                closest_tie = (top2[..., 0] - top2[..., 1]).min().item()  # the smallest margin any route had
                parity = (sparse_out - masked_out)[same].abs().max().item() if same.any() else float("nan")
                usage = sparse_routes.eq(0).float().mean().item()
                rows.append(dict(
                    arch=arch, router=router, batch=batch, device=str(device),
                    dense_ms=ms["dense"], masked_ms=ms["masked"], sparse_ms=ms["sparse"],
                    speedup_vs_dense=ms["dense"] / ms["sparse"], speedup_vs_masked=ms["masked"] / ms["sparse"],
                    dense_gmacs=macs["dense"] / 1e9, masked_gmacs=macs["masked"] / 1e9, sparse_gmacs=macs["sparse"] / 1e9,
                    mac_ratio=macs["sparse"] / macs["dense"], expert0_share=usage, max_abs_diff=parity,
                    routes_differ=1 - same.float().mean().item(), closest_tie=closest_tie,
                ))
                print(format_row(rows[-1]), flush=True)
    return rows


HEADER = ("| model | router | batch | dense ms | masked ms | sparse ms | sparse vs dense | sparse vs masked "
          "| MACs sparse/dense | expert 0 share | closest router tie | routes differ | max \\|sparse - masked\\| (same routes) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    return (f"| moe_{r['arch']} | {r['router']} | {r['batch']} | {r['dense_ms']:.1f} | {r['masked_ms']:.1f} "
            f"| {r['sparse_ms']:.1f} | {r['speedup_vs_dense']:.2f}x | {r['speedup_vs_masked']:.2f}x "
            f"| {r['mac_ratio']:.3f} ({r['sparse_gmacs']:.3f} / {r['dense_gmacs']:.3f} G) | {r['expert0_share']:.2f} "
            f"| {r['closest_tie']:.1e} | {r['routes_differ']:.1%} | {r['max_abs_diff']:.1e} |")


def common_parser(prog: str, doc: str, archs: list[str]) -> argparse.ArgumentParser:
    """The options every benchmark here takes."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=archs, choices=ARCHS)
    parser.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=ROUTERS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = the paper's models)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median taken)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batch_sizes) or args.rounds < 1:
        parser.error("--batch-sizes and --rounds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = common_parser("advmoe bench sparse", __doc__, list(ARCHS))
    parser.add_argument("--router-blocks", type=int, default=3, help="blocks per stage of the shared router")
    parser.add_argument("--router-stride", type=int, choices=(1, 2), default=1,
                        help="stride of the shared router's entry (2: it sees a quarter of the pixels)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--checkpoint", help="instead: this trained MoE checkpoint against its dense twin and the dense "
                        "model of its MACs, each exported and on its fastest runtime (--threads: 1 by default, as a "
                        "service worker; --rounds, --batch-sizes and --json apply)")
    parser.add_argument("--changes", nargs="+", default=[], metavar="KEY=VALUE",
                        help="with --checkpoint: time its architecture with these model settings changed "
                             "(width=0.5 router_stride=2), untrained, router balanced")
    args = parse(parser, argv)
    if args.checkpoint:
        return _checkpoint(args, parser)
    if problem := unavailable(args.device):
        parser.error(problem)
    if args.threads:
        torch.set_num_threads(args.threads)
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"# advmoe {advmoe.__version__}, torch {torch.__version__}, {where}, image {args.image_size}x{args.image_size}, "
          f"width {args.width}, router blocks {args.router_blocks}, router stride {args.router_stride}, "
          f"{args.rounds} rounds\n")
    print(HEADER, flush=True)
    rows = run(args.archs, args.routers, tuple(args.batch_sizes), args.image_size, args.width,
               args.router_blocks, args.rounds, args.device, args.router_stride)
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2))
    return 0


def _checkpoint(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .shipped_speed import report, run as run_checkpoint

    if not (Path(args.checkpoint) / "config.json").is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no checkpoint there (config.json missing)")
    if not advmoe.load_checkpoint(args.checkpoint).cfg.is_moe:
        parser.error(f"--checkpoint {args.checkpoint}: a dense model; give a MoE checkpoint")
    threads = args.threads or 1
    print(f"# advmoe {advmoe.__version__}, torch {torch.__version__}, {threads} thread(s), "
          f"{platform.processor() or platform.machine()}, {args.checkpoint}, {args.rounds} rounds\n", flush=True)
    try:
        changes = parse_pairs(args.changes, "--changes")
        result = run_checkpoint(args.checkpoint, tuple(args.batch_sizes), args.rounds, threads, changes)
    except ValueError as e:
        parser.error(str(e))
    print(f"inputs: {result['inputs']}\n")
    print("\n".join(report(result)))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
