"""AutoAttack composed per image from the main evaluation's APGD-CE + APGD-T and a second
evaluation's FAB-T and Square: an image survives only if none of them fools it."""
import itertools
import re

import pytest

from studies.run import compose_autoattack, curve_of

STANDARD = {"apgd_iterations": 100, "square_queries": 5000}


def _evaluation(sha: str = "w", labels: list[int] | None = None, settings: dict = STANDARD, flags=(),
                **bits: str) -> dict:
    """An eval.json as compose_autoattack reads it: per image, one bit per attack ("1": still correct)."""
    n = len(next(iter(bits.values())))
    return {"examples": n, "checkpoint_sha256": sha, "autoattack_flags": list(flags), "settings": settings,
            "per_example": {"label": list(range(n)) if labels is None else labels, **bits}}


def _column(images: list[dict], key: str) -> str:
    return "".join(str(image[key]) for image in images)


def _images() -> list[dict]:
    """Every clean-correct image an evaluation can give: each of APGD-CE+T, FAB-T and Square fooling
    it or not, and the main evaluation's worst case (every main attack, APGD among them) with it or not;
    then a clean-wrong image, which the attacks leave wrong."""
    images = [dict(clean=1, apgd=a, fab=f, square=s, robust=r)
              for a, f, s in itertools.product((0, 1), repeat=3) for r in (0, 1) if r <= a]
    return images + [dict(clean=0, apgd=0, fab=0, square=0, robust=0)]


def test_an_image_survives_autoattack_only_if_none_of_its_attacks_fools_it():
    images = _images()
    main = _evaluation(**{k: _column(images, k) for k in ("clean", "apgd", "robust")})
    rest = _evaluation(**{k: _column(images, k) for k in ("clean", "fab", "square")})
    aa = compose_autoattack(main, rest)
    survivors = [i for i in images if i["clean"] and i["apgd"] and i["fab"] and i["square"]]
    assert aa["examples"] == len(images) == 13 and len(survivors) == 2
    assert aa["accuracy"] == len(survivors) / len(images)
    # the worst case with the rest also needs the main evaluation's: of the two, the one it left correct
    assert aa["worst_case_with_main"] == sum(i["robust"] for i in survivors) / len(images) == 1 / 13
    assert aa["standard"] is True and aa["flags"] == []


def test_each_attacks_fooled_image_stays_fooled_whatever_the_others_find():
    """Per image, not per attack: each attack fools one image of four (each alone 75 %), a different
    one each time, so AutoAttack leaves one image of four, not 75 %."""
    main = _evaluation(clean="1111", apgd="0111", robust="0111")
    rest = _evaluation(clean="1111", fab="1011", square="1101")
    assert compose_autoattack(main, rest)["accuracy"] == 0.25
    # one image fooled by all three attacks counts once
    assert compose_autoattack(_evaluation(clean="1111", apgd="0111", robust="0111"),
                              _evaluation(clean="1111", fab="0111", square="0111"))["accuracy"] == 0.75


def test_a_clean_wrong_image_never_survives_even_where_an_attack_left_it_unfooled():
    """FAB-T and Square run on clean-correct images only: an image the model gets wrong unattacked is
    fooled already, whatever bits the attacks' evaluation holds for it."""
    main = _evaluation(clean="01", apgd="11", robust="01")
    rest = _evaluation(clean="01", fab="11", square="11")
    aa = compose_autoattack(main, rest)
    assert (aa["accuracy"], aa["worst_case_with_main"]) == (0.5, 0.5)


def test_only_the_first_images_of_the_main_evaluation_are_composed():
    """AutoAttack runs on the main evaluation's first images; the main evaluation's later images,
    however they fared, are not AutoAttack's."""
    main = _evaluation(clean="101111", apgd="101111", robust="100111")
    rest = _evaluation(labels=[0, 1, 2, 3], clean="1011", fab="1011", square="1010")
    aa = compose_autoattack(main, rest)
    assert aa["examples"] == 4 and (aa["accuracy"], aa["worst_case_with_main"]) == (0.5, 0.25)


def _fooled_by_square_only(check: dict) -> tuple[int, int]:
    only, n = re.search(r"(\d+) of (\d+) examples fooled by Square only", check["detail"]).groups()
    return int(only), int(n)


def test_the_masking_check_counts_images_square_fools_that_every_white_box_attack_missed():
    """White-box: the main evaluation's worst case and FAB-T, both correct; Square fooling more than
    one such image of four (the allowance: 1 % of the images, at least one) is a sign of masking."""
    main = _evaluation(clean="1111", apgd="1111", robust="1110")
    rest = _evaluation(clean="1111", fab="1011", square="1111")
    check = compose_autoattack(main, rest)["square_check"]
    assert check["passed"] is True and _fooled_by_square_only(check) == (0, 4)
    one = compose_autoattack(main, {**rest, "per_example": {**rest["per_example"], "square": "0111"}})["square_check"]
    assert one["passed"] is True and _fooled_by_square_only(one) == (1, 4)
    # image 1 fell to FAB-T and image 3 to the main attacks: Square fooling them is no sign of masking
    two = compose_autoattack(main, {**rest, "per_example": {**rest["per_example"], "square": "0010"}})["square_check"]
    assert two["passed"] is True and _fooled_by_square_only(two) == (1, 4)
    three = compose_autoattack(main, {**rest, "per_example": {**rest["per_example"], "square": "0000"}})["square_check"]
    assert three["passed"] is False and _fooled_by_square_only(three) == (2, 4)


@pytest.mark.parametrize("main_settings, rest_settings, standard", [
    (STANDARD, STANDARD, True),
    ({**STANDARD, "apgd_iterations": 3}, STANDARD, False),
    (STANDARD, {**STANDARD, "apgd_iterations": 3}, False),
    (STANDARD, {**STANDARD, "square_queries": 10}, False),
])
def test_autoattack_is_standard_only_at_its_standard_settings(main_settings, rest_settings, standard):
    main = _evaluation(settings=main_settings, flags=["b"], clean="1", apgd="1", robust="1")
    rest = _evaluation(settings=rest_settings, flags=["a", "b"], clean="1", fab="1", square="1")
    aa = compose_autoattack(main, rest)
    assert aa["standard"] is standard and aa["flags"] == ["a", "b"]


@pytest.mark.parametrize("change", [{"checkpoint_sha256": "other weights"}, {"labels": [1, 0]}],
                         ids=["weights", "labels"])
def test_parts_of_other_weights_or_images_are_refused(change):
    main = _evaluation(clean="11", apgd="11", robust="11")
    rest = _evaluation(sha=change.get("checkpoint_sha256", "w"), labels=change.get("labels"), clean="11", fab="11",
                       square="11")
    with pytest.raises(ValueError, match="AutoAttack's parts come from different weights or images"):
        compose_autoattack(main, rest)


def test_the_curve_keeps_the_last_training_of_each_epoch_and_the_guards_event():
    """The collapse guard trains epochs again: the result's curve has one row per epoch, the one
    that stands, and the epoch trained again keeps the event that says why."""
    event = {"metric": "val_pgd_accuracy", "best": 0.6, "now": 0.3, "best_epoch": 1}
    history = [{"epoch": 1, "val_pgd_accuracy": 0.6, "epoch_seconds": 1.0},
               {"epoch": 2, "val_pgd_accuracy": 0.3, "epoch_seconds": 1.0, "collapse_guard": event},
               {"epoch": 2, "val_pgd_accuracy": 0.62, "epoch_seconds": 1.0},
               {"epoch": 3, "val_pgd_accuracy": 0.65, "epoch_seconds": 1.0}]
    curve = curve_of(history)
    assert [(r["epoch"], r["val_pgd_accuracy"], r["collapse_guard"]) for r in curve] == [
        (1, 0.6, None), (2, 0.62, event), (3, 0.65, None)]
