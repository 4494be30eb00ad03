"""Reusing a finished evaluation: an eval.json stands in for running the evaluation again when it
is of the same weights (their SHA-256), images, split and settings."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from advmoe.checkpoint import WEIGHTS


def kept_evaluation(path: Path, accept: Callable[[dict], bool]) -> dict | None:
    """The eval.json at `path` when `accept` says it can stand in for running the evaluation again
    (evaluated_with, usually), else None: also when it is missing, not JSON or not an eval.json."""
    try:
        doc = json.loads(Path(path).read_text())
        return doc if accept(doc) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def evaluated_with(doc: dict, checkpoint: Path, n: int, settings: dict, at_least: bool = False,
                   split: str = "test") -> bool:
    """Whether an eval.json document is of `checkpoint`'s weights, the first n images of `split`
    and `settings` (EvalSettings fields), so that it can stand in for running them again.
    at_least: an evaluation of more images, or with more attacks, will do as well."""
    wanted = json.loads(json.dumps(settings))  # as eval.json stores them: tuples as lists
    have = doc["settings"]
    attacks = wanted.pop("attacks", None)
    if attacks is not None and not (set(attacks) <= set(have["attacks"]) if at_least else attacks == have["attacks"]):
        return False
    images = doc.get("first_examples")
    return (doc.get("checkpoint_sha256") == file_sha256(checkpoint / WEIGHTS) and doc.get("split", "test") == split
            and images is not None and (images >= n if at_least else images == n)
            and all(have.get(k) == v for k, v in wanted.items()))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
