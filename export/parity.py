"""Parity of exported artefacts with eager sparse execution, checked before anything is kept."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from advmoe import MoENet

Runner = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray | None]]
ATOL = 1e-4


class ParityError(RuntimeError):
    """An exported graph computes something else than the eager model; says what and by how much."""


def parity_batches(model: MoENet, seed: int = 0) -> dict[str, torch.Tensor]:
    """Batches of 1, 3 and 64, and (MoE) a batch in which one expert receives no sample at the
    first MoE layer, so the graph's empty-group path is exercised."""
    cfg = model.cfg
    pool = torch.rand(256, cfg.in_channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))
    batches = {"batch of 1": pool[:1], "batch of 3": pool[1:4], "batch of 64": pool[4:68]}
    if cfg.is_moe:
        with torch.no_grad():
            _, routing = model.forward_with_routing(pool)
        first = routing[:, 0]
        busiest = int(first.bincount(minlength=cfg.num_experts).argmax())
        batches[f"batch of 8 where only expert {busiest} is used at the first MoE layer"] = pool[first == busiest][:8]
    return batches


def check_parity(name: str, reference: Runner, candidate: Runner, batches: dict[str, torch.Tensor],
                 atol: float = ATOL) -> dict[str, float]:
    """Max |logits difference| per batch; ParityError on a routing mismatch, a difference over
    atol, or a candidate that fails to run."""
    report = {}
    for label, x in batches.items():
        ref_logits, ref_routing = reference(x)
        try:
            logits, routing = candidate(x)
        except Exception as e:  # e.g. a compiled package that refuses a batch size
            message = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ParityError(f"{name}: the exported model fails on the {label}: {message}") from e
        if ref_routing is not None:
            if routing is None or routing.shape != ref_routing.shape:
                raise ParityError(f"{name}: routing output missing or of shape "
                                  f"{None if routing is None else routing.shape} vs {ref_routing.shape} on the {label}")
            flipped = (routing != ref_routing).any(1)
            if flipped.any():
                raise ParityError(f"{name}: routing differs from eager sparse for {int(flipped.sum())} of "
                                  f"{len(flipped)} samples on the {label}")
        if logits.shape != ref_logits.shape:
            raise ParityError(f"{name}: logits of shape {logits.shape} vs {ref_logits.shape} on the {label}")
        diff = float(np.abs(logits - ref_logits).max()) if logits.size else 0.0
        if not diff <= atol:
            raise ParityError(f"{name}: logits differ from eager sparse by {diff:.2e} (> {atol:.0e}) on the {label}")
        report[label] = diff
    return report
