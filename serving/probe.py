"""A bounded attack for /attack_probe: FGSM or PGD (L-inf) through the straight-through router
of the eager model, stopped at a deadline. The probe worker computes the perturbation; the API
then scores clean and adversarial inputs on the served runtime, so a flip is a flip of what
users get."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from advmoe.attacks import pgd


@dataclass
class ProbeResult:
    adversarial: torch.Tensor
    steps_run: int
    time_capped: bool


class _Deadline(Exception):
    pass


def bounded_attack(model, x: torch.Tensor, y: torch.Tensor, attack: str, eps: float, steps: int,
                   step_size: float | None, timeout_s: float) -> ProbeResult:
    """FGSM is one step of size eps from x; PGD starts at a random point of the eps-ball and takes
    `steps` steps (default step 2.5 eps / steps, Madry et al.). At the deadline the attack returns
    the last projected iterate it has, with `time_capped` set."""
    if attack == "fgsm":
        steps, step_size, random_start = 1, eps, False
    else:
        step_size, random_start = step_size or 2.5 * eps / steps, True
    deadline = time.monotonic() + timeout_s
    last = {"x": x, "steps": 0}

    def objective(model, x_adv):
        # pgd calls this once per step with the current (projected, clamped) iterate.
        last["x"] = x_adv.detach()
        if time.monotonic() > deadline:
            raise _Deadline
        last["steps"] += 1
        return F.cross_entropy(model(x_adv), y)

    try:
        adversarial = pgd(model, x, objective, eps, step_size, steps, random_start=random_start)
    except _Deadline:
        return ProbeResult(last["x"], last["steps"], True)  # the iterate after `steps` updates
    return ProbeResult(adversarial, steps, False)
