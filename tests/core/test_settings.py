"""advmoe.settings: how a setting's value is written back to people (flag defaults, reports)."""
import pytest

from advmoe.settings import number_text


@pytest.mark.parametrize("eps, text", [(0.1, "0.1"), (8 / 255, "8/255"), (2 / 255, "2/255"), (0.2, "0.2"), (0.5, "0.5")])
def test_the_budget_is_written_as_people_write_it(eps, text):
    assert number_text(eps) == text
