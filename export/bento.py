"""The BentoML model store entry: the exported files plus labels and metadata, in the spirit
of torchvision's weights meta, so a service (and a person) can tell what a tag holds."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


def describe(config: dict, metrics: dict, execution: str = "sparse") -> tuple[dict, dict]:
    """(labels, metadata) of a BentoML model from a checkpoint's config.json and metrics.json."""
    args = config["model_args"]
    moe = args.get("num_experts", 0) > 0
    labels = {
        "architecture": config["architecture"],
        "dataset": str(config.get("dataset", "unknown")),
        "router": args.get("router", "") if moe else "dense",
        "framework": "advmoe",
        "execution": execution,
    }
    metadata = {
        "architecture": config["architecture"],
        "num_experts": args.get("num_experts", 0),
        "expert_ratio": args.get("expert_ratio", 1.0),
        "router": args.get("router") if moe else None,
        "top_k": args.get("top_k", 1),
        "dataset": config.get("dataset"),
        "classes": config.get("classes"),
        "num_classes": config["num_classes"],
        "input_size": config["input_size"],
        "clean_accuracy": metrics.get("clean_accuracy"),
        "pgd_accuracy": metrics.get("pgd_accuracy"),  # PGD through the straight-through router
        "robust_accuracy": metrics.get("robust_accuracy"),  # worst case over `advmoe eval`'s attacks
        "macs_per_image": metrics.get("macs_per_image"),
        "execution": execution,
        "advmoe_version": config.get("advmoe_version"),
    }
    # BentoML keeps basic types only: leave out what the checkpoint does not know.
    return labels, {k: v for k, v in metadata.items() if v is not None}


def save_model(name: str, files: list[Path], config: dict, metrics: dict, execution: str = "sparse") -> str:
    """Create `name:<new version>` in the BentoML model store holding `files`; returns the tag."""
    import bentoml

    if not NAME.match(name):
        raise ValueError(f"BentoML model name {name!r}: use lowercase letters, digits, '.', '_' or '-'")
    labels, metadata = describe(config, metrics, execution)
    with bentoml.models.create(name, module="export.bento", labels=labels, metadata=metadata) as model:
        for file in files:
            shutil.copyfile(file, model.path_of(file.name))
    return str(model.tag)
