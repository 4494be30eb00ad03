"""Checkpoint directories: round trip, atomic writes, and errors that say what is wrong."""
import json

import pytest
import torch

import advmoe
from advmoe import checkpoint as ckpt
from advmoe.checkpoint import CheckpointError
from helpers import calibrated_model, model_variants, variant_id


@pytest.mark.parametrize("name,router", model_variants(), ids=variant_id)
def test_round_trip_gives_identical_logits(tmp_path, name, router):
    model = calibrated_model(name, router)
    path = advmoe.save_checkpoint(model, tmp_path / "ck", metrics={"clean_accuracy": 0.5},
                                  config={"dataset": "cifar10"})
    assert sorted(p.name for p in path.iterdir()) == ["card.json", "config.json", "metrics.json", "model.safetensors"]
    loaded = advmoe.load_checkpoint(path)
    assert not loaded.training and loaded.model_name == name and loaded.cfg == model.cfg
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    metrics = ckpt.read_metrics(path)
    assert metrics["clean_accuracy"] == 0.5
    assert metrics["macs_per_image"] == advmoe.count_macs(model, (3, 32, 32))
    assert ckpt.read_config(path)["dataset"] == "cifar10"


@pytest.fixture
def saved(tmp_path):
    return advmoe.save_checkpoint(calibrated_model("moe_resnet18", "shared"), tmp_path / "ck")


def test_checkpoints_without_a_gate_grad_load_with_the_default_and_a_chosen_one_round_trips(saved, tmp_path):
    config = json.loads((saved / "config.json").read_text())
    del config["model_args"]["gate_grad"]  # what checkpoints written before the setting hold
    (saved / "config.json").write_text(json.dumps(config))
    assert advmoe.load_checkpoint(saved).cfg.gate_grad == "softmax"
    model = advmoe.create_model("moe_resnet18", width=0.125, gate_grad="chosen")
    assert advmoe.load_checkpoint(advmoe.save_checkpoint(model, tmp_path / "chosen")).cfg.gate_grad == "chosen"


def test_truncated_weights_are_reported(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        advmoe.load_checkpoint(saved)


def test_config_that_does_not_match_the_weights_is_reported(saved):
    config = json.loads((saved / "config.json").read_text())
    config["model_args"]["expert_ratio"] = 1.0
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"does not match config.json .*shape mismatch: blocks\.0\.conv1\.weight"):
        advmoe.load_checkpoint(saved)


def test_weights_of_another_architecture_are_reported(saved, tmp_path):
    other = advmoe.save_checkpoint(calibrated_model("moe_vgg16", "shared"), tmp_path / "vgg")
    (saved / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="missing: .*unexpected: "):
        advmoe.load_checkpoint(saved)


@pytest.mark.parametrize("damage,message", [
    (lambda p: (p / "config.json").unlink(), "config.json is missing"),
    (lambda p: (p / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda p: (p / "model.safetensors").unlink(), "has no model.safetensors"),
    (lambda p: (p / "config.json").write_text(json.dumps(
        {**json.loads((p / "config.json").read_text()), "architecture": "resnet50"})), "unknown model 'resnet50'"),
    (lambda p: (p / "config.json").write_text(json.dumps(
        {**json.loads((p / "config.json").read_text()), "model_args": {"experts": 2}})), "unknown argument"),
])
def test_damaged_checkpoints_are_reported(saved, damage, message):
    damage(saved)
    with pytest.raises(CheckpointError, match=message):
        advmoe.load_checkpoint(saved)


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        advmoe.load_checkpoint(tmp_path / "nowhere")


def test_a_crash_while_saving_leaves_the_old_checkpoint_whole(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        advmoe.save_checkpoint(calibrated_model("moe_resnet18", "shared", seed=1), saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temporary left behind


def test_saving_over_an_older_checkpoint_replaces_it(saved):
    other = calibrated_model("moe_resnet18", "shared", seed=1)
    advmoe.save_checkpoint(other, saved)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(advmoe.load_checkpoint(saved)(x), other(x))
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not something this would replace"):
        advmoe.save_checkpoint(calibrated_model("resnet18"), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_load_path_uses_no_pickle(saved, monkeypatch):
    import pickle

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used on the load path")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    advmoe.load_checkpoint(saved)
