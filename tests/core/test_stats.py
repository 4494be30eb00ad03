"""The spread over seeds as reports print it: one seed shows no made-up spread."""
import math

import pytest

from advmoe.stats import mean_std, percent


@pytest.mark.parametrize("values, text", [([0.6, 0.62, None], "61.0 ± 1.4"), ([0.714], "71.4"), ([0.714, None], "71.4"),
                                          ([], "n/a"), ([None], "n/a")])
def test_percent(values, text):
    assert percent(values) == text


def test_mean_std_skips_missing_values():
    assert mean_std([0.5, None, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert all(math.isnan(v) for v in mean_std([None]))
