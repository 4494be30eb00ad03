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


def test_a_dense_row_not_timed_takes_the_time_of_a_timed_dense_row_of_its_architecture():
    from planted import planted
    from studies.speed import Speed, with_dense_alike

    grouped = {"w2": planted("w2", "pgd-at", 4, [0.7] * 2, [0.7] * 2, width=0.125),
               "w2-e10": planted("w2-e10", "pgd-at", 4, [0.73] * 2, [0.73] * 2, width=0.125, epochs=10, variant="e10"),
               "w3-e10": planted("w3-e10", "pgd-at", 9, [0.72] * 2, [0.72] * 2, width=0.1875, epochs=10, variant="e10"),
               "moe-e10": planted("moe-e10", "advmoe", 4, [0.72] * 2, [0.72] * 2, epochs=10, variant="e10")}
    timed = Speed("onnxruntime", {1: 0.2, 64: 0.1}, "fresh")
    speeds = with_dense_alike(grouped, {"w2": timed})
    # the longer schedule of width 0.125 is the same model; width 0.1875 and a MoE model are not
    assert speeds == {"w2": timed, "w2-e10": timed}
    for run in grouped["w2-e10"]:  # images of another size (a folder data set's setting) make another model
        run.config["image_size"] = 64
    assert with_dense_alike(grouped, {"w2": timed}) == {"w2": timed}
