"""The model card: one record from the checkpoint to /model_info and the client."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import advmoe
from advmoe.card import CARD, ModelCard, read_card
from advmoe.checkpoint import CheckpointError, read_config, read_metrics, update_metrics
from helpers import small_model

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "checkpoints" / "fmnist-tiny"
CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return small_model("moe_resnet18", "shared", width=0.125, in_channels=1, image_size=28).eval()


@pytest.fixture
def saved(model, tmp_path):
    return advmoe.save_checkpoint(model, tmp_path / "ck", metrics={"clean_accuracy": 0.5, "pgd_accuracy": 0.25},
                                  config={"dataset": "fashion_mnist", "classes": CLASSES,
                                          "training": {"method": "advmoe", "dataset": "fashion_mnist"}})


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_the_shipped_checkpoint_card_is_its_config_and_metrics():
    card = ModelCard.from_files(json.loads((TINY / "config.json").read_text()),
                                json.loads((TINY / "metrics.json").read_text()))
    assert json.loads((TINY / CARD).read_text()) == card.to_dict()
    assert card.architecture == "moe_resnet18" and card.input_shape == (1, 28, 28) and card.num_classes == 10
    assert card.classes[9] == "Ankle boot" and card.dataset == "fashion_mnist" and card.training_method == "advmoe"
    assert (card.num_experts, card.expert_ratio, card.router, card.top_k) == (2, 0.5, "shared", 1)
    assert card.pgd_accuracy == 0.6125 and card.pgd.startswith("PGD-10 linf eps=0.1")
    assert card.route_flip_rate == pytest.approx(0.034) and card.robust_accuracy is None
    assert card.labels() == {"architecture": "moe_resnet18", "dataset": "fashion_mnist", "router": "shared",
                             "framework": "advmoe"}


def test_to_dict_and_from_dict_round_trip_through_json():
    card = read_card(TINY)
    card = replace(card, robust_accuracy=0.49, autoattack_accuracy=0.5)
    data = json.loads(json.dumps(card.to_dict()))
    assert ModelCard.from_dict(data) == card
    served = {"tag": "advmoe:x", **data, "runtime": "onnxruntime", "attack_probe": {"enabled": False}}
    assert ModelCard.from_dict(served) == card  # what a service adds is ignored


def test_from_dict_names_what_is_missing_or_wrong():
    data = read_card(TINY).to_dict()
    for name in ("architecture", "classes", "input_shape"):
        with pytest.raises(ValueError, match=f"missing field '{name}'"):
            ModelCard.from_dict({k: v for k, v in data.items() if k != name})
    with pytest.raises(ValueError, match="field 'input_shape': expected a list of 3"):
        ModelCard.from_dict({**data, "input_shape": [28, 28]})
    with pytest.raises(ValueError, match="field 'clean_accuracy': expected a number"):
        ModelCard.from_dict({**data, "clean_accuracy": "high"})
    with pytest.raises(ValueError, match="10 classes for num_classes=3"):
        ModelCard.from_dict({**data, "num_classes": 3})
    with pytest.raises(ValueError, match="expected a JSON object"):
        ModelCard.from_dict(["not", "a", "card"])
    # An older server's /model_info: no num_classes, normalization, version...
    old = {k: data[k] for k in ("architecture", "classes", "input_shape", "num_experts", "robust_accuracy")}
    assert ModelCard.from_dict(old).num_classes == 10


def test_importing_the_card_does_not_import_torch():
    probe = "import advmoe.card, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True)


def test_the_package_keeps_its_public_names():
    for name in advmoe.__all__:
        assert getattr(advmoe, name) is not None, name
    assert advmoe.ModelCard is ModelCard and "create_model" in dir(advmoe)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        advmoe.nothing


def test_a_saved_checkpoint_holds_its_card(saved, model):
    card = read_card(saved)
    assert json.loads((saved / CARD).read_text()) == card.to_dict()
    assert card == ModelCard.from_files(read_config(saved), read_metrics(saved))
    assert card.classes == tuple(CLASSES) and card.input_shape == (1, 28, 28) and card.clean_accuracy == 0.5
    assert card.macs_per_image == advmoe.count_macs(model, (1, 28, 28)) and card.advmoe_version == advmoe.__version__
    assert card.normalization["mean"] == pytest.approx((0.5,)) and card.training_method == "advmoe"
    (saved / CARD).unlink()  # a checkpoint written before cards: built from config.json and metrics.json
    assert read_card(saved) == card == advmoe.checkpoint.read_card(saved)


def test_the_card_is_written_in_the_same_atomic_directory(saved, model, monkeypatch):
    before = files(saved)

    def crash(path):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        advmoe.save_checkpoint(model, saved, metrics={"clean_accuracy": 0.9}, files={"state.pt": crash})
    assert files(saved) == before and [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_update_metrics_rewrites_metrics_and_card_together(saved, model):
    (saved / "state.pt").write_bytes(b"training state")  # a file the checkpoint was saved with
    weights = files(saved)["model.safetensors"]
    card = update_metrics(saved, robust_accuracy=0.4, autoattack_accuracy=0.45)
    assert card.robust_accuracy == 0.4 and card.autoattack_accuracy == 0.45 and card.clean_accuracy == 0.5
    assert read_metrics(saved)["robust_accuracy"] == 0.4 and read_metrics(saved)["pgd_accuracy"] == 0.25
    assert read_card(saved) == card
    model_info = {"tag": "advmoe:test", **read_card(saved).to_dict(), "runtime": "onnxruntime"}
    assert model_info["robust_accuracy"] == 0.4
    after = files(saved)
    assert after["model.safetensors"] == weights and after["state.pt"] == b"training state"
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]
    advmoe.load_checkpoint(saved)

    before = files(saved)
    with pytest.raises(ValueError, match="field 'robust_accuracy'"):
        update_metrics(saved, robust_accuracy="high")
    with pytest.raises(TypeError):
        update_metrics(saved, robust_accuracy=0.3, note=object())  # not JSON: nothing written
    assert files(saved) == before and [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_reading_a_card_where_there_is_none_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="missing: no such directory"):
        advmoe.checkpoint.read_card(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="neither card.json nor config.json"):
        advmoe.checkpoint.read_card(tmp_path)
    (tmp_path / CARD).write_text("{oops")
    with pytest.raises(ValueError, match="card.json is not valid JSON"):
        read_card(tmp_path)
