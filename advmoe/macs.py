"""Multiply-accumulates per image: counted analytically from the layers' geometry, and
measured from the operations that actually run (torch's FLOP counter), to check each other.

Convention: conv and linear layers only (BatchNorm folds into the convs at inference; ReLU,
pooling and additions are not counted), as fvcore and ptflops do.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models.base import MoENet


def count_macs(model: MoENet, input_shape: tuple[int, int, int]) -> int:
    """Analytic MACs per image of the path sparse execution runs, router included; for a
    dense model, the dense count. input_shape is (C, H, W)."""
    channels, h, w = input_shape
    if channels != model.cfg.in_channels:
        raise ValueError(f"input_shape has {channels} channels; the model takes {model.cfg.in_channels}")
    return model.macs(h, w)


@torch.no_grad()
def measure_macs(model: nn.Module, x: torch.Tensor) -> float:
    """MACs per image of one forward pass on the batch x, counted from the aten ops run."""
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]
