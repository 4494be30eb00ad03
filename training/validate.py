"""Clean and PGD accuracy with expert usage, for checkpoint selection and the final metrics.

PGD accuracy through the straight-through router is an upper bound on robust accuracy, not the
robust accuracy of a hard-routed model (docs/evaluation.md): `advmoe eval` adds AutoAttack and
router-aware attacks. Here it only ranks the epochs of one run. For a MoE model the route-fixed
attack runs too, at the same steps: PGD on each forced route, judged on the real model. It needs
no gradient through the gate, so it sees what a surrogate gradient can hide; the worst case of the
two, per image, is what `select_on = "worst"` ranks the epochs by.

With `val_apgd_iterations` > 0, APGD-CE and then APGD-DLR (on the survivors) run too, through
pyautoattack: step sizes that adapt and a loss that ignores the logits' scale find what a fixed-step
PGD misses when the gradient is masked (a hard-routed model whose straight-through gradient points
the wrong way near a route boundary, or logits grown to flatten the cross-entropy). They join the
worst case. On Fashion-MNIST, AdvMoE runs whose validation PGD and route-fixed accuracy were 75-78 %
fell to 62 % under APGD on the test set; without this, selection could not see it.

With train_attack=True (the trainer's per-epoch call) the images are also attacked by the run's
own training attack (its steps, step and start, on the cross-entropy): accuracy far above the PGD
accuracy is the mark of catastrophic overfitting, a model that defeats its short training attack
and no other. It costs one more attack of `attack_steps` steps on the same images, beside the
`eval_steps` of PGD (and, for a MoE model, `eval_steps` per expert of the route-fixed attack).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pyautoattack.autopgd_base import APGDAttack

from advmoe.attacks import cross_entropy, pgd
from advmoe.gate import expert_share
from advmoe.route_attacks import route_fixed_pgd

from .config import TrainConfig


def pgd_description(steps: int, eps: float, step: float, norm: str = "linf") -> str:
    """How a PGD figure names its attack (validation's, and the model card's): one wording for both."""
    return f"PGD-{steps} {norm} eps={eps:.4g} step={step:.4g} through the straight-through router"


def validate(model: nn.Module, dataset: Dataset, cfg: TrainConfig, device: torch.device, batch_size: int = 256,
             seed: int = 0, train_attack: bool = False) -> dict:
    """Clean accuracy, PGD-k accuracy (k = cfg.eval_steps), route-fixed accuracy and the worst case
    of the two (a dense model has no route: its worst case is its PGD accuracy), and the share of
    samples each expert takes (over all MoE layers) on clean and on adversarial inputs; with
    train_attack, the accuracy under the training attack too (`train_attack_accuracy`)."""
    model.eval()
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)  # the same random starts every epoch: comparable numbers
    correct = adv_correct = fixed_correct = apgd_correct = worst_correct = train_attack_correct = total = 0
    routes, adv_routes = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            correct += (model(x).argmax(1) == y).sum().item()
            routing = getattr(model, "last_routing", None)
        x_adv = pgd(model, x, cross_entropy(y), cfg.eps, cfg.eval_step, cfg.eval_steps)
        with torch.no_grad():
            survives = model(x_adv).argmax(1) == y
        adv_correct += survives.sum().item()
        if train_attack:
            train_attack_correct += _training_attack_survivors(model, x, y, cfg).sum().item()
        if routing is not None and routing.numel():
            routes.append(routing.cpu())
            adv_routes.append(model.last_routing.cpu())
            fixed = _route_fixed_survivors(model, x, y, cfg)
            fixed_correct += fixed.sum().item()
            survives &= fixed
        if cfg.val_apgd_iterations:
            apgd_survives = _apgd_survivors(model, x, y, cfg)
            apgd_correct += apgd_survives.sum().item()
            survives &= apgd_survives
        worst_correct += survives.sum().item()
        total += len(y)
    torch.set_rng_state(generator_state)
    metrics = {"clean_accuracy": correct / total, "pgd_accuracy": adv_correct / total,
               "worst_accuracy": worst_correct / total, "examples": total,
               "pgd": pgd_description(cfg.eval_steps, cfg.eps, cfg.eval_step)}
    if cfg.val_apgd_iterations:
        metrics["apgd_accuracy"] = apgd_correct / total
    if train_attack:
        metrics["train_attack_accuracy"] = train_attack_correct / total
    if routes:
        metrics["route_fixed_accuracy"] = fixed_correct / total
        n = model.cfg.num_experts
        clean, adv = torch.cat(routes), torch.cat(adv_routes)
        metrics["expert_share"] = expert_share(clean, n)
        metrics["expert_share_adversarial"] = expert_share(adv, n)
        metrics["route_flip_rate"] = (clean != adv).any(1).float().mean().item()
    return metrics


def _route_fixed_survivors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Per image: whether the real model still gets it right after PGD on every forced route."""
    # Its own random state: the PGD numbers stay those of a validation without it.
    generator_state = torch.get_rng_state()
    survives = torch.ones_like(y, dtype=torch.bool)
    for expert in range(model.cfg.num_experts):
        x_adv = route_fixed_pgd(model, x, y, expert, cfg.eps, cfg.eval_step, cfg.eval_steps)
        with torch.no_grad():
            survives &= model(x_adv).argmax(1) == y
    torch.set_rng_state(generator_state)
    return survives


def _training_attack_survivors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Per image: whether the model still gets it right after the training attack's PGD (its
    steps, step and start) on the cross-entropy, through the straight-through router."""
    # Its own random state: the PGD and route-fixed numbers stay those of a validation without it.
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        x_adv = pgd(model, x, cross_entropy(y), cfg.eps, cfg.attack_step, cfg.attack_steps, start=cfg.attack_start)
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def _apgd_survivors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Per image: whether the model still gets it right after APGD-CE and, on what survives it,
    APGD-DLR (cfg.val_apgd_iterations iterations each, one restart, through the straight-through
    router; DLR needs three classes or more)."""
    survives = torch.ones_like(y, dtype=torch.bool)
    losses = ("ce", "dlr") if model(x[:1]).shape[1] >= 3 else ("ce",)
    # pyautoattack seeds the global generator: the other numbers stay those of a validation without it
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        for loss in losses:
            idx = survives.nonzero().squeeze(1)
            if not len(idx):
                break
            attack = APGDAttack(model, n_iter=cfg.val_apgd_iterations, norm="Linf", eps=cfg.eps, loss=loss,
                                seed=0, device=x.device)
            x_adv = attack.perturb(x[idx], y[idx])
            with torch.no_grad():
                survives[idx] = model(x_adv).argmax(1) == y[idx]
    return survives
