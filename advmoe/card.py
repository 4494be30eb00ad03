"""The model card: one record of what a trained model is and how it scored, as timm's pretrained
config is one record. The checkpoint writes it (card.json), export copies it into the BentoML
model (its metadata is the card), the service answers it at GET /model_info and the client
parses it back. `ModelCard.from_files` is the one place that maps a checkpoint's config.json and
metrics.json to it.

Standard library only: the HTTP client and the service's API worker import it without torch.
"""
from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

CARD = "card.json"


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise TypeError(f"expected an integer, got {value!r}")
    return int(value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _sequence(item, length: int | None = None):
    def parse(value: Any) -> tuple:
        if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
            raise TypeError(f"expected a list{f' of {length}' if length else ''}, got {value!r}")
        return tuple(item(v) for v in value)

    return parse


def _normalization(value: Any) -> dict[str, tuple[float, ...]]:
    if not isinstance(value, dict) or not {"mean", "std"} <= value.keys():
        raise TypeError(f"expected {{\"mean\": [...], \"std\": [...]}}, got {value!r}")
    return {k: _sequence(_number)(value[k]) for k in ("mean", "std")}


def _entry(parse, default: Any = ..., nullable: bool = True):
    """A card field: how from_dict parses it, whether it may be None (not known) and its
    default (none given: the field is required)."""
    metadata = {"parse": parse, "nullable": nullable}
    return field(metadata=metadata) if default is ... else field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelCard:
    """What a user of a trained or served model needs: what it takes, what it predicts, how it
    routes and how robust it measured. Accuracies are fractions in [0, 1]; None: not measured."""
    architecture: str = _entry(_text, nullable=False)
    classes: tuple[str, ...] = _entry(_sequence(_text), nullable=False)  # class names, by index
    input_shape: tuple[int, int, int] = _entry(_sequence(_integer, 3), nullable=False)  # [C, H, W] of one input
    num_classes: int = _entry(_integer, None, nullable=False)  # len(classes) when not given
    num_experts: int = _entry(_integer, 0, nullable=False)  # 0: a dense model
    expert_ratio: float | None = _entry(_number, None)  # an expert's width over the dense twin's
    router: str | None = _entry(_text, None)  # shared or per_layer; None for a dense model
    top_k: int | None = _entry(_integer, None)  # experts run per input and MoE layer; None for a dense model
    dataset: str | None = _entry(_text, None)
    input_range: tuple[float, float] = _entry(_sequence(_number, 2), (0.0, 1.0), nullable=False)  # pixel values
    normalization: dict[str, tuple[float, ...]] | None = _entry(_normalization, None)  # applied inside the model
    training_method: str | None = _entry(_text, None)  # advmoe, trades, standard...
    clean_accuracy: float | None = _entry(_number, None)  # test set
    pgd_accuracy: float | None = _entry(_number, None)  # under the attack `pgd` describes
    pgd: str | None = _entry(_text, None)  # e.g. "PGD-10 linf eps=0.1 step=0.025 through the straight-through router"
    robust_accuracy: float | None = _entry(_number, None)  # worst case per example over `advmoe eval`'s attacks
    robust_examples: int | None = _entry(_integer, None)  # test images the worst case is over
    autoattack_accuracy: float | None = _entry(_number, None)
    autoattack_examples: int | None = _entry(_integer, None)
    # The study's dense PGD-AT curve at this model's MACs per image (interpolated): the worst case a
    # dense model of the same cost reached, i.e. what choosing this model gains or gives up.
    dense_robust_accuracy: float | None = _entry(_number, None)
    # Share of inputs whose route an attack changes: the PGD above, or metrics.json's route_flip_attack.
    route_flip_rate: float | None = _entry(_number, None)
    macs_per_image: int | None = _entry(_integer, None)  # multiply-accumulates per input, sparse path
    advmoe_version: str | None = _entry(_text, None)  # the advmoe that wrote the checkpoint

    def __post_init__(self):
        if self.num_classes is None:
            object.__setattr__(self, "num_classes", len(self.classes))
        if len(self.classes) != self.num_classes:
            raise ValueError(f"model card: {len(self.classes)} classes for num_classes={self.num_classes}")

    @classmethod
    def from_files(cls, config: dict, metrics: dict) -> "ModelCard":
        """The card of a checkpoint from its config.json and metrics.json documents (the one
        place that maps those files to the card)."""
        missing = [k for k in ("architecture", "model_args", "input_size", "num_classes") if k not in config]
        if missing:
            raise ValueError(f"model card: config.json has no {', '.join(map(repr, missing))} entry")
        args, training = config["model_args"], config.get("training") or {}
        moe = args.get("num_experts", 0) > 0
        num_classes = config["num_classes"]
        return cls.from_dict({
            "architecture": config["architecture"],
            "classes": config.get("classes") or [str(i) for i in range(num_classes)],
            "input_shape": config["input_size"],
            "num_classes": num_classes,
            "num_experts": args.get("num_experts", 0),
            "expert_ratio": args.get("expert_ratio", 1.0),
            "router": args.get("router") if moe else None,
            "top_k": args.get("top_k", 1) if moe else None,
            "dataset": config.get("dataset") or training.get("dataset"),
            "normalization": config.get("normalization"),
            "training_method": training.get("method"),
            "clean_accuracy": metrics.get("clean_accuracy"),
            "pgd_accuracy": metrics.get("pgd_accuracy"),
            "pgd": metrics.get("pgd") or metrics.get("test_pgd"),  # "pgd": the card's own (advmoe study card)
            "robust_accuracy": metrics.get("robust_accuracy"),
            "robust_examples": metrics.get("robust_examples"),
            "autoattack_accuracy": metrics.get("autoattack_accuracy"),
            "autoattack_examples": metrics.get("autoattack_examples"),
            "dense_robust_accuracy": metrics.get("dense_robust_accuracy"),
            "route_flip_rate": metrics.get("route_flip_rate", metrics.get("test_route_flip_rate")),
            "macs_per_image": metrics.get("macs_per_image"),
            "advmoe_version": config.get("advmoe_version"),
        })

    @classmethod
    def from_dict(cls, data: Any) -> "ModelCard":
        """Parse what to_dict wrote (card.json, /model_info). Unknown keys are ignored (a
        service adds its own); a missing required field or a wrong type is a ValueError that
        names the field."""
        if not isinstance(data, dict):
            raise ValueError(f"model card: expected a JSON object, got {type(data).__name__}")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                if f.default is MISSING:
                    raise ValueError(f"model card: missing field {f.name!r}")
                continue
            if data[f.name] is None and f.metadata["nullable"]:
                continue
            try:
                values[f.name] = f.metadata["parse"](data[f.name])
            except TypeError as e:
                raise ValueError(f"model card: field {f.name!r}: {e}") from None
        return cls(**values)

    def to_dict(self) -> dict:
        """JSON-ready: every field, None where not known, lists for tuples."""
        def plain(value):
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

    def write(self, folder: str | os.PathLike) -> Path:
        """Write folder/card.json (a plain write: callers write into an atomic directory)."""
        file = Path(folder) / CARD
        file.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return file

    def labels(self) -> dict[str, str]:
        """String labels for a model store (BentoML's labels): what to filter models by."""
        return {"architecture": self.architecture, "dataset": self.dataset or "unknown",
                "router": self.router if self.num_experts else "dense", "framework": "advmoe"}


def read_card(folder: str | os.PathLike) -> ModelCard:
    """The card of a checkpoint or export directory: its card.json, or for one written before
    cards existed, the card built from its config.json and metrics.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such directory (expected a checkpoint or export folder with {CARD})")
    if (folder / CARD).is_file():
        return ModelCard.from_dict(_read_json(folder / CARD))
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has neither {CARD} nor config.json: not an advmoe checkpoint or export")
    metrics = folder / "metrics.json"
    return ModelCard.from_files(_read_json(folder / "config.json"), _read_json(metrics) if metrics.is_file() else {})


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None
