"""What a study's work costs before it runs: the attack-cost model (passes of the model per attacked
image of each attack) and timings of one pass and one training step on this machine. The frontier's
--plan and the robustness report's CIFAR-10 estimate both count with it."""
from __future__ import annotations

import time

import torch

import advmoe
from advmoe.device import synchronizer
from training.config import TrainConfig
from training.methods import METHODS, Step
from training.trainer import make_optimizers

PGD_STEPS = (10, 50)
ROUTE_STEPS = 50
APGD_ITERATIONS = 100
TARGET_CLASSES = 9  # APGD-T and FAB-T run once per other class (10 classes)

# (forward + input-gradient passes, forward-only passes) per attacked image of each attack at the
# study's settings. APGD: a gradient per iteration; FAB-T: a gradient and a prediction per iteration;
# Square: one query (a forward) per iteration, all 5,000 on an image it never fools; the route-fixed
# attack runs PGD-50 on each of the two routes.
PASSES = {"pgd-10": (10, 0), "pgd-50": (50, 0),
          "apgd-ce": (APGD_ITERATIONS, 0), "apgd-t": (TARGET_CLASSES * APGD_ITERATIONS, 0),
          "fab-t": (TARGET_CLASSES * APGD_ITERATIONS, TARGET_CLASSES * APGD_ITERATIONS), "square": (0, 5000),
          "route-fixed": (2 * ROUTE_STEPS, 0), "router": (ROUTE_STEPS, 0)}
ROUTE_ATTACKS = ("route-fixed", "router")
FORWARD_SHARE = 0.5  # a forward costs about half a forward + input-gradient pass
# The share of the images each attack runs on, on Fashion-MNIST at ε = 0.1: APGD-T on APGD-CE's
# survivors, FAB-T on the clean-correct images, Square's full budget on the robust ones only.
SURVIVE, CLEAN = 0.6, 0.85
ATTACKED = {"apgd-t": SURVIVE, "fab-t": CLEAN, "square": SURVIVE}
SANITY_SWEEP = 5 * 10 * 200 / 1000  # the ε sweep: 5 budgets x PGD-10 on 200 of 1,000 images


def gradient_passes(attacks: tuple[str, ...], attacked: dict[str, float] = ATTACKED) -> float:
    """Gradient-pass equivalents per evaluated image of `attacks` (names of PASSES), each on its share
    of the images."""
    return sum(attacked.get(a, 1.0) * (PASSES[a][0] + FORWARD_SHARE * PASSES[a][1]) for a in attacks)


def fastest(run, repeats: int = 3, device: torch.device = torch.device("cpu"), clock=time.perf_counter) -> float:
    """Seconds of the fastest of `repeats` calls of run(): the one other work on the machine
    slowed least (timeit's rule); the first call, a warm-up, is not timed. clock: wall time, or
    time.process_time for the CPU time a core of its own would take."""
    synchronize = synchronizer(device)
    run()
    times = []
    for _ in range(repeats):
        synchronize()
        start = clock()
        run()
        synchronize()
        times.append(clock() - start)
    return min(times)


def step_seconds(cfg: TrainConfig) -> float:
    """Seconds of one training step of cfg's method on random data, on cfg's device."""
    info, device = advmoe.get_dataset_info(cfg.dataset), torch.device(cfg.device)
    torch.manual_seed(0)
    model = advmoe.create_model(cfg.model, **cfg.model_kwargs(info)).to(device).train()
    step = Step(model, cfg, make_optimizers(cfg, model))
    x = torch.rand(cfg.batch_size, info.in_channels, info.image_size, info.image_size, device=device)
    y = torch.randint(0, info.num_classes, (cfg.batch_size,), device=device)
    return fastest(lambda: METHODS[cfg.method].step(step, x, y), device=device)


def pass_seconds(cfg: TrainConfig, batch: int = 64) -> float:
    """Seconds per image of a forward and input-gradient pass (masked execution), on cfg's device."""
    info, device = advmoe.get_dataset_info(cfg.dataset), torch.device(cfg.device)
    model = advmoe.create_model(cfg.model, **cfg.model_kwargs(info)).to(device).eval().requires_grad_(False)
    x = torch.rand(batch, info.in_channels, info.image_size, info.image_size, device=device, requires_grad=True)
    return fastest(lambda: torch.autograd.grad(model(x).sum(), x), device=device) / batch
