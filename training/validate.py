"""Clean and PGD accuracy with expert usage, for checkpoint selection and the final metrics.

PGD accuracy through the straight-through router is an upper bound on robust accuracy, not the
robust accuracy of a hard-routed model (docs/evaluation.md): `advmoe eval` adds AutoAttack and
router-aware attacks. Here it only ranks the epochs of one run.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from advmoe.attacks import cross_entropy, pgd
from advmoe.gate import expert_share

from .config import TrainConfig


def validate(model: nn.Module, dataset: Dataset, cfg: TrainConfig, device: torch.device, batch_size: int = 256,
             seed: int = 0) -> dict:
    """Clean accuracy, PGD-k accuracy (k = cfg.eval_steps) and the share of samples each expert
    takes (over all MoE layers) on clean and on adversarial inputs."""
    model.eval()
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)  # the same random starts every epoch: comparable numbers
    correct = adv_correct = total = 0
    routes, adv_routes = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            correct += (model(x).argmax(1) == y).sum().item()
            routing = getattr(model, "last_routing", None)
        x_adv = pgd(model, x, cross_entropy(y), cfg.eps, cfg.eval_step, cfg.eval_steps)
        with torch.no_grad():
            adv_correct += (model(x_adv).argmax(1) == y).sum().item()
        if routing is not None and routing.numel():
            routes.append(routing.cpu())
            adv_routes.append(model.last_routing.cpu())
        total += len(y)
    torch.set_rng_state(generator_state)
    metrics = {"clean_accuracy": correct / total, "pgd_accuracy": adv_correct / total, "examples": total,
               "pgd": f"PGD-{cfg.eval_steps} linf eps={cfg.eps:.4g} step={cfg.eval_step:.4g} through the straight-through router"}
    if routes:
        n = model.cfg.num_experts
        clean, adv = torch.cat(routes), torch.cat(adv_routes)
        metrics["expert_share"] = expert_share(clean, n)
        metrics["expert_share_adversarial"] = expert_share(adv, n)
        metrics["route_flip_rate"] = (clean != adv).any(1).float().mean().item()
    return metrics
