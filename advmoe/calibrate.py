"""Put an untrained model into a realistic inference state, for tests and benchmarks.

A freshly initialised model has BatchNorm statistics of (0, 1), which makes eval-mode
activations explode, and a random router often sends every sample to one expert. Neither
says anything about how a trained model runs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import LayerGate
from .registry import create_model
from .routers import ResNetRouter


def routers(model: nn.Module) -> list[nn.Module]:
    """The routing networks of a model in module order: the shared router or each layer's gate."""
    return [m for m in model.modules() if isinstance(m, (ResNetRouter, LayerGate))]


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: Tensor, steps: int = 3) -> nn.Module:
    """Set BatchNorm running statistics to the batch statistics of `x`; leaves the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration passes
    model.train()
    for _ in range(steps):
        model(x)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


@torch.no_grad()
def balance_routing(model: nn.Module, x: Tensor, share: float = 0.5) -> nn.Module:
    """Shift each router's expert biases so that the batch `x` is spread over the experts,
    as a trained, load-balanced router would. Routers are balanced in order, since a
    per-layer gate sees the output of the layers routed before it. With two experts, `share`
    of the batch goes to expert 0 (the samples that lean to it most); benchmarks use it for
    uneven loads. With more experts only an even spread is offered."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    for router in routers(model):
        seen = []
        handle = router.register_forward_hook(lambda module, args, out: seen.append(out))
        model(x)
        handle.remove()
        logits = torch.cat(seen)
        if logits.shape[1] == 2:
            # Expert 0 takes the samples whose margin (logit 1 - logit 0) is smallest; the cut
            # lies halfway between two margins, so no sample sits exactly on the tie.
            margin = (logits[:, 1] - logits[:, 0]).sort().values
            n, k = margin.numel(), int(share * margin.numel())
            if k == 0:
                cut = margin[0] - 1e4
            elif k == n:
                cut = margin[-1] + 1e4
            else:
                cut = (margin[max(k - 1, 0)] + margin[k]) / 2
            router.fc.bias[1] -= cut
        elif share != 0.5:
            raise ValueError(f"an uneven share needs two experts; this router has {logits.shape[1]}")
        else:
            router.fc.bias -= logits.median(0).values
    return model


def untrained(architecture: str, x: Tensor, seed: int = 0, **kwargs) -> nn.Module:
    """A fresh model of `architecture` (create_model's kwargs) in the state a trained one runs in:
    BatchNorm calibrated on `x` and, for a MoE model, its routers balanced to split `x` evenly, as a
    trained router that uses its experts does; in eval mode. What benchmarks time when the model
    they need was never trained."""
    torch.manual_seed(seed)
    model = calibrate_batchnorm(create_model(architecture, **kwargs), x)
    if routers(model):
        balance_routing(model, x)
    return model.eval()


@torch.no_grad()
def force_routing(model: nn.Module, expert: int) -> nn.Module:
    """Make every router send every sample to `expert` (zero weights, one-hot bias)."""
    for router in routers(model):
        if not 0 <= expert < router.fc.out_features:
            raise ValueError(f"expert {expert} out of range for {router.fc.out_features} experts")
        router.fc.weight.zero_()
        router.fc.bias.fill_(-10.0)
        router.fc.bias[expert] = 10.0
    return model
