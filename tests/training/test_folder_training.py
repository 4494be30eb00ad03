"""Training on your own images: a folder data set, streamed by DataLoader workers."""
import json

import pytest

import advmoe
from helpers import FOLDER_CLASSES, FOLDER_RUN, write_image_folder
from training import trainer
from training.config import ConfigError, resolve
from training.methods import METHODS


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("photos"))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_a_folder_and_its_class_names_reach_the_checkpoint(photos, tmp_path, method):
    model = "moe_resnet18" if METHODS[method].moe_only else "resnet18"
    cfg = resolve(data_dir=str(photos), **{**FOLDER_RUN, "method": method, "model": model, "workers": 2, "val_examples": 3})
    assert cfg.augment == "resized-crop-flip"
    result = trainer.train(cfg, tmp_path / "run", log=lambda *a: None, max_steps=1, test_examples=3)
    checkpoint = advmoe.load_checkpoint(result.best)
    config = json.loads((result.best / "config.json").read_text())
    assert config["classes"] == list(FOLDER_CLASSES) and config["dataset"] == "folder"
    assert (checkpoint.cfg.num_classes, checkpoint.cfg.in_channels, checkpoint.cfg.image_size) == (3, 3, 32)
    assert 0 <= result.test["clean_accuracy"] <= 1 and config["training"]["method"] == method


def test_image_size_and_per_image_crops_belong_to_the_folder_data_set():
    with pytest.raises(ConfigError, match="fashion_mnist images are 28x28"):
        resolve("fmnist-tiny", image_size=64).validate()
    with pytest.raises(ConfigError, match="augments batches"):
        resolve("fmnist-tiny", augment="resized-crop-flip").validate()

