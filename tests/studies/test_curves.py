"""The dense curve and each MoE point's distance to it, on planted results: interpolation in log
MACs, the spread a verdict is weighed against, and which curve a point meets."""
import math
from dataclasses import replace

import pytest

from planted import planted
from studies.curves import dense_at, dense_curves, gaps, regime
from studies.report import against_curve
from studies.speed import Speed
from studies.verdicts import verdicts

M = 1_000_000


def _dense(epochs: int = 5) -> dict:
    """A dense curve of three widths: 60 % at 1 M MACs, 70 % at 4 M, 72 % at 16 M (two runs each, 1 point apart)."""
    widths = {"w1": (0.0625, 1 * M, 0.60), "w2": (0.125, 4 * M, 0.70), "w3": (0.25, 16 * M, 0.72)}
    return {f"{k}-e{epochs}": planted(f"{k}-e{epochs}", "pgd-at", macs, [mean - 0.005, mean + 0.005], [mean] * 2,
                                      width=width, epochs=epochs)
            for k, (width, macs, mean) in widths.items()}


def test_the_curve_is_interpolated_in_log_macs_and_is_none_outside_its_range():
    [curve] = dense_curves(_dense())
    assert [p.macs for p in curve.points] == [M, 4 * M, 16 * M]
    mean, spread = curve.at(2 * M)  # half-way from 1 M to 4 M in log MACs
    assert mean == pytest.approx(0.65) and spread == pytest.approx(0.01 / math.sqrt(2))
    assert curve.at(8 * M)[0] == pytest.approx(0.71) and curve.at(4 * M)[0] == pytest.approx(0.70)
    assert curve.at(M // 2) is None and curve.at(17 * M) is None


@pytest.mark.parametrize("moe_worst, verdict", [
    ([0.69, 0.70], "above the dense curve"),  # +4.5 points over 65 %
    ([0.645, 0.66], "within the spread"),  # +0.25, spread 1.06
    ([0.60, 0.61], "under the dense curve"),
    ([0.70], "one run: no spread yet"),
])
def test_a_moe_point_is_weighed_against_the_curve_at_its_macs_with_the_larger_spread(moe_worst, verdict):
    grouped = _dense() | {"moe": planted("moe", "advmoe", 2 * M, moe_worst, moe_worst, settings={"num_experts": 4})}
    [gap] = gaps(grouped, dense_curves(grouped))
    assert gap.dense == pytest.approx(0.65) and gap.difference == pytest.approx(sum(moe_worst) / len(moe_worst) - 0.65)
    assert gap.verdict == verdict and gap.experts == 4 and gap.router == "1x8"
    assert regime([gap]) == (["moe"] if verdict == "above the dense curve" else [])


def test_a_point_meets_the_curve_of_its_own_epochs_and_none_outside_every_curve():
    grouped = _dense(5) | _dense(10) | {
        "moe-e10": planted("moe-e10", "advmoe", 2 * M, [0.60, 0.61], [0.6] * 2, epochs=10),
        "moe-cheap": planted("moe-cheap", "advmoe", M // 2, [0.60, 0.61], [0.6] * 2)}
    grouped["w2-e10"] = planted("w2-e10", "pgd-at", 4 * M, [0.795, 0.805], [0.8] * 2, width=0.125, epochs=10)
    found = {g.row: g for g in gaps(grouped, dense_curves(grouped))}
    assert found["moe-e10"].dense == pytest.approx(0.70)  # the 10-epoch curve: 60 % at 1 M, 80 % at 4 M
    assert found["moe-cheap"].dense is None and found["moe-cheap"].verdict == "outside the dense curve"


def test_dense_pgd_at_rows_of_a_variant_make_the_curve_of_their_schedule():
    """A longer schedule is run as a variant of the dense rows (`--variant e10 --epochs 10`): its rows
    make a curve of their own, and a MoE point of that schedule meets it, not the 5-epoch one."""
    grouped = _dense(5) | {
        f"{k}-e10": planted(f"{k}-e10", "pgd-at", macs, [w - 0.001, w + 0.001], [w] * 2, width=width, epochs=10,
                            variant="e10")
        for k, width, macs, w in (("w1", 0.0625, M, 0.70), ("w2", 0.125, 4 * M, 0.74))}
    grouped["moe-e10"] = planted("moe-e10", "advmoe", 2 * M, [0.715, 0.725], [0.72] * 2, epochs=10, variant="e10")
    assert sorted((c.trained["epochs"], len(c.points)) for c in dense_curves(grouped)) == [(5, 3), (10, 2)]
    [gap] = gaps(grouped, dense_curves(grouped))
    assert gap.dense == pytest.approx(0.72) and gap.verdict == "within the spread"


def test_a_result_written_before_a_setting_existed_joins_the_curve_of_its_default():
    grouped = _dense()
    for run in grouped["w3-e5"]:  # as an older version wrote it: no such setting yet
        del run.config["collapse_guard"]
    [curve] = dense_curves(grouped)
    assert len(curve.points) == 3
    for run in grouped["w3-e5"]:  # another value than the default is other training
        run.config["collapse_guard"] = "rollback"
    assert [len(c.points) for c in dense_curves(grouped)] == [2]


def test_dense_rows_of_other_training_or_a_single_width_make_no_curve():
    grouped = {"a": planted("a", "pgd-at", M, [0.6, 0.61], [0.6] * 2, width=0.0625),
               "b": planted("b", "pgd-at", 4 * M, [0.7, 0.71], [0.7] * 2, width=0.125, settings={"attack_steps": 5}),
               "trades": planted("trades", "trades", 4 * M, [0.7, 0.71], [0.7] * 2, width=0.125)}
    assert dense_curves(grouped) == []


def test_the_report_tables_the_curve_and_every_moe_point_with_their_speed_where_timed():
    grouped = _dense() | {"moe": planted("moe", "advmoe", 2 * M, [0.69, 0.70], [0.7] * 2)}
    speeds = {"moe": Speed("onnxruntime", {1: 0.25, 64: 0.125}, "trained"),
              "w1-e5": Speed("torch", {1: 0.2, 64: 0.1}, "fresh")}
    text = against_curve(verdicts(grouped), speeds)
    assert "| 5 | w1-e5 | 1.00 M | 0.200 / 0.100 | 60.0 ± 0.7 |" in text
    assert "| 5 | w2-e5 | 4.00 M | - | 70.0 ± 0.7 |" in text  # not timed
    assert "| moe | 2 | 1x8 | 2.00 M | 0.250 / 0.125 | 69.5 | 65.0 | +4.5 | 0.7 | above the dense curve |" in text
    assert against_curve(verdicts({"moe": grouped["moe"]})) == ""


def test_the_plot_draws_time_panels_only_for_timed_rows(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from studies import plot
    grouped = _dense() | {"moe": planted("moe", "advmoe", 2 * M, [0.69, 0.70], [0.7] * 2)}
    panels = []
    monkeypatch.setattr(plt, "close", lambda fig: panels.append(fig.axes))
    plot.plot(grouped, tmp_path / "a.png")
    plot.plot(grouped, tmp_path / "b.png", {"moe": Speed("onnxruntime", {1: 0.25, 64: 0.125}, "trained"),
                                            "w1-e5": Speed("torch", {1: 0.2, 64: 0.1}, "fresh")})
    assert [len(p) for p in panels] == [2, 4]
    time_panel = panels[1][1]
    drawn = sorted(x for bars in time_panel.containers for x in bars.lines[0].get_xdata())
    assert drawn == pytest.approx([0.2, 0.25])  # the timed dense row and the MoE row


def test_the_plot_draws_a_line_per_schedule_each_named_in_the_legend(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from studies import plot
    grouped = _dense(5) | _dense(10) | {"moe": planted("moe", "advmoe", 2 * M, [0.69, 0.70], [0.7] * 2)}
    for key in ("w1-e10", "w2-e10", "w3-e10"):  # the longer schedule, run as the study runs it: a variant
        grouped[key] = [replace(r, row=replace(r.row, variant="e10")) for r in grouped[key]]
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    plot.plot(grouped, tmp_path / "a.png")
    lines = [bars for bars in figures[0].axes[0].containers if len(bars.lines[0].get_xdata()) > 1]
    assert sorted(len(bars.lines[0].get_xdata()) for bars in lines) == [3, 3]
    legend = [text.get_text() for text in figures[0].legends[0].get_texts()]
    assert {"dense PGD-AT, 5 epochs (a line)", "dense PGD-AT, 10 epochs (e10) (a line)"} <= set(legend)
    style = plot.styles(grouped, plt.get_cmap("tab10").colors)
    assert len(set(style.values())) == len(style)  # one colour and marker per series


def test_the_dense_worst_case_at_a_moe_rows_macs_is_the_curve_or_the_nearest_dense_row_alike():
    grouped = _dense() | {"moe": planted("moe", "advmoe", 2 * M, [0.69, 0.70], [0.7] * 2),
                          "moe-e10": planted("moe-e10", "advmoe", 11 * M, [0.69, 0.70], [0.7] * 2, epochs=10),
                          "far-e10": planted("far-e10", "advmoe", 30 * M, [0.69, 0.70], [0.7] * 2, epochs=10),
                          "dense-e10": planted("dense-e10", "pgd-at", 12 * M, [0.72, 0.73], [0.7] * 2, epochs=10,
                                               variant="e10")}
    assert dense_at(grouped, "moe") == pytest.approx(0.65)  # the 5-epoch curve
    assert dense_at(grouped, "moe-e10") == pytest.approx(0.725)  # no 10-epoch curve: the dense row 9 % dearer
    assert dense_at(grouped, "far-e10") is None
