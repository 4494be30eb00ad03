"""The resolved configuration of a training run: a preset, a TOML file, then flags, in that order."""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import advmoe
from advmoe.attacks import STARTS, check_eps
from advmoe.data import AUGMENTATIONS, FOLDER, FOLDER_IMAGE_SIZE, MIN_IMAGE_SIZE, PER_IMAGE
from advmoe.gate import GATE_GRADS
from advmoe.image_folder import BAD_IMAGES
from advmoe.models.base import STEMS
from advmoe.routers import ROUTERS
from advmoe.settings import ConfigError, setting, validate_choices

from .methods import ALTERNATING, METHODS

PRESETS = Path(__file__).parent / "presets"
ROUTER_LOSSES = {
    "reference": "the reference code's: alpha * CE(router(x), y mod N) + beta * KL(router(x') || router(x)); "
                 "a shared router runs alone",
    "model": "the paper's bi-level view: the whole model's TRADES loss, through the straight-through gate "
             "(backbone BatchNorm statistics kept)",
}
EXPERT_LOSSES = {
    "trades": "CE(f(x), y) + beta * KL(f(x) || f(x')), the attack maximising the KL (the reference code's)",
    "ce": "Madry's CE(f(x'), y), the attack maximising it (PGD-AT's loss)",
}
AMP = {"none": "fp32", "bf16": "bfloat16 autocast", "fp16": "float16 autocast with a gradient scaler (CUDA)"}
SELECT_ON = {"pgd": "PGD through the straight-through router",
             "worst": "the worst case of PGD, the route-fixed attack and APGD (when run), per image"}
# Validation accuracy (what select_on ranks) this far under its best while training goes on: the
# training attack has stopped finding adversarial examples (catastrophic overfitting; MoE-AT's
# 2-step TRADES attack on Fashion-MNIST fell from 62.9 to 32.0 %, reports/frontier_notebook.md).
OVERFIT_DROP = 0.10
MAX_ROLLBACKS = 2  # per run, so that a run that keeps collapsing still ends
COLLAPSE_GUARDS = {
    "rollback": f"when the validation accuracy select_on ranks falls over {OVERFIT_DROP * 100:.0f} points under its best, go "
                "back to the best epoch (weights, optimiser, schedule) and train on with one more, shorter training-attack "
                f"step (at most {MAX_ROLLBACKS} times per run)",
    "off": "only warn",
}
AUGMENT = {"standard": "the dataset's usual one, recorded as what it resolves to (CIFAR-10/100, Tiny ImageNet, "
                       "Fashion-MNIST: crop-flip; SVHN: crop; your own images: resized-crop-flip)", **AUGMENTATIONS}


def _method_choices() -> dict[str, str]:
    return {name: m.help for name, m in METHODS.items()}


@dataclass
class TrainConfig:
    # data
    dataset: str = setting("cifar10", "dataset, read from local files", choices=advmoe.list_datasets)
    data_dir: str | None = setting(None, "folder holding the dataset's files (Fashion-MNIST: the Debian package's "
                                         "folder by default)")
    val_size: int = setting(5000, "validation images carved from the training set; selection never sees the test set")
    train_examples: int | None = setting(None, "use only the first N training images (small runs)")
    val_examples: int = setting(1000, "validation images evaluated after each epoch (clean and PGD)")
    image_size: int | None = setting(None, "pixels per side the model takes: the folder data set's images are resized to "
                                           f"it ({FOLDER_IMAGE_SIZE} by default); a named data set keeps its own")
    bad_images: str = setting("error", "the folder data set: what an image that cannot be opened or decoded does",
                              choices=BAD_IMAGES)
    augment: str = setting("standard", "training-image augmentation, drawn per image and per epoch from the seed "
                                       "(validation and test images are never augmented)", choices=AUGMENT)
    # model
    model: str = setting("moe_resnet18", "architecture from the registry (`advmoe models`)", choices=advmoe.list_models)
    width: float = setting(1.0, "width multiplier of every stage (1.0: the paper's widths)")
    stem: str = setting("auto", "the network's first layers", choices=STEMS)
    num_experts: int = setting(2, "experts per MoE layer (N)")
    expert_ratio: float = setting(0.5, "width of an expert as a fraction of the dense layer (r)")
    router: str = setting("shared", "who decides the route", choices=ROUTERS)
    router_blocks: int = setting(3, "basic blocks per stage of the shared router CNN (3: a ResNet-20)")
    router_width: int = setting(16, "channels of the shared router's first stage")
    router_stride: int = setting(1, "stride of the shared router's first conv (2: the router runs at half "
                                    "resolution, a quarter of its MACs)")
    top_k: int = setting(1, "experts each sample runs through")
    gate_grad: str = setting("softmax", "where the straight-through gate sends the gradient (top-1); this is also "
                                        "what attacks through the router see", choices=GATE_GRADS)
    # method (docs/method.md; the reference code's hyper-parameters as defaults)
    method: str = setting("advmoe", "training method", choices=_method_choices)
    # "model" collapsed to one expert on fmnist-tiny (reports/fmnist_methods.md)
    router_loss: str = setting("reference", "router-step loss of AdvMoE and route-aware", choices=ROUTER_LOSSES)
    expert_loss: str = setting("trades", "expert-step loss of AdvMoE and route-aware, and what their training attack "
                                         "maximises (the router's KL is added either way)", choices=EXPERT_LOSSES)
    beta: float = setting(6.0, "weight of the KL (TRADES) term")
    alpha: float = setting(6.0, "weight of CE(router(x), y mod N) in the reference router loss")
    balance_weight: float = setting(0.0, "weight of a load-balancing term on the router scores (0: off)")
    recraft: bool = setting(True, "AdvMoE, route-aware: craft new adversarial examples against the updated "
                                  "experts for the router step")
    steer: float = setting(1.0, "route-aware: weight of the push of the real router towards the forced route in the "
                                "route-fixed candidate attack")
    # attack, in pixel units of [0, 1] inputs
    eps: float = setting(8 / 255, "linf budget of the training and validation attacks, in [0, 1] pixels")
    attack_step: float = setting(5 / 255, "step of the training attack")
    attack_steps: int = setting(2, "PGD steps of the training attack")
    attack_start: str = setting("normal", "start of the training attack (validation and `advmoe eval` start uniform)",
                                choices=STARTS)
    eval_step: float = setting(2 / 255, "step of the validation PGD")
    eval_steps: int = setting(10, "PGD steps of the validation attack (checkpoint selection)")
    val_apgd_iterations: int = setting(0, "iterations of the validation's APGD-CE and APGD-DLR, which join the worst "
                                          "case (0: not run); they see gradient masking that PGD misses")
    select_on: str = setting("pgd", "validation accuracy the best checkpoint is chosen on", choices=SELECT_ON)
    # off until the frontier study has measured rollback against the runs that collapsed without it
    collapse_guard: str = setting("off", "what a collapse of validation robustness (catastrophic overfitting of "
                                              "the training attack) triggers", choices=COLLAPSE_GUARDS)
    # optimisation
    epochs: int = setting(100, "epochs (cosine schedule over all of them)")
    batch_size: int = setting(128, "images per batch (per process under torchrun)")
    lr: float = setting(0.1, "SGD learning rate of the experts and backbone")
    router_lr: float | None = setting(None, "SGD learning rate of the router (default: --lr)")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(5e-4, "SGD weight decay")
    seed: int = setting(0, "seed of the weights, the data order and the attacks")
    # hardware
    device: str = setting("cpu", "cpu, cuda or cuda:N")
    amp: str = setting("none", "mixed precision", choices=AMP)
    channels_last: bool = setting(False, "channels-last memory format")
    compile: bool = setting(False, "torch.compile the model")
    workers: int = setting(0, "DataLoader worker processes")

    @property
    def is_moe(self) -> bool:
        return advmoe.is_moe_model(self.model)

    def model_kwargs(self, info) -> dict:
        kwargs = dict(num_classes=info.num_classes, in_channels=info.in_channels, image_size=info.image_size,
                      mean=info.mean, std=info.std, width=self.width, stem=self.stem)
        if self.is_moe:
            kwargs.update(num_experts=self.num_experts, expert_ratio=self.expert_ratio, router=self.router,
                          router_blocks=self.router_blocks, router_width=self.router_width,
                          router_stride=self.router_stride, top_k=self.top_k,
                          gate_grad=self.gate_grad)
        return kwargs

    def validate(self) -> "TrainConfig":
        def bad(msg: str):
            raise ConfigError(msg)

        validate_choices(self)
        if self.augment == "standard":  # the config records what the run did
            self.augment = PER_IMAGE if self.dataset == FOLDER else advmoe.get_dataset_info(self.dataset).augmentation
        if self.augment == PER_IMAGE and self.dataset != FOLDER:
            bad(f"augment={PER_IMAGE} crops each image as the folder data set decodes it; {self.dataset} augments "
                "batches: use crop or crop-flip")
        if self.image_size is not None and self.dataset != FOLDER:
            try:  # a named data set has its own size (the folder's is checked when it is read)
                advmoe.get_dataset_info(self.dataset, image_size=self.image_size)
            except ValueError as e:
                bad(str(e))
        if self.image_size is not None and self.image_size < MIN_IMAGE_SIZE:
            bad(f"image_size={self.image_size}: give {MIN_IMAGE_SIZE} pixels or more")
        if self.expert_loss != "trades" and self.method not in ALTERNATING:
            bad(f"expert_loss={self.expert_loss} is a setting of {' and '.join(ALTERNATING)}; {self.method} has its own "
                "loss (for Madry's loss on the whole model: method pgd-at)")
        if self.is_moe and self.gate_grad == "none" and not (self.method in ALTERNATING and self.router_loss == "reference"):
            bad(f"gate_grad=none gives the router no gradient through the gate, the only one {self.method} "
                f"{'with router_loss=' + self.router_loss + ' ' if self.method in ALTERNATING else ''}trains it with; "
                f"use {' or '.join(ALTERNATING)} with router_loss=reference, or another gate_grad")
        if METHODS[self.method].moe_only and not self.is_moe:
            bad(f"method {self.method} trains a mixture of experts; use a moe_* model (e.g. moe_{self.model})")
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
        if self.val_apgd_iterations < 0:
            bad(f"val_apgd_iterations={self.val_apgd_iterations} must be >= 0 (0: no validation APGD)")
        if self.lr <= 0:
            bad(f"lr={self.lr} must be positive")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def with_defaults(saved: dict) -> dict:
    """A config as an older version wrote it, with the settings added since at their defaults: a
    new setting's default is what the code did before it, so this is the config the run had."""
    return {**TrainConfig().to_dict(), **saved}


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
