"""Evaluating a checkpoint trained on your own images: on its folder, at its size, with its classes."""
import pytest

from evaluation.robustness import evaluate_checkpoint
from helpers import FOLDER_RUN, write_image_folder
from training import trainer
from training.config import ConfigError, resolve


def test_a_folder_checkpoint_is_evaluated_on_its_folder_and_refused_on_other_classes(tmp_path):
    root = write_image_folder(tmp_path / "photos")
    cfg = resolve(data_dir=str(root), **FOLDER_RUN)
    best = trainer.train(cfg, tmp_path / "run", log=lambda *a: None, max_steps=1, test_examples=4).best
    doc = evaluate_checkpoint(best, n_examples=6, attacks=("pgd",), out=tmp_path / "eval")
    assert doc["dataset"] == "folder" and doc["examples"] == 6
    other = write_image_folder(tmp_path / "other", classes=("ant", "bee", "cow"), per_class=2, test_per_class=2)
    with pytest.raises(ConfigError, match="trained on the classes"):
        evaluate_checkpoint(best, data_dir=str(other), n_examples=2, attacks=("pgd",), out=tmp_path / "eval2")
