"""`advmoe eval`: a robustness evaluation that routing cannot fool (docs/evaluation.md).

`evaluate_checkpoint` evaluates a checkpoint directory on the first n images of its dataset's
test (or held-out validation) split with the settings `EvalSettings` and writes eval.json and
eval.md. The attacks are `evaluation.suite`'s, the document `evaluation.document`'s; under
`torchrun` the images are shared out to the ranks (`evaluation.sharding`), and a finished
evaluation is reused through `evaluation.cache`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import advmoe
from advmoe.attacks import check_eps
from advmoe.checkpoint import WEIGHTS, read_config
from advmoe.data import FOLDER
from advmoe.device import unavailable
from advmoe.distributed import setup as join_group, teardown as leave_group
from advmoe.gate import GATE_GRADS
from advmoe.io import atomic_write_text
from advmoe.settings import ConfigError, setting, validate_choices

from . import sanity
from .cache import file_sha256, images
from .suite import ATTACKS, evaluate_model
from .summary import summary

DEFAULT_EPS = 8 / 255


@dataclass
class EvalSettings:
    attacks: tuple[str, ...] = setting(help="attacks to run", choices=ATTACKS, factory=lambda: tuple(ATTACKS))
    eps: float = setting(DEFAULT_EPS, "linf budget in [0, 1] pixels, e.g. 0.1 or 8/255")
    pgd_steps: tuple[int, ...] = setting(help="PGD-K through the straight-through router, one run per K",
                                         factory=lambda: (10, 50))
    route_steps: int = setting(50, "PGD steps per forced route, and of the router attack")
    # the same fraction for every k; docs/evaluation.md: 2/255 at 8/255
    step: float = setting(0.25, "PGD step as a fraction of eps")
    steer: float = setting(1.0, "weight of the push towards the forced expert in the route-fixed attack")
    square_queries: int = setting(5000, "Square's queries (5000 is AutoAttack's standard)")
    apgd_iterations: int = setting(100, "iterations of APGD-CE, APGD-T and FAB-T (100 is AutoAttack's standard)")
    batch_size: int = setting(256, "images per unit: attacks run one unit at a time; torchrun deals units to ranks")
    seed: int = setting(0, "seed of the attacks' random starts")
    sweep: tuple[float, ...] | None = setting(None, "eps of the sanity sweep (default: eps x 1/4, 1/2, 1, 2 and 0.5)")
    sweep_examples: int = setting(200, "images of the eps sweep of the sanity checks")
    gradient_examples: int = setting(64, "images of the router-gradient check")
    gate_grad: str | None = setting(None, "the straight-through gradient the white-box attacks follow through the "
                                    "route (default: the model's own); the forward pass, so every accuracy of a given "
                                    "input, is the same either way", choices=GATE_GRADS)

    def validate(self) -> None:
        if not self.attacks:
            raise ConfigError(f"no attack given; choose from {', '.join(ATTACKS)}")
        validate_choices(self)
        try:
            check_eps(self.eps)
            for e in self.sweep or ():
                check_eps(e)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not 0 < self.step <= 1:
            raise ConfigError(f"step is a fraction of eps in (0, 1], got {self.step}")
        if not self.pgd_steps or min(self.pgd_steps) < 1 or self.route_steps < 1:
            raise ConfigError(f"PGD steps must be >= 1, got {list(self.pgd_steps)} and route steps {self.route_steps}")
        for name in ("batch_size", "square_queries", "apgd_iterations", "sweep_examples", "gradient_examples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def sweep_eps(self) -> list[float]:
        if self.sweep:
            return sorted(set(self.sweep))
        return sorted({min(1.0, self.eps * f) for f in (0.25, 0.5, 1, 2)} | {sanity.LARGE_EPS})



def evaluate_checkpoint(checkpoint: str | os.PathLike, dataset: str | None = None, data_dir: str | None = None,
                        n_examples: int = 1000, out: str | os.PathLike | None = None, eps: float | None = None,
                        progress: bool | None = None, device: str = "cpu", split: str = "test",
                        draw_seed: int | None = None, start: int = 0, **settings) -> dict | None:
    """Evaluate a checkpoint directory on the first `n_examples` test images of its dataset and
    write eval.json and eval.md (atomically) to `out` (default: the checkpoint directory).
    draw_seed: take the images in an order drawn at random with this seed instead of the split's
    own (a slice from the start of a test set can mislead); start: skip that many images of the
    order first, so that a large evaluation can run in parts (images [start, start + n_examples)).
    eps: linf budget in [0, 1] pixels (default: the checkpoint's training eps, else 8/255).
    split: "test", or "val" for the validation images its own training run held out (to choose
    between checkpoints without looking at the test set).

    Under torchrun each rank attacks its share of the images (gloo on the CPU, NCCL with
    --device cuda, one GPU per rank); rank 0 writes the files and returns the document."""
    checkpoint = Path(checkpoint)
    config = read_config(checkpoint)
    dataset = _dataset(checkpoint, config, dataset)
    data_args = _data_args(config, dataset)
    if data_args and data_dir is None:  # your own images: where the training run read them
        data_dir = (config.get("training") or {}).get("data_dir")
    info = advmoe.get_dataset_info(dataset, data_dir, data_args.get("image_size"))
    if data_args and list(info.classes) != list(config.get("classes", info.classes)):
        raise ConfigError(f"{checkpoint} was trained on the classes {config['classes']}; {data_dir} has "
                          f"{list(info.classes)}: evaluate it on the folder it was trained on")
    eps, eps_source = _eps(config, eps)
    s = EvalSettings(eps=eps, **settings)
    s.validate()  # before any slow work
    if n_examples < 1 or start < 0:
        raise ConfigError(f"n-examples must be >= 1 and start >= 0, got {n_examples} and {start}")
    held_out = {**_held_out(checkpoint, config, split), **data_args}  # before any slow work
    if problem := unavailable(device):
        raise ConfigError(problem)
    device = torch.device(device)
    _, _, started_group = join_group(device)
    try:
        if started_group and device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        model = _load_model(checkpoint, dataset, info, device)
        x, y = _examples(dataset, split, data_dir, held_out, n_examples, draw_seed, start)
        result = evaluate_model(model, x, y, s, progress)
    finally:
        leave_group(started_group)
    if result is None:  # not rank 0
        return None
    document = {"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint / WEIGHTS),
                "architecture": config["architecture"], "training_method": (config.get("training") or {}).get("method"),
                "dataset": dataset, "split": split, "eps_source": eps_source,
                **({"first_examples": len(y)} if draw_seed is None and not start
                   else {"images": images(len(y), draw_seed, start)}),
                **result}
    out = Path(out) if out is not None else checkpoint
    atomic_write_text(out / "eval.json", json.dumps(document, indent=1) + "\n")
    atomic_write_text(out / "eval.md", summary(document))
    return document


def _dataset(checkpoint: Path, config: dict, dataset: str | None) -> str:
    """The dataset to evaluate on: the one given, which must be the one the checkpoint was trained on."""
    trained_on = config.get("dataset")
    if dataset and trained_on and dataset != trained_on:
        raise ConfigError(f"{checkpoint} is a {trained_on} model, not {dataset}: pass --dataset {trained_on} "
                          f"or another checkpoint")
    dataset = dataset or trained_on
    if not dataset:
        raise ConfigError(f"{checkpoint}/config.json names no dataset: pass --dataset")
    return dataset


def _eps(config: dict, eps: float | None) -> tuple[float, str]:
    """The budget, and where it came from: given, else the checkpoint's training eps, else 8/255."""
    if eps is not None:
        return float(eps), "given"
    eps = (config.get("training") or {}).get("eps")
    if eps is None:
        return float(DEFAULT_EPS), "default 8/255"
    return float(eps), "the checkpoint's training eps"


def _load_model(checkpoint: Path, dataset: str, info, device: torch.device) -> nn.Module:
    """The checkpoint's model on `device`, refused if its input or classes are not the dataset's."""
    model = advmoe.load_checkpoint(checkpoint, map_location=device)
    cfg = model.cfg
    if (cfg.in_channels, cfg.image_size, cfg.num_classes) != (info.in_channels, info.image_size, info.num_classes):
        raise ConfigError(f"{checkpoint} takes {cfg.in_channels}x{cfg.image_size}x{cfg.image_size} images and "
                          f"{cfg.num_classes} classes; {dataset} has {info.in_channels}x{info.image_size}x"
                          f"{info.image_size} and {info.num_classes}")
    return model


def _examples(dataset: str, split: str, data_dir: str | None, held_out: dict, n: int,
              draw_seed: int | None = None, start: int = 0) -> tuple[Tensor, Tensor]:
    """Images [start, start + n) of the split's order (as many as there are), or of an order drawn
    at random with `draw_seed`, and their labels."""
    data = advmoe.load_dataset(dataset, split, data_dir, **held_out)
    order = (range(len(data)) if draw_seed is None
             else torch.randperm(len(data), generator=torch.Generator().manual_seed(draw_seed)).tolist())
    indices = order[start:start + n]
    if not len(indices):
        raise ConfigError(f"start={start}: the {split} split has only {len(data)} images")
    items = [data[i] for i in indices]
    return torch.stack([item[0] for item in items]), torch.tensor([item[1] for item in items])


def _data_args(config: dict, dataset: str) -> dict:
    """load_dataset's arguments a folder data set needs from the checkpoint: the model's image size
    and what its training did with unreadable images (a named data set needs none)."""
    if dataset != FOLDER:
        return {}
    training = config.get("training") or {}
    return {"image_size": (config.get("model_args") or {}).get("image_size"),
            "bad_images": training.get("bad_images", "error")}


def _held_out(checkpoint: Path, config: dict, split: str) -> dict:
    """load_dataset's arguments for `split`: for "val", the size and seed of the split the
    checkpoint's training run held out, so that no image it trained on is evaluated."""
    if split == "test":
        return {}
    if split != "val":
        raise ConfigError(f"split must be test or val, got {split!r}")
    training = config.get("training") or {}
    if "val_size" not in training or "seed" not in training:
        raise ConfigError(f"{checkpoint}/config.json does not record the validation split its training held out "
                          f"(training.val_size and training.seed): evaluate it on the test split")
    return {"val_size": training["val_size"], "seed": training["seed"]}

