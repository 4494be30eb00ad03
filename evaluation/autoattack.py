"""AutoAttack (Croce & Hein, ICML 2020), standard version, through the `pyautoattack` package.

pyautoattack 0.2.0 is fra31/auto-attack packaged for PyPI (MIT; its APGD, FAB and Square code
is upstream's). Its standard version runs APGD-CE, APGD-T (9 target classes), FAB-T (9 targets)
and Square (5,000 queries), each on the examples that survived the ones before. Here each
attack is run on its own (`run`), so the caller can record what each one adds and can share
one Square run between AutoAttack and the gradient-free cross-check: an example is robust to
AutoAttack when none of the four fools it, which is what the cascade computes.

The package reports its own checks (randomised or dynamic defence, zero gradients, Square
beating the gradient attacks) through the logger "auto-attack"; `run` returns those messages
instead of letting them reach stderr.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")


def make(model: nn.Module, eps: float, num_classes: int, seed: int = 0, square_queries: int = 5000,
         iterations: int = 100):
    """An AutoAttack in its standard linf configuration (fewer target classes if the model has
    fewer than 10 classes; `square_queries` below 5,000 or `iterations` of APGD and FAB other than
    100 are no longer the standard version)."""
    from pyautoattack import AutoAttack

    device = next(model.parameters()).device
    attack = AutoAttack(model, eps=eps, norm="Linf", seed=seed, version="standard", device=device)
    targets = min(9, num_classes - 1)
    attack.apgd_targeted.n_target_classes = targets
    attack.fab.n_target_classes = targets
    attack.square.n_queries = square_queries
    if iterations != 100:
        for part in (attack.apgd, attack.apgd_targeted, attack.fab):
            part.n_iter = iterations
        for apgd in (attack.apgd, attack.apgd_targeted):  # APGD's step-size checkpoints, as its __init__ sets them
            apgd.n_iter_orig = iterations
            apgd.n_iter_2 = max(int(0.22 * iterations), 1)
            apgd.n_iter_min = max(int(0.06 * iterations), 1)
            apgd.size_decr = max(int(0.03 * iterations), 1)
    return attack


def run(attack, name: str, x: Tensor, y: Tensor, batch_size: int) -> tuple[Tensor, list[str]]:
    """Adversarial examples of one AutoAttack component for every example (the input itself
    where the attack did not succeed or the example was misclassified already), and the
    warnings the package logged."""
    if name not in STANDARD:
        raise ValueError(f"unknown AutoAttack component {name!r}; choose from {', '.join(STANDARD)}")
    attack.attacks_to_run = [name]
    with _captured(attack.logger) as messages:
        x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=batch_size)
    return x_adv.detach(), messages


@contextmanager
def _captured(logger: logging.Logger) -> Iterator[list[str]]:
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


class GradientOrFast(nn.Module):
    """Runs `masked` when autograd records (gradient attacks: the straight-through gate) and
    `fast` otherwise (queries and predictions: the sparse path, same outputs to 1e-5)."""

    def __init__(self, masked: nn.Module, fast: nn.Module):
        super().__init__()
        self.masked, self.fast = masked, fast

    def forward(self, x: Tensor) -> Tensor:
        return self.masked(x) if torch.is_grad_enabled() else self.fast(x)
