"""Each row's speed, as `advmoe export` times it: the row's trained checkpoint when its run folder is
there, its architecture with fresh weights otherwise; the report reads what was recorded."""
from dataclasses import replace

from studies.record import load_results
from studies.speed import BATCHES, read_speeds, recorded_config, time_rows


def test_rows_are_timed_on_their_checkpoint_or_their_architecture_and_recorded(study, tmp_path):
    grouped = load_results(study.root / "results")
    elsewhere = replace(study.plan, runs=str(tmp_path / "gone"))  # run folders gone: fresh weights
    trained = time_rows({"advmoe-tiny": grouped["advmoe-tiny"]}, study.plan, tmp_path / "a.json", rounds=1,
                        log=lambda *a: None)
    fresh = time_rows(grouped, elsewhere, tmp_path / "b.json", rounds=1, log=lambda *a: None)
    assert trained["advmoe-tiny"].weights == "trained" and {s.weights for s in fresh.values()} == {"fresh"}
    for speed in [*trained.values(), *fresh.values()]:
        assert speed.runtime in ("onnxruntime", "torch", "pt2")
        assert set(speed.ms_per_image) == set(BATCHES) and all(ms > 0 for ms in speed.ms_per_image.values())
    assert read_speeds(tmp_path / "b.json") == fresh and read_speeds(tmp_path / "none.json") == {}


def test_a_variant_row_is_built_with_the_settings_its_result_file_records(study):
    grouped = load_results(study.root / "results")
    runs = [replace(r, config={**r.config, "router_stride": 2}) for r in grouped["advmoe-tiny"]]  # as --set made it
    assert study.plan.config(runs[0].row, runs[0].seed).router_stride == 1  # this call's plan has no --set
    assert recorded_config(runs, study.plan).router_stride == 2
