"""advmoe: robust Mixture-of-Experts CNNs (AdvMoE) with a real sparse execution path.

The public names are imported on first use (PEP 562), so that `import advmoe.card` (the HTTP
client, the service's API worker) does not import torch.
"""
from __future__ import annotations

import importlib

from ._version import __version__

_EXPORTS = {
    "checkpoint": ("CheckpointError", "load_checkpoint", "save_checkpoint"),
    "gate": ("Route", "route"),
    "layers": ("ConvNorm2d", "LayerGate", "MoEConv2d"),
    "macs": ("count_macs",),
    "models": ("ModelConfig", "MoENet", "set_execution", "set_gate_grad"),
    "registry": ("create_model", "dense_twin", "is_moe_model", "list_models", "register_model"),
    "data": ("DatasetNotFoundError", "get_dataset_info", "list_datasets", "load_dataset"),
    "card": ("ModelCard",),
    "settings": ("ConfigError",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["__version__", *_MODULE_OF]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
