"""The collapse guard: when validation robustness collapses (catastrophic overfitting of the
training attack), the run goes back to its best epoch, weights, optimiser and schedule, and
trains on with a stronger training attack; a bounded number of times, across a resume too."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_fashion_like
import advmoe
from training import methods, trainer, validate as validation
from training.config import MAX_ROLLBACKS, ConfigError, resolve

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny training steps: a second thread only waits
# two training steps per epoch; validation is scripted, so only training runs for real
TINY = dict(dataset="fashion_mnist", model="resnet18", width=0.125, method="pgd-at", eps=0.1, attack_step=0.0625,
            attack_steps=2, eval_step=0.05, eval_steps=1, val_size=100, train_examples=64, val_examples=16,
            batch_size=32, lr=0.05, collapse_guard="rollback")
# epoch 1 is the best, epoch 2 collapses, then the retrained epoch 2 and epoch 3 hold
COLLAPSE_IN_EPOCH_2 = [0.6, 0.3, 0.6, 0.6]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_fashion_like(tmp_path_factory.mktemp("fashion"), n_train=200, n_test=20)


class Scripted:
    """Validation returning planted PGD accuracies, one per call (the last one again for the
    final test), that keeps the weights it was shown; `interrupt_at`: the call that kills the run."""

    def __init__(self, scores, interrupt_at=None):
        self.scores, self.interrupt_at, self.seen = scores, interrupt_at, []

    def __call__(self, model, dataset, cfg, device, **kwargs):
        self.seen.append({k: v.clone() for k, v in model.state_dict().items()})
        if len(self.seen) == self.interrupt_at:
            raise KeyboardInterrupt
        score = self.scores[min(len(self.seen), len(self.scores)) - 1]
        return {"clean_accuracy": 0.8, "pgd_accuracy": score, "examples": 1}


@pytest.fixture
def attacks(monkeypatch):
    """The training attack's calls: (steps, step, the weights it attacked)."""
    calls, pgd = [], methods.pgd

    def recorded(model, x, objective, eps, step, steps, **kwargs):
        calls.append((steps, step, {k: v.clone() for k, v in model.state_dict().items()}))
        return pgd(model, x, objective, eps, step, steps, **kwargs)

    monkeypatch.setattr(methods, "pgd", recorded)
    return calls


def train(data, out, monkeypatch, scores, interrupt_at=None, resume=False, **changes):
    validate = Scripted(scores, interrupt_at)
    monkeypatch.setattr(trainer, "validate", validate)
    cfg = resolve(data_dir=str(data), **{**TINY, "epochs": 3, **changes})
    result = trainer.train(cfg, out, resume=resume, log=lambda *a: None, test_examples=8)
    return result, validate


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validation_measures_the_training_attack_beside_pgd(data, monkeypatch):
    """The diagnostic attacks the validation images with the training attack's steps, step and
    start; its accuracy is that of the images its attack leaves classified."""
    cfg = resolve(data_dir=str(data), **{**TINY, "attack_start": "normal"})
    calls, pgd = [], validation.pgd

    def training_attack_leaves_x(model, x, objective, eps, step, steps, start="uniform", **kwargs):
        calls.append((step, steps, start))
        return x if (step, steps) == (cfg.attack_step, cfg.attack_steps) else pgd(model, x, objective, eps, step, steps)

    monkeypatch.setattr(validation, "pgd", training_attack_leaves_x)
    model = advmoe.create_model(cfg.model, **cfg.model_kwargs(advmoe.get_dataset_info(cfg.dataset)))
    val_set = advmoe.load_dataset("fashion_mnist", "val", str(data), cfg.val_size, cfg.seed)
    got = validation.validate(model, val_set, cfg, torch.device("cpu"), batch_size=8, train_attack=True)
    assert sorted(set(calls)) == [(0.05, 1, "uniform"), (0.0625, 2, "normal")]  # validation's PGD, the training attack
    assert got["train_attack_accuracy"] == got["clean_accuracy"]
    assert "train_attack_accuracy" not in validation.validate(model, val_set, cfg, torch.device("cpu"))


def test_a_collapse_rolls_back_to_the_best_epoch_and_trains_on_with_a_stronger_attack(data, tmp_path, monkeypatch,
                                                                                      attacks):
    _, validate = train(data, tmp_path / "run", monkeypatch, COLLAPSE_IN_EPOCH_2)
    log = rows(tmp_path / "run")
    assert [r["epoch"] for r in log] == [1, 2, 2, 3]
    event = log[1]["collapse_guard"]
    assert (event["metric"], event["best"], event["now"], event["best_epoch"]) == ("val_pgd_accuracy", 0.6, 0.3, 1)
    assert [("collapse_guard" in r) for r in log] == [False, True, False, False]
    # one more step, the same path (2 x 0.0625), for the rest of the run
    assert [r["training_attack_steps"] for r in log] == [2, 2, 3, 3]
    assert [r["training_attack_step"] for r in log] == pytest.approx([0.0625, 0.0625, 0.125 / 3, 0.125 / 3])
    assert [steps for steps, _, _ in attacks] == [2] * 4 + [3] * 4  # what the training attack really ran
    # The retrained epoch starts from epoch 1's weights (BatchNorm statistics included) and schedule.
    assert same(attacks[4][2], validate.seen[0]) and not same(attacks[4][2], validate.seen[1])
    assert log[2]["lr"] == log[1]["lr"] > 0
    assert json.loads((tmp_path / "run/best/metrics.json").read_text())["epoch"] == 1
    # The final test rewrote best/: a finished run's best checkpoint holds no training state.
    assert not (tmp_path / "run/best" / trainer.STATE).exists()


def test_after_its_rollbacks_a_run_keeps_going(data, tmp_path, monkeypatch, attacks):
    train(data, tmp_path / "run", monkeypatch, [0.6, 0.3, 0.3, 0.3, 0.3], epochs=2)
    log = rows(tmp_path / "run")
    assert MAX_ROLLBACKS == 2 and [r["epoch"] for r in log] == [1, 2, 2, 2]
    assert [r.get("collapse_guard", {}).get("best_epoch") for r in log] == [None, 1, 1, None]
    assert log[3]["collapse_guard"]["now"] == 0.3  # the third collapse is recorded, and training went on
    assert [r["training_attack_steps"] for r in log] == [2, 2, 3, 4]
    assert [steps for steps, _, _ in attacks] == [2, 2, 2, 2, 3, 3, 4, 4]
    assert [round(step * steps, 6) for steps, step, _ in attacks] == [0.125] * 8
    assert "test_pgd_accuracy" in json.loads((tmp_path / "run/best/metrics.json").read_text())


def test_with_the_guard_off_a_collapse_is_only_warned(data, tmp_path, monkeypatch, attacks):
    train(data, tmp_path / "run", monkeypatch, [0.6, 0.3], epochs=2, collapse_guard="off")
    log = rows(tmp_path / "run")
    assert [r["epoch"] for r in log] == [1, 2] and not any("collapse_guard" in r for r in log)
    assert [steps for steps, _, _ in attacks] == [2] * 4


def test_a_run_cut_off_after_a_rollback_resumes_to_the_uninterrupted_run(data, tmp_path, monkeypatch):
    whole, _ = train(data, tmp_path / "whole", monkeypatch, COLLAPSE_IN_EPOCH_2)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):  # killed in the retrained epoch 2, after the rollback was saved
        train(data, cut, monkeypatch, COLLAPSE_IN_EPOCH_2, interrupt_at=3)
    # last/ holds what training goes on from: epoch 1's weights, optimiser and schedule, one rollback used
    assert same(load_file(cut / "last/model.safetensors"), load_file(cut / "best/model.safetensors"))
    last = torch.load(cut / "last" / trainer.STATE, weights_only=True)
    best = torch.load(cut / "best" / trainer.STATE, weights_only=True)
    assert (last["epoch"], last["rollbacks"], best["epoch"]) == (1, 1, 1)
    momentum = [s["momentum_buffer"] for s in last["optimizers"]["all"]["state"].values()]
    best_momentum = [s["momentum_buffer"] for s in best["optimizers"]["all"]["state"].values()]
    assert len(momentum) == len(best_momentum) > 0 and all(map(torch.equal, momentum, best_momentum))
    assert last["schedulers"] == best["schedulers"]
    resumed, _ = train(data, cut, monkeypatch, COLLAPSE_IN_EPOCH_2[2:], resume=True)
    assert same(load_file(cut / "last/model.safetensors"), load_file(whole.out / "last/model.safetensors"))
    timing = {"epoch_seconds", "validation_seconds", "samples_per_second"}
    def untimed(history):
        return [{k: v for k, v in row.items() if k not in timing} for row in history]
    assert untimed(resumed.history) == untimed(whole.history)


def test_the_stronger_attack_takes_one_more_step_over_the_same_path_and_reaches_eps():
    cfg = resolve("fmnist-tiny")  # 2 steps of 0.0625 at eps 0.1
    assert trainer.strengthened(cfg, 0) is cfg
    once, twice = trainer.strengthened(cfg, 1), trainer.strengthened(cfg, 2)
    assert (once.attack_steps, twice.attack_steps) == (3, 4)
    assert (once.attack_step, twice.attack_step) == pytest.approx((0.125 / 3, 0.125 / 4))
    short = dataclasses.replace(cfg, attack_steps=1, attack_step=0.05)  # a path shorter than eps: stretched to eps
    assert trainer.strengthened(short, 1).attack_step == pytest.approx(0.05)
    assert (once.eval_steps, once.eval_step, once.eps) == (cfg.eval_steps, cfg.eval_step, cfg.eps)  # validation's own


def test_the_guard_is_a_setting_with_its_choices():
    assert resolve().collapse_guard == "off" and resolve(collapse_guard="rollback").collapse_guard == "rollback"
    with pytest.raises(ConfigError, match="unknown collapse-guard 'undo'"):
        resolve(collapse_guard="undo")
