"""Devices as the commands take them ("cpu", "cuda", "cuda:1"): whether one can be used here,
and how to wait for its work before reading a clock."""
from __future__ import annotations

from collections.abc import Callable

import torch


def unavailable(device: str | torch.device) -> str | None:
    """Why `device` cannot be used on this machine, as a message for --device; None if it can."""
    try:
        device = torch.device(device)
    except RuntimeError as e:
        return f"--device {str(device)!r}: {e}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: no CUDA device is available here; use --device cpu"
    return None


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """What waits for `device`'s queued work: GPU work is asynchronous, so a clock read without it
    times the launch, not the work."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
