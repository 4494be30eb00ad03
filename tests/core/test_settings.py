"""advmoe.settings: how a setting's value is written back to people (flag defaults, reports), and how a
wrong choice is named."""
from dataclasses import dataclass

import pytest

from advmoe.settings import ConfigError, number_text, parse_pairs, setting, validate_choices


@pytest.mark.parametrize("eps, text", [(0.1, "0.1"), (8 / 255, "8/255"), (2 / 255, "2/255"), (0.2, "0.2"), (0.5, "0.5")])
def test_the_budget_is_written_as_people_write_it(eps, text):
    assert number_text(eps) == text


@dataclass
class Pick:
    execution: str = setting("sparse", "how it runs", choices={"sparse": "", "masked": ""})
    attacks: tuple[str, ...] = setting(("pgd",), "attacks", choices=("pgd", "square"))


def test_a_wrong_choice_names_the_setting_as_its_user_sets_it():
    validate_choices(Pick())
    with pytest.raises(ConfigError, match="unknown execution 'dense'; choose one of: sparse, masked"):
        validate_choices(Pick(execution="dense"))
    with pytest.raises(ConfigError, match="unknown attack 'fgsm'"):
        validate_choices(Pick(attacks=("pgd", "fgsm")))
    with pytest.raises(ConfigError, match="unknown ADVMOE_EXECUTION 'dense'"):
        validate_choices(Pick(execution="dense"), label=lambda name: f"ADVMOE_{name.upper()}")


def test_key_value_pairs_are_read_as_toml_and_a_bad_one_names_its_flag():
    assert parse_pairs(["width=0.5", "router-stride=2", 'router="shared"', "compile=true"], "--changes") == {
        "width": 0.5, "router_stride": 2, "router": "shared", "compile": True}
    for bad in ("width", "=2", "width=", "router=shared"):
        with pytest.raises(ConfigError, match="--changes"):
            parse_pairs([bad], "--changes")
