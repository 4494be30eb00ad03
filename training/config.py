"""The resolved configuration of a training run: a preset, a TOML file, then flags, in that order."""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import advmoe
from advmoe.attacks import check_eps

PRESETS = Path(__file__).parent / "presets"
METHODS = ("standard", "pgd-at", "trades", "moe-at", "router-only", "advmoe")
MOE_ONLY = ("moe-at", "router-only", "advmoe")
ROUTER_LOSSES = ("model", "reference")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and what to change."""


@dataclass
class TrainConfig:
    # data
    dataset: str = "cifar10"
    data_dir: str | None = None
    val_size: int = 5000  # carved from the official training set; selection never sees the test set
    train_examples: int | None = None  # use only the first N training examples (small runs)
    val_examples: int = 1000  # validation examples evaluated each epoch (clean and PGD)
    # model
    model: str = "moe_resnet18"
    width: float = 1.0
    num_experts: int = 2
    expert_ratio: float = 0.5
    router: str = "shared"
    router_blocks: int = 3
    router_width: int = 16
    top_k: int = 1
    # method (ADVMOE.md; reference hyper-parameters as defaults)
    method: str = "advmoe"
    router_loss: str = "reference"  # "model" collapsed to one expert on fmnist-tiny (reports/fmnist_methods.md)
    beta: float = 6.0  # weight of the KL (TRADES) term
    alpha: float = 6.0  # weight of the reference router loss's CE(router(x), y mod N)
    balance_weight: float = 0.0  # optional load-balancing term on the router scores
    recraft: bool = True  # AdvMoE: craft new adversarial examples for the router step
    # attack, in pixel units of [0, 1] inputs
    eps: float = 8 / 255
    attack_step: float = 5 / 255
    attack_steps: int = 2
    eval_step: float = 2 / 255
    eval_steps: int = 10
    # optimisation
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    router_lr: float | None = None  # default: lr
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    # hardware
    device: str = "cpu"
    amp: str = "none"  # "bf16" or "fp16" autocast (CUDA)
    channels_last: bool = False
    compile: bool = False
    workers: int = 0

    @property
    def is_moe(self) -> bool:
        return advmoe.is_moe_model(self.model)

    def model_kwargs(self, info) -> dict:
        kwargs = dict(num_classes=info.num_classes, in_channels=info.in_channels, image_size=info.image_size,
                      mean=info.mean, std=info.std, width=self.width)
        if self.is_moe:
            kwargs.update(num_experts=self.num_experts, expert_ratio=self.expert_ratio, router=self.router,
                          router_blocks=self.router_blocks, router_width=self.router_width, top_k=self.top_k)
        return kwargs

    def validate(self) -> "TrainConfig":
        def bad(msg: str):
            raise ConfigError(msg)

        if self.method not in METHODS:
            bad(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.model not in advmoe.list_models():
            bad(f"unknown model {self.model!r}; choose one of {', '.join(advmoe.list_models())}")
        if self.dataset not in advmoe.list_datasets():
            bad(f"unknown dataset {self.dataset!r}; choose one of {', '.join(advmoe.list_datasets())}")
        if self.method in MOE_ONLY and not self.is_moe:
            bad(f"method {self.method} trains a mixture of experts; use a moe_* model (e.g. moe_{self.model})")
        if self.router_loss not in ROUTER_LOSSES:
            bad(f"router_loss must be one of {ROUTER_LOSSES}, got {self.router_loss!r}")
        try:
            check_eps(self.eps)
        except ValueError as e:
            bad(str(e))
        if not 0 < self.attack_step <= 1 or not 0 < self.eval_step <= 1:
            bad("attack_step and eval_step are in pixel units and must be in (0, 1]")
        for name in ("epochs", "batch_size", "val_examples"):
            if getattr(self, name) < 1:
                bad(f"{name}={getattr(self, name)} must be >= 1")
        if self.attack_steps < 1 or self.eval_steps < 1:
            bad("attack_steps and eval_steps must be >= 1")
        if self.amp not in ("none", "bf16", "fp16"):
            bad(f"amp must be none, bf16 or fp16, got {self.amp!r}")
        if self.lr <= 0:
            bad(f"lr={self.lr} must be positive")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {unknown}; known: {', '.join(field_names())}")
    return values


def resolve(preset: str | None = None, config_file: str | Path | None = None, **overrides) -> TrainConfig:
    """Preset, then the TOML file, then the overrides (None values are ignored)."""
    values = {}
    if preset is not None:
        if preset not in list_presets():
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(list_presets())}")
        values.update(read_toml(PRESETS / f"{preset}.toml"))
    if config_file is not None:
        values.update(read_toml(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}")
    return replace(TrainConfig(), **values).validate()
