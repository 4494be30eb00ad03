"""Sanity checks of a robustness evaluation: signs that the attacks, not the model, failed.

Each check returns {"name", "passed" (True, False, or None when it could not be computed),
"detail"}. A failed check does not change the numbers; it says which of them not to trust.
Thresholds are fixed here, before any result is seen, and written into eval.json.
"""
from __future__ import annotations

import math

from torch import Tensor

LARGE_EPS = 0.5  # linf in [0, 1] pixels: half the range; every class is reachable from any image
LARGE_EPS_MAX_ACCURACY = 0.05  # "about zero"
MARGIN = 0.01  # 1 percentage point, and at least one example (see `_allowance`)
ROUTER_GRADIENT_MIN = 1e-4  # relative change of the input gradient when the routers are detached
ROUTER_GRADIENT_SHARE = 0.5  # ... on at least this share of the examples

THRESHOLDS = {"large_eps": LARGE_EPS, "large_eps_max_accuracy": LARGE_EPS_MAX_ACCURACY, "margin": MARGIN,
              "router_gradient_min": ROUTER_GRADIENT_MIN, "router_gradient_share": ROUTER_GRADIENT_SHARE}


def _allowance(n: int) -> int:
    """Examples a check may miss by: MARGIN of them, at least one (noise of random starts)."""
    return max(1, math.floor(MARGIN * n))


def _counts(accuracy: list[float], n: int) -> list[int]:
    """Images correct: the allowance is whole images, and float32 accuracies are not exact."""
    return [round(a * n) for a in accuracy]


def _check(name: str, passed: bool | None, detail: str) -> dict:
    return {"name": name, "passed": passed, "detail": detail}


def eps_sweep(eps: list[float], accuracy: list[float], n: int, steps: int) -> dict:
    """Robust accuracy falls (within one allowance) as eps grows, and is about 0 at eps >= LARGE_EPS."""
    name = "accuracy falls as eps grows"
    if len(eps) < 2:
        return _check(name, None, "needs at least two eps values")
    correct = _counts(accuracy, n)
    rises = [f"{a:g} -> {b:g}: {100 * p:.1f} % -> {100 * q:.1f} %"
             for a, b, p, q, c, d in zip(eps, eps[1:], accuracy, accuracy[1:], correct, correct[1:])
             if d > c + _allowance(n)]
    large = [p for e, p in zip(eps, accuracy) if e >= LARGE_EPS]
    curve = ", ".join(f"{e:.4g}: {100 * p:.1f} %" for e, p in zip(eps, accuracy))
    detail = f"PGD-{steps} on {n} examples at eps {curve}"
    if rises:
        return _check(name, False, f"{detail}; accuracy rises with eps ({'; '.join(rises)})")
    if not large:
        return _check(name, None, f"{detail}; no eps >= {LARGE_EPS:g} in the sweep")
    if large[-1] > LARGE_EPS_MAX_ACCURACY:
        return _check(name, False, f"{detail}; still {100 * large[-1]:.1f} % at eps {max(eps):g}, "
                                   f"expected <= {100 * LARGE_EPS_MAX_ACCURACY:.0f} %")
    return _check(name, True, detail)


def more_steps(accuracy: dict[int, float], n: int) -> dict:
    """More PGD steps never leave the model more accurate (within one allowance)."""
    name = "more PGD steps never help the model"
    if len(accuracy) < 2:
        return _check(name, None, "needs PGD with at least two step counts")
    steps = sorted(accuracy)
    correct = dict(zip(steps, _counts([accuracy[k] for k in steps], n)))
    curve = ", ".join(f"PGD-{k}: {100 * accuracy[k]:.1f} %" for k in steps)
    bad = [f"PGD-{a} {100 * accuracy[a]:.1f} % < PGD-{b} {100 * accuracy[b]:.1f} %"
           for a, b in zip(steps, steps[1:]) if correct[b] > correct[a] + _allowance(n)]
    return _check(name, not bad, curve + (f"; more steps helped: {'; '.join(bad)}" if bad else ""))


def square_vs_white_box(square_correct: Tensor, white_box_correct: Tensor, square_accuracy: float,
                        white_box_accuracy: float) -> dict:
    """Gradient-free Square fools at most one allowance of examples that every white-box attack
    left correct; more is the signature of gradient masking."""
    name = "Square does not beat the white-box attacks"
    n = square_correct.numel()
    only = int((~square_correct & white_box_correct).sum())
    detail = (f"Square alone {100 * square_accuracy:.1f} %, white-box worst case {100 * white_box_accuracy:.1f} %; "
              f"{only} of {n} examples fooled by Square only (allowed: {_allowance(n)})")
    return _check(name, only <= _allowance(n), detail)


def router_gradient(relative_change: Tensor) -> dict:
    """The straight-through gate passes gradient to the input: detaching the routers changes the
    input gradient of most examples. A plain argmax router changes nothing (gradient masking)."""
    name = "the router passes gradient to the input"
    moved = (relative_change > ROUTER_GRADIENT_MIN).float().mean().item()
    detail = (f"input gradient changes by > {ROUTER_GRADIENT_MIN:g} (relative) when the routers are detached for "
              f"{100 * moved:.0f} % of {relative_change.numel()} examples (median {relative_change.median().item():.2g})")
    passed = moved >= ROUTER_GRADIENT_SHARE
    if not passed:
        detail += ("; attacks through the router cannot see a route change here (a plain-argmax or saturated "
                   "router): only the route-fixed and router attacks, which do not need that gradient, can")
    return _check(name, passed, detail)


def route_aware_vs_pgd(route_correct: Tensor, gradient_correct: Tensor) -> dict:
    """Attacks that fix or target the route fool at most one allowance of examples that the
    attacks through the straight-through router left correct."""
    name = "attacks through the router see what route attacks find"
    n = route_correct.numel()
    only = int((~route_correct & gradient_correct).sum())
    detail = f"{only} of {n} examples fooled by the route-fixed or router attack only (allowed: {_allowance(n)})"
    return _check(name, only <= _allowance(n), detail)


def verdict(checks: list[dict]) -> dict:
    failed = [c["name"] for c in checks if c["passed"] is False]
    masking = any(c["passed"] is False for c in checks
                  if c["name"] in ("Square does not beat the white-box attacks", "the router passes gradient to the input",
                                   "accuracy falls as eps grows", "attacks through the router see what route attacks find"))
    return {"passed": not failed, "failed": failed, "possible_gradient_masking": masking,
            "thresholds": THRESHOLDS, "checks": checks}
