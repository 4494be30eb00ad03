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


def images(n: int, draw_seed: int | None = None, start: int = 0) -> dict:
    """Which images an evaluation is of: [start, start + n) of the split's order, or of an order
    drawn at random with draw_seed (evaluate_checkpoint's draw_seed and start)."""
    return {"order": "split" if draw_seed is None else "drawn", "draw_seed": draw_seed, "start": start, "count": n}


def images_of(doc: dict) -> dict:
    """Which images an eval.json is of, whether it says "first_examples" or "images"."""
    return images(doc["first_examples"]) if "first_examples" in doc else doc["images"]


def evaluated_with(doc: dict, checkpoint: Path, n: int, settings: dict, at_least: bool = False,
                   split: str = "test", draw_seed: int | None = None, start: int = 0) -> bool:
    """Whether an eval.json document is of `checkpoint`'s weights, the first n images of `split`
    (or those draw_seed and start name) and `settings` (EvalSettings fields), so that it can stand
    in for running them again. at_least: an evaluation of more of the first images, or with more
    attacks, will do as well."""
    wanted = json.loads(json.dumps(settings))  # as eval.json stores them: tuples as lists
    have = doc["settings"]
    attacks = wanted.pop("attacks", None)
    if attacks is not None and not (set(attacks) <= set(have["attacks"]) if at_least else attacks == have["attacks"]):
        return False
    have_images, want_images = images_of(doc), images(n, draw_seed, start)
    more = at_least and want_images["order"] == have_images["order"] == "split" and have_images["start"] == start == 0
    return (doc.get("checkpoint_sha256") == file_sha256(checkpoint / WEIGHTS) and doc.get("split", "test") == split
            and (have_images == want_images or (more and have_images["count"] >= n))
            and all(have.get(k) == v for k, v in wanted.items()))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
