"""The model registry: `create_model(name, **config)` and `list_models()`, as in timm."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from .models.base import ModelConfig, MoENet
from .models.densenet import DenseNet, DenseNetConfig
from .models.resnet import ResNet, ResNetConfig
from .models.vgg import VGG, VGGConfig
from .models.wrn import WideResNet, WideResNetConfig

# The reference MoE setting (docs/method.md): 2 experts at half width, one shared router.
MOE_DEFAULTS = dict(num_experts=2, expert_ratio=0.5, router="shared")


@dataclass(frozen=True)
class ModelEntry:
    model_class: type[MoENet]
    config_class: type[ModelConfig]
    defaults: dict = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.defaults.get("num_experts", 0) > 0


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, model_class: type[MoENet], config_class: type[ModelConfig], **defaults) -> None:
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = ModelEntry(model_class, config_class, defaults)


def list_models(pattern: str = "*", moe: bool | None = None) -> list[str]:
    """Registered model names matching a glob pattern; moe=True/False keeps MoE/dense only."""
    return sorted(n for n, e in _MODELS.items() if fnmatch.fnmatch(n, pattern) and moe in (None, e.is_moe))


def is_moe_model(name: str) -> bool:
    return _entry(name).is_moe


def dense_twin(name: str) -> str:
    """The dense model a MoE model is compared with: `moe_resnet18` -> `resnet18`."""
    return name.removeprefix("moe_") if _entry(name).is_moe else name


def create_model(name: str, **config) -> MoENet:
    """Build a registered model. Keyword arguments override fields of its config dataclass
    (num_classes, in_channels, image_size, width, num_experts, expert_ratio, router, ...)."""
    entry = _entry(name)
    accepted = entry.config_class.field_names()
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise TypeError(f"{name} got unknown argument(s) {unknown}; it accepts {accepted}")
    if not entry.is_moe and config.get("num_experts", 0):
        raise ValueError(f"{name} is a dense model; use moe_{name} for a mixture of experts")
    values = {**entry.defaults, **config}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}  # from JSON
    model = entry.model_class(entry.config_class(**values))
    model.model_name = name
    return model


def _entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name]


for _arch, _cls, _cfg in (
    ("resnet18", ResNet, ResNetConfig),
    ("wrn28_10", WideResNet, WideResNetConfig),
    ("vgg16", VGG, VGGConfig),
    ("densenet40", DenseNet, DenseNetConfig),
):
    register_model(_arch, _cls, _cfg)
    register_model(f"moe_{_arch}", _cls, _cfg, **MOE_DEFAULTS)
