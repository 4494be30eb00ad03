"""Wall-clock of one training step of each method, side by side, on the fmnist-tiny setting.

    python -m benchmarks.bench_methods            # or: advmoe bench methods --width 0.25

Every method trains its own copy of the same model on the same batches; the steps are timed in
interleaved rounds (median), so machine noise hits all methods alike. Printed: ms per batch,
samples per second, PGD steps per batch, the cost relative to MoE-AT, and the projected
seconds per epoch of the preset. The methods that re-craft their attack for the router step
(AdvMoE, route-aware) are timed with --no-recraft too, which reuses the expert step's
adversarial examples. The routers start balanced on the batch (half of it per expert), as a
trained router splits its inputs; the last step's split is printed. Under a gate gradient that
needs no unchosen expert (`--gate-grad chosen`, the reference code's, or `none`), the masked path
runs only the chosen experts, and so does it, under any gate gradient, for the part of
route-aware training's attack that forces the route: those methods are timed again computing
every expert, and the speed-up is printed beside it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import advmoe
from advmoe.calibrate import balance_routing
from advmoe.device import synchronizer, unavailable
from advmoe.gate import GATE_GRADS, expert_share
from training.config import resolve
from training.methods import METHODS, Step
from training.trainer import make_optimizers


VARIANTS = [(name, {}) for name in METHODS] + [(name, {"recraft": False}) for name, m in METHODS.items() if m.recrafts]
EVERY_EXPERT = " (every expert)"


def run(preset: str = "fmnist-tiny", batch_size: int | None = None, rounds: int = 5, width: float | None = None,
        methods: list[str] | None = None, device: str = "cpu", gate_grad: str | None = None):
    """methods: time these only (MoE-AT, the reference of the relative cost, always).
    gate_grad: the straight-through gradient to train along (default: the preset's)."""
    device = torch.device(device)
    size = {"width": width, "gate_grad": gate_grad}
    base = resolve(preset, **size)
    batch_size = batch_size or base.batch_size
    info = advmoe.get_dataset_info(base.dataset)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, info.in_channels, info.image_size, info.image_size, generator=g).to(device)
    y = torch.randint(0, info.num_classes, (batch_size,), generator=g).to(device)
    steps = {}
    for method, changes in VARIANTS:
        if methods and method not in {*methods, "moe-at"}:
            continue
        cfg = resolve(preset, method=method, **changes, **size)
        model = _model(cfg, info, device, x)
        steps[_label(method, changes)] = (Step(model, cfg, make_optimizers(cfg, model)), cfg)
        skips = model.can_skip_unchosen or (cfg.is_moe and METHODS[method].forces_routes)
        if skips and not changes:  # the same method computing every expert, beside it
            model = _model(cfg, info, device, x, skip_unchosen=False)
            steps[_label(method, changes) + EVERY_EXPERT] = (Step(model, cfg, make_optimizers(cfg, model)), cfg)
    samples = {label: [] for label in steps}
    for label, (step, cfg) in steps.items():
        METHODS[cfg.method].step(step, x, y)  # warm-up
    synchronize = synchronizer(device)
    for _ in range(rounds):
        for label, (step, cfg) in steps.items():
            synchronize()
            start = time.perf_counter()
            METHODS[cfg.method].step(step, x, y)
            synchronize()
            samples[label].append((time.perf_counter() - start) * 1e3)
    ms = {label: statistics.median(s) for label, s in samples.items()}
    batches = -(-(base.train_examples or 50_000) // batch_size)
    rows = []
    for label, (step, cfg) in steps.items():
        rows.append(dict(method=label, ms_per_batch=ms[label], samples_per_second=batch_size * 1e3 / ms[label],
                         attack_steps=METHODS[cfg.method].attack_steps(cfg),
                         optimisers=len(METHODS[cfg.method].groups), relative_to_moe_at=ms[label] / ms["moe-at"],
                         projected_epoch_seconds=ms[label] * batches / 1e3,
                         speedup_over_every_expert=(ms[label + EVERY_EXPERT] / ms[label]
                                                    if label + EVERY_EXPERT in ms else None),
                         busiest_expert=_busiest_expert(step.model)))
    return rows, base, batch_size, batches


def _model(cfg, info, device: torch.device, x: torch.Tensor, skip_unchosen: bool = True):
    """The method's copy of the model, the same initial weights for every method."""
    torch.manual_seed(0)
    model = advmoe.create_model(cfg.model, **cfg.model_kwargs(info)).to(device)
    if cfg.is_moe:  # a fresh router sends noise to one expert; a trained one splits its inputs
        with torch.no_grad():
            balance_routing(model.eval(), x)
    model.train().skip_unchosen = skip_unchosen
    return model


def _busiest_expert(model) -> float | None:
    """Share of the last step's routes that took the most used expert: what skipping the
    unchosen experts saves depends on how the batch splits."""
    if model.last_routing is None or model.last_routing.numel() == 0:
        return None
    return max(expert_share(model.last_routing, model.cfg.num_experts))


def _label(method: str, changes: dict) -> str:
    return method + ("".join(f" --no-{k}" for k, v in changes.items() if v is False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advmoe bench methods", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="fmnist-tiny")
    parser.add_argument("--batch-size", type=int, help="default: the preset's")
    parser.add_argument("--width", type=float, help="model width multiplier (default: the preset's)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="time these only (and MoE-AT)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median taken)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--gate-grad", choices=list(GATE_GRADS), help="the straight-through gradient to train along "
                        "(default: the preset's); chosen and none let the masked path skip the unchosen experts")
    args = parser.parse_args(argv)
    if args.rounds < 1 or (args.batch_size is not None and args.batch_size < 1) or (args.width is not None and args.width <= 0):
        parser.error("--rounds, --batch-size and --width must be positive")
    if problem := unavailable(args.device):
        parser.error(problem)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, cfg, batch_size, batches = run(args.preset, args.batch_size, args.rounds, args.width, args.methods, args.device,
                                         args.gate_grad)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"# advmoe {advmoe.__version__}, torch {torch.__version__}, {where}; preset "
          f"{args.preset}: {cfg.model} width {cfg.width}, {cfg.dataset}, batch {batch_size}, {batches} batches per "
          f"epoch, PGD-{cfg.attack_steps} for training, gate gradient {cfg.gate_grad}; {args.rounds} rounds\n")
    print("| method | ms per batch | samples/s | PGD steps per batch | optimisers | relative to MoE-AT | projected s per epoch "
          "| speed-up over every expert | busiest expert |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = f"{r['speedup_over_every_expert']:.2f}x" if r["speedup_over_every_expert"] else "-"
        print(f"| {r['method']} | {r['ms_per_batch']:.0f} | {r['samples_per_second']:.0f} | {r['attack_steps']} | {r['optimisers']} "
              f"| {r['relative_to_moe_at']:.2f}x | {r['projected_epoch_seconds']:.0f} | {speedup} | "
              f"{'-' if r['busiest_expert'] is None else format(r['busiest_expert'], '.0%')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
