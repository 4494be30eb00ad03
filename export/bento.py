"""The BentoML model store entry: the exported files (card.json among them) plus labels and
metadata from the model card, in the spirit of torchvision's weights meta, so a service (and a
person) can tell what a tag holds."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from advmoe.card import ModelCard

NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


def describe(card: ModelCard, execution: str = "sparse", served_runtime: str | None = None) -> tuple[dict, dict]:
    """(labels, metadata) of the BentoML model: the model card's labels plus how it was exported,
    and the card itself, less what the checkpoint does not know (BentoML keeps basic types only),
    plus `served_runtime`, the runtime export measured fastest (the service reads its timings
    from the model's export.json)."""
    labels = {**card.labels(), "execution": execution}
    metadata = {k: v for k, v in card.to_dict().items() if v is not None}
    if served_runtime:
        metadata["served_runtime"] = served_runtime
    return labels, metadata


def save_model(name: str, files: list[Path], card: ModelCard, execution: str = "sparse",
               served_runtime: str | None = None) -> str:
    """Create `name:<new version>` in the BentoML model store holding `files`; returns the tag."""
    import bentoml

    if not NAME.match(name):
        raise ValueError(f"BentoML model name {name!r}: use lowercase letters, digits, '.', '_' or '-'")
    labels, metadata = describe(card, execution, served_runtime)
    with bentoml.models.create(name, module="export.bento", labels=labels, metadata=metadata) as model:
        for file in files:
            shutil.copyfile(file, model.path_of(file.name))
    return str(model.tag)
