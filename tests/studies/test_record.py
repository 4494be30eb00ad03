"""The study's result record: every committed result file reads as one, writing and reading give the
same record back, and a file of another shape is refused with its name."""
import json
from pathlib import Path

import pytest

from studies.design import RESULTS
from studies.record import RunResult, load_results, read, write

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted((ROOT / "reports").glob("robustness_frontier*/*.json"))


def test_there_are_committed_result_files():
    assert len(COMMITTED) >= 30 and (ROOT / RESULTS).is_dir()


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_every_committed_result_file_is_a_record_in_the_current_format(path):
    result = read(path)
    assert result.name == path.stem  # its file name is its run's
    assert json.loads(path.read_text()) == json.loads(json.dumps(result.to_json()))  # nothing dropped or added
    assert 0 <= result.worst_case <= min(result.accuracy.values())
    assert (result.route_flip_rate is None) == (not result.row.is_moe)


def test_writing_and_reading_give_the_same_record(tmp_path):
    result = read(COMMITTED[0])
    write(tmp_path / "r.json", result)
    assert read(tmp_path / "r.json") == result
    assert [r.name for r in load_results(tmp_path)[result.row.key]] == [result.name]


@pytest.mark.parametrize("change, message", [({"worst_case": None} | {"wrong": 1}, "unknown keys in a result file: \\['wrong'\\]"),
                                             ({"row": {"key": "x"}}, "is not a study result file")])
def test_a_file_of_another_shape_is_refused_with_its_name(tmp_path, change, message):
    doc = json.loads(COMMITTED[0].read_text()) | change
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        read(tmp_path / "bad.json")
    assert isinstance(read(COMMITTED[0]), RunResult)


def test_a_row_of_its_own_settings_keeps_them_and_a_plain_row_writes_none(tmp_path):
    from planted import planted
    [own] = planted("x4", "advmoe", 10, [0.7], [0.7], settings={"num_experts": 4})
    write(tmp_path / "x4.json", own)
    assert read(tmp_path / "x4.json") == own and own.config["num_experts"] == 4
    assert "settings" not in read(COMMITTED[0]).to_json()["row"]
