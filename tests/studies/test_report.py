"""The frontier report's numbers are the results': each table cell is the mean ± standard deviation
of its row's records, the JSON beside the report holds the same, and a comparison or a fall shows
the numbers of its finding."""
import json
import statistics

import pytest

from planted import curve_of, planted
from studies.design import Plan, run_name
from studies.record import write
from studies.report import comparisons_table, curves_table, falls_section, table, write_report
from studies.verdicts import verdicts

# (table header, the record field it shows): accuracies by attack, then the per-run numbers
ACCURACY_COLUMNS = {"clean": "clean", "PGD-10": "pgd-10", "APGD-CE+T": "apgd"}
RUN_COLUMNS = {"**worst case**": "worst_case", "PGD - worst": "pgd_minus_worst", "route flips": "route_flip_rate"}


def _rows(markdown: str) -> dict[str, dict[str, str]]:
    """{row label: {header: cell}} of the first table in `markdown`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    header, _, *rows = ([cell.strip() for cell in line.strip("|").split("|")] for line in lines[start:end])
    return {cells[0]: dict(zip(header, cells, strict=True)) for cells in rows}


def _number(cell: str) -> tuple[float, float | None]:
    """'61.3 ± 2.0' as (61.3, 2.0); one run's '61.3' as (61.3, None)."""
    mean, _, std = cell.strip("*").partition(" ± ")
    return float(mean), float(std) if std else None


def _percent(values: list[float]) -> tuple[float, float | None]:
    """What a cell should say of these fractions: mean and, for two runs or more, standard deviation, in %."""
    return (100 * statistics.mean(values), 100 * statistics.stdev(values) if len(values) > 1 else None)


def _grouped():
    """A dense row of one run and a MoE row of two whose runs differ in every number."""
    dense = planted("pgd-at-w0.15625", "pgd-at", 1_234_567, [0.61], [0.66], width=0.15625)
    moe = planted("advmoe-w0.25", "advmoe", 987_654, [0.52, 0.58], [0.56, 0.61])
    for run, clean, pgd, flips, busiest in zip(moe, (0.80, 0.84), (0.70, 0.72), (0.03, 0.07), (0.6, 0.7)):
        run.accuracy.update({"clean": clean, "pgd-10": pgd})
        run.pgd_minus_worst, run.route_flip_rate, run.expert_share = pgd - run.worst_case, flips, [busiest, 1 - busiest]
    return {"advmoe-w0.25": moe, "pgd-at-w0.15625": dense}


def _assert_cells_are_the_records(cells: dict[str, str], records: list[dict]):
    """A table row's cells against its runs' result files (as JSON), to the 0.1 point the table shows."""
    shown = {**{h: [r["accuracy"][k] for r in records] for h, k in ACCURACY_COLUMNS.items()},
             **{h: [r[k] for r in records] for h, k in RUN_COLUMNS.items() if records[0][k] is not None}}
    if records[0]["expert_share"] is not None:  # a MoE row: its busiest expert's share of the clean routes
        shown["busiest expert"] = [max(r["expert_share"]) for r in records]
    for column, values in shown.items():
        mean, std = _number(cells[column])
        expected_mean, expected_std = _percent(values)
        assert mean == pytest.approx(expected_mean, abs=0.05), column
        assert (std is None) == (expected_std is None), column
        if std is not None:
            assert std == pytest.approx(expected_std, abs=0.05), column
    assert cells["MACs per image"] == f"{records[0]['macs_per_image'] / 1e6:.2f} M"
    assert cells["seeds"] == ", ".join(str(r["seed"]) for r in records)
    assert cells["PGD-50"] == cells["route-fixed"] == cells["router attack"] == "-"  # attacks none of its runs met
    if records[0]["expert_share"] is None:  # a dense row: no routes
        assert cells["route flips"] == cells["busiest expert"] == "-"


def test_the_tables_cells_are_each_rows_mean_and_spread_over_its_runs():
    grouped = _grouped()
    rows = _rows(table(grouped))
    assert list(rows) == ["advmoe-w0.25", "pgd-at-w0.15625"]
    for key, runs in grouped.items():
        _assert_cells_are_the_records(rows[key], [r.to_json() for r in runs])
    # the planted numbers, read off the cells: a wrong mean or spread would not pass for them
    assert _number(rows["advmoe-w0.25"]["**worst case**"]) == (55.0, pytest.approx(4.2, abs=0.05))
    assert _number(rows["pgd-at-w0.15625"]["**worst case**"]) == (61.0, None)


def test_the_report_and_its_json_hold_the_numbers_of_the_result_files(tmp_path):
    for runs in _grouped().values():
        for run in runs:
            write(tmp_path / "results" / f"{run.name}.json", run)
    records = {}
    for path in sorted((tmp_path / "results").glob("*.json")):
        doc = json.loads(path.read_text())
        records.setdefault(doc["row"]["key"], []).append(doc)
    text = write_report(tmp_path / "results", tmp_path / "frontier.md", Plan())
    rows = _rows(text)
    summary = json.loads((tmp_path / "frontier.json").read_text())
    assert set(rows) == set(summary["rows"]) == set(records)
    for key, docs in records.items():
        _assert_cells_are_the_records(rows[key], docs)
        worst = [d["worst_case"] for d in docs]
        assert summary["rows"][key]["worst_case"] == [pytest.approx(statistics.mean(worst)),
                                                      pytest.approx(statistics.stdev(worst) if len(worst) > 1 else 0)]
        assert summary["rows"][key]["accuracy"]["apgd"][0] == pytest.approx(statistics.mean(d["accuracy"]["apgd"]
                                                                                            for d in docs))
        assert summary["rows"][key]["runs"] == [run_name(key, d["seed"], d["repeat"]) for d in docs]
    [c] = summary["findings"]["comparisons"]  # the MoE row against the dense row of its MACs
    assert (c["row"], c["other"], c["one_run"]) == ("advmoe-w0.25", "pgd-at-w0.15625", True)
    assert (c["mean"], c["other_mean"]) == (pytest.approx(0.55), 0.61)
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_the_autoattack_cell_says_which_seeds_it_covers_when_not_all():
    grouped = {"moe": planted("moe", "advmoe", 10, [0.56, 0.57], [0.58, 0.59])}
    grouped["moe"][1].autoattack = {"accuracy": 0.55, "worst_case_with_main": 0.54}
    column = "AutoAttack (worst with the rest)"
    assert _rows(table(grouped))["moe"][column] == "55.0 (54.0), seed 1"
    grouped["moe"][0].autoattack = {"accuracy": 0.53, "worst_case_with_main": 0.50}
    assert _rows(table(grouped))["moe"][column] == "54.0 ± 1.4 (52.0 ± 2.8)"
    grouped["moe"][0].autoattack = grouped["moe"][1].autoattack = None
    assert _rows(table(grouped))["moe"][column] == "-"


def test_a_comparison_row_shows_its_findings_numbers_and_no_spread_for_one_run():
    grouped = {"dense": planted("dense", "pgd-at", 11, [0.71, 0.72], [0.71, 0.72]),
               "moe": planted("moe", "advmoe", 10, [0.6, 0.63], [0.6, 0.63])}
    found = verdicts(grouped)
    cells = _rows(comparisons_table(found))["moe"]
    c = found.comparisons[0]
    assert (float(cells["worst case"]), float(cells["other's"])) == (pytest.approx(100 * c.mean, abs=0.05),
                                                                     pytest.approx(100 * c.other_mean, abs=0.05))
    assert float(cells["difference"]) == pytest.approx(100 * c.difference, abs=0.05) == -10.0
    assert float(cells["spread"]) == pytest.approx(100 * c.spread, abs=0.05) and cells["verdict"] == c.verdict
    assert "APGD-CE+T -10.0" in cells["by attack, where it does not beat"]
    grouped["dense"] = grouped["dense"][:1]  # one run: it has no spread to show
    assert _rows(comparisons_table(verdicts(grouped)))["moe"]["spread"] == "-"


def test_a_seeds_fall_shows_its_epoch_and_accuracies_in_the_curves_table():
    runs = planted("dense", "pgd-at", 11, [0.72, 0.73], [0.72, 0.73])
    runs[0].curve = curve_of((0.69, 0.744, 0.217, 0.744, 0.759))
    runs[1].curve = curve_of((0.70, 0.72, 0.713, 0.74, 0.735))
    cells = _rows(curves_table(verdicts({"dense": runs})))["dense"]
    assert [float(v) for v in cells["validation PGD by epoch (%)"].split(", ")] == [69.5, 73.2, 46.5, 74.2, 74.7]
    assert cells["one-epoch falls of a run"] == "seed 0: 74.4 → 21.7 at epoch 3, 74.4 the next"
    assert cells["route-fixed by epoch (%)"] == "-"


def test_the_falls_section_lists_each_fall_with_its_kind_and_counts_them():
    runs = planted("dense", "pgd-at", 11, [0.72, 0.73], [0.72, 0.73])
    runs[0].curve = curve_of((0.69, 0.744, 0.217, 0.744, 0.759))
    runs[1].curve = curve_of((0.70, 0.72, 0.713, 0.74, 0.50))
    section = falls_section(verdicts({"dense": runs}), runs=3)
    header, _, *rows = ([c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
                        if line.startswith("|"))
    cells = [dict(zip(header, row, strict=True)) for row in rows]
    assert [(c["seed"], c["epoch"], c["PGD-10"], c["PGD-10 the next epoch"], c["kind"]) for c in cells] == [
        ("0", "3 of 5", "74.4 → 21.7", "74.4", "not recorded"), ("1", "5 of 5", "74.0 → 50.0", "- (last epoch)", "not recorded")]
    assert "2 falls in 2 of 3 runs" in section and "next epoch: 1 of 1; in the last epoch: 1" in section
    runs[0].curve = runs[1].curve = curve_of((0.69, 0.70, 0.71, 0.72, 0.73))
    assert falls_section(verdicts({"dense": runs}), runs=2) == ""  # no fall: no section
