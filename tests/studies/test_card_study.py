"""The card's figures from the whole test set: the evaluations run in parts that are kept and
reused, merged image by image, and written into the checkpoint's metrics and card."""
import json

import pytest

import advmoe.checkpoint
from helpers import fmnist_moe_checkpoint, make_fashion_like
from studies import card

FEW = {"pgd_steps": (2,), "route_steps": 2, "square_queries": 10, "apgd_iterations": 3, "sweep_examples": 4,
       "gradient_examples": 4}


def test_the_card_is_the_whole_test_set_in_parts_and_autoattack_on_drawn_images(tmp_path, monkeypatch):
    fashion_dir = make_fashion_like(tmp_path, n_test=30)  # a test set of 30 images, in parts of 12
    checkpoint = fmnist_moe_checkpoint(tmp_path)
    values = card.card(checkpoint, tmp_path / "runs", examples=None, autoattack_examples=6, draw_seed=5, part=12,
                       data_dir=str(fashion_dir), attack_settings_override=FEW, log=lambda *a: None)
    [folder] = (tmp_path / "runs").iterdir()
    mains = [json.loads((folder / "main" / f"{s:06d}" / "eval.json").read_text()) for s in (0, 12, 24)]
    assert [d["examples"] for d in mains] == [12, 12, 6] and values["robust_examples"] == 30  # every test image
    bits = "".join(d["per_example"]["robust"] for d in mains)
    assert values["robust_accuracy"] == pytest.approx(bits.count("1") / 30)
    assert values["clean_accuracy"] == pytest.approx(sum(d["accuracy"]["clean"] * d["examples"] for d in mains) / 30)
    pgd = "".join(d["per_example"]["pgd-2"] for d in mains)  # FEW's PGD: 2 steps, over every test image
    assert values["pgd_accuracy"] == pytest.approx(pgd.count("1") / 30)
    assert values["pgd"] == "PGD-2 linf eps=0.1 step=0.025 through the straight-through router"
    assert values["route_flip_rate"] == pytest.approx(sum(d["attacks"]["router"]["route_flip_rate"] * d["examples"]
                                                          for d in mains) / 30)
    [aa] = [json.loads((folder / "autoattack" / "000000" / "eval.json").read_text())]
    assert aa["images"] == {"order": "drawn", "draw_seed": 5, "start": 0, "count": 6}
    assert values["autoattack_accuracy"] == aa["robust_accuracy"] and values["autoattack_examples"] == 6
    shown = advmoe.checkpoint.read_card(checkpoint)
    assert (shown.robust_accuracy, shown.robust_examples, shown.autoattack_examples) == (values["robust_accuracy"], 30, 6)
    assert (shown.pgd_accuracy, shown.pgd) == (values["pgd_accuracy"], values["pgd"])  # not training's own
    # a second call reuses every part: nothing is evaluated again
    monkeypatch.setattr(card.evaluations, "evaluate_in_processes", lambda *a, **k: pytest.fail("evaluated again"))
    assert card.card(checkpoint, tmp_path / "runs", autoattack_examples=6, draw_seed=5, part=12,
                     data_dir=str(fashion_dir), attack_settings_override=FEW, log=lambda *a: None) == values


def test_parts_cover_the_images_once():
    assert card.parts(2500, 1000) == [(0, 1000), (1000, 1000), (2000, 500)] and card.parts(3, 5) == [(0, 3)]
