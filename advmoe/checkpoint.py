"""Checkpoint directories: model.safetensors + config.json + metrics.json + card.json (the model
card, advmoe/card.py, made from the other two), written atomically.

Loading rebuilds the model from config.json through the registry and reads tensors with
safetensors: no pickle on the load path, so a checkpoint cannot run code.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._version import __version__
from .card import CARD, ModelCard
from .card import read_card as _read_card
from .io import atomic_directory
from .macs import count_macs
from .models.base import MoENet
from .registry import create_model

CONFIG, WEIGHTS, METRICS = "config.json", "model.safetensors", "metrics.json"
FORMAT = "advmoe-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message says what is wrong."""


def save_checkpoint(model: MoENet, path: str | os.PathLike, metrics: dict | None = None,
                    config: dict | None = None, files: dict[str, Callable[[Path], None]] | None = None) -> Path:
    """Write `model` to the directory `path` (replacing an older checkpoint there).

    config: extra entries for config.json (dataset, class names, training method and
    hyper-parameters...). metrics: for metrics.json; MACs per image are added if absent.
    files: more files written into the same atomic directory, {name: writer(path)} (e.g. the
    training state for resuming, which loading the model never reads).
    """
    cfg = model.cfg
    input_size = [cfg.in_channels, cfg.image_size, cfg.image_size]
    document = {
        "format": FORMAT,
        "advmoe_version": __version__,
        "architecture": model.model_name,
        "model_args": cfg.to_dict(),
        "input_size": input_size,
        "num_classes": cfg.num_classes,
        "normalization": {"mean": list(model.normalize.mean.flatten().tolist()),
                          "std": list(model.normalize.std.flatten().tolist())},
        **(config or {}),
    }
    metrics = {"macs_per_image": count_macs(model, tuple(input_size)), **(metrics or {})}
    card = ModelCard.from_files(document, metrics)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_directory(path, may_replace=is_checkpoint) as tmp:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt", "architecture": model.model_name})
        _write_json(tmp / CONFIG, document)
        _write_metrics(tmp, metrics, card)
        for name, write in (files or {}).items():
            write(tmp / name)
    return Path(path)


def update_metrics(path: str | os.PathLike, **values) -> ModelCard:
    """Add or replace entries of a checkpoint's metrics.json (e.g. robust_accuracy and
    autoattack_accuracy from `advmoe eval`) and rewrite its card.json to match; returns the card.

    Both files change in one atomic swap of the directory: a reader sees the old pair or the new
    one. The other files are hard-linked into the new directory, not copied.
    """
    path = Path(path)
    config = read_config(path)
    metrics = {**read_metrics(path), **values}
    card = ModelCard.from_files(config, metrics)  # before anything is written: a bad value changes nothing
    with atomic_directory(path, may_replace=is_checkpoint) as tmp:
        shutil.copytree(path, tmp, dirs_exist_ok=True, copy_function=_link_or_copy,
                        ignore=lambda folder, names: {METRICS, CARD} if Path(folder) == path else set())
        _write_metrics(tmp, metrics, card)
    return card


def read_card(path: str | os.PathLike) -> ModelCard:
    """The checkpoint's model card: card.json, or for a checkpoint written before cards, the card
    built from its config.json and metrics.json."""
    try:
        return _read_card(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _write_metrics(folder: Path, metrics: dict, card: ModelCard) -> None:
    _write_json(folder / METRICS, metrics)
    card.write(folder)


def _write_json(file: Path, document: dict) -> None:
    file.write_text(json.dumps(document, indent=2) + "\n")


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def is_checkpoint(path: str | os.PathLike) -> bool:
    try:
        return json.loads((Path(path) / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint directory, checked enough to build the model from it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory (expected a folder with {CONFIG} and {WEIGHTS})")
    file = path / CONFIG
    if not file.is_file():
        raise CheckpointError(f"{path} is not an advmoe checkpoint: {CONFIG} is missing")
    try:
        document = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not an advmoe checkpoint config (no \"format\": \"{FORMAT}\")")
    for key in ("architecture", "model_args"):
        if key not in document:
            raise CheckpointError(f"{file} has no {key!r} entry; the checkpoint is damaged")
    return document


def read_metrics(path: str | os.PathLike) -> dict:
    file = Path(path) / METRICS
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except ValueError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> MoENet:
    """Rebuild the model from config.json and load model.safetensors into it (eval mode).

    Raises CheckpointError naming what is wrong: a missing or corrupt file, an architecture
    or config that does not build, weights whose names or shapes do not match the config.
    """
    path = Path(path)
    document = read_config(path)
    name = document["architecture"]
    try:
        model = create_model(name, **document["model_args"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG} does not describe a model this version builds: {e}") from None
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS}; the checkpoint is incomplete")
    try:
        tensors = load_file(weights, device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights} is corrupt or truncated ({e}); save or copy the checkpoint again") from None
    _check_matches(model, tensors, f"{weights} does not match {CONFIG} ({name}, {_describe(model)})")
    model.load_state_dict(tensors)
    return model.to(map_location).eval()


def _check_matches(model: MoENet, tensors: dict, context: str) -> None:
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k}: file {list(tensors[k].shape)} vs model {list(v.shape)}"
              for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    for label, items in (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {'; '.join(items[:3])}{more}")
    if problems:
        raise CheckpointError(f"{context}: {' | '.join(problems)}")


def _describe(model: MoENet) -> str:
    cfg = model.cfg
    moe = f"{cfg.num_experts} experts, ratio {cfg.expert_ratio}, router {cfg.router}" if cfg.is_moe else "dense"
    return f"width {cfg.width}, {cfg.in_channels} channels, {cfg.num_classes} classes, {moe}"
