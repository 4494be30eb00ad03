"""The serving benchmark's report: the targets and ratios computed from given timings, the tables
and JSON written whole, and the report re-rendered from its JSON. (The measurement itself starts
six servers; it runs as `advmoe bench serve`, not here.)"""
import json

import pytest

from benchmarks import bench_serve, serve_plots, serve_report, serve_targets

LEVELS = ["1", "32", "64", "1 after 64"]


def level(variant, n, name, images_per_s, p99, cpu, errors=0, call_ms=4.0, p50=None):
    return {"variant": variant, "runtime": "onnxruntime", "images_per_request": n, "level": name,
            "concurrency": int(name.split()[0]), "requests": 100, "errors": errors, "images_per_s": images_per_s,
            "p50_ms": p99 / 2 if p50 is None else p50, "p95_ms": p99 * 0.9, "p99_ms": p99, "mean_batch_size": 8.0,
            "expert_share": [0.5, 0.5], "compute_ms_per_image": 1000 / images_per_s / 2,
            "compute_ms_per_call": call_ms,
            "cpu_ms_per_image": {"request handling": 1.0, "model": cpu - 1.0, "server": cpu, "load generator": 1.0}}


def result(sparse=210, masked=120, dense=100, sparse_cpu=5.0, dense_cpu=11.0, sparse_p99=100.0, lone_p50=6.0,
           errors=0):
    rows = []
    for n in (1, 8):
        for name in LEVELS:
            rows += [level("sparse", n, name, sparse, sparse_p99, sparse_cpu, p50=lone_p50 if name.startswith("1 a")
                           else None),
                     level("masked", n, name, masked, 150.0, 8.0),
                     level("dense twin", n, name, dense, 200.0, dense_cpu, errors=errors if name == "64" else 0)]
    return {"rows": rows, "macs": {"sparse": 0.19e9, "masked": 0.36e9, "dense": 0.56e9}, "concurrency": [1, 32, 64],
            "levels": LEVELS, "images_per_request": [1, 8], "duration_s": 10, "rounds": 1, "workers": 1,
            "threads": 0, "image_size": 32, "width": 1.0, "router_blocks": 3, "cpus": 2, "machine": "x86_64",
            "torch": "2.14.1", "advmoe": "0.1.0"}


def by_target(measured: dict) -> dict:
    """{(images per request, target name): Check}."""
    return {(check.images_per_request, check.name): check for check in serve_targets.checks(measured)}


def md_tables(text: str) -> dict[str, list[dict]]:
    """Every markdown table of text, by its header line: a list of {column: cell}."""
    tables, lines = {}, text.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in line.strip("|").split("|")]
            body = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                body.append(dict(zip(header, (c.strip() for c in row.strip("|").split("|")))))
            tables[line] = body
    return tables


def table_with(text: str, column: str) -> list[dict]:
    return next(rows for header, rows in md_tables(text).items() if f"| {column} |" in header)


def test_each_target_holds_the_ratio_of_the_given_timings():
    checks = by_target(result())
    assert len(checks) == 11 and all(check.met for check in checks.values())
    assert checks[(1, "sparse / dense twin images/s, concurrency 32")].measured == pytest.approx(2.1)  # 210 / 100
    assert checks[(1, "sparse / masked images/s, concurrency 32")].measured == pytest.approx(1.75)  # 210 / 120
    assert checks[(8, "dense twin / sparse server CPU per image, concurrency 32")].measured == pytest.approx(2.2)
    lone = checks[(1, "sparse p50, concurrency 1 after 64 (model ms per call + 5)")]
    assert (lone.measured, lone.bound) == (6.0, 9.0)  # the model's 4 ms per call + 5
    assert checks[(1, "sparse / dense twin p99, worst level")].measured == pytest.approx(0.5)  # 100 / 200


def test_missed_targets_are_marked_with_their_measured_values():
    checks = by_target(result(sparse=150, dense_cpu=9.0, sparse_p99=250, lone_p50=12.0, errors=3))
    missed = {key: check.measured for key, check in checks.items() if not check.met}
    assert missed == pytest.approx({
        (1, "dense twin / sparse server CPU per image, concurrency 32"): 1.8,
        (8, "dense twin / sparse server CPU per image, concurrency 32"): 1.8,
        (1, "sparse / dense twin images/s, concurrency 32"): 1.5,
        (8, "sparse / dense twin images/s, concurrency 32"): 1.5,
        (1, "sparse / masked images/s, concurrency 32"): 1.25,
        (1, "sparse p50, concurrency 1 after 64 (model ms per call + 5)"): 12.0,
        (8, "sparse p50, concurrency 1 after 64 (model ms per call + 5)"): 12.0,
        (1, "sparse / dense twin p99, worst level"): 1.25,
        (8, "sparse / dense twin p99, worst level"): 1.25,
        (1, "errors over all variants, concurrency 64"): 3,
        (8, "errors over all variants, concurrency 64"): 3})


def test_a_ratio_equal_to_its_target_meets_it():
    checks = by_target(result(sparse=180))  # 180 / 100 = the 1.8x throughput target
    assert checks[(1, "sparse / dense twin images/s, concurrency 32")].met
    assert not checks[(8, "sparse / dense twin images/s, concurrency 32")].met  # 1.8 < 2.0


def test_the_targets_table_shows_measured_value_bound_and_verdict(tmp_path):
    out = tmp_path / "efficiency.md"
    serve_report.write_report(result(sparse=150), out, "advmoe bench serve")
    targets = table_with(out.read_text(), "bound")
    row = next(r for r in targets if r["images/request"] == "8" and r["target"].startswith("sparse / dense twin"))
    assert (row["measured"], row["bound"], row["met"]) == ("1.50x", ">= 2.00x", "missed")
    assert len(targets) == 11 and sum(r["met"] == "met" for r in targets) == 8


def test_report_files_are_written_together_with_the_ratios_of_the_timings(tmp_path):
    out = tmp_path / "reports" / "efficiency.md"
    serve_report.write_report(result(), out, "advmoe bench serve --duration 10")
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "efficiency.json", "efficiency.md", "efficiency_latency.png", "efficiency_macs.png", "efficiency_throughput.png"]
    text = out.read_text()
    setup = {r["setting"]: r["value"] for r in table_with(text, "setting")}
    assert setup["command"].startswith("`advmoe bench serve --duration 10`")
    lone = next(r for r in table_with(text, "expert 0 share")
                if (r["images/request"], r["variant"], r["concurrency"]) == ("8", "sparse", "1 after 64"))
    assert (lone["images/s"], lone["p50 ms"], lone["p99 ms"], lone["model ms per call"]) == ("210.0", "6.0", "100.0",
                                                                                             "4.0")
    speedup = next(r for r in table_with(text, "served vs dense twin")
                   if (r["images/request"], r["concurrency"]) == ("1", "32"))
    # served 210/100, model only and server CPU 11/5, MACs 0.56/0.19, then against masked 210/120 and 0.36/0.19
    assert list(speedup.values())[3:] == ["2.10x", "2.10x", "2.20x", "2.95x", "1.75x", "1.75x", "1.89x"]
    outside = table_with(text, "model CPU dense/sparse")[0]
    assert (outside["model CPU dense/sparse"], outside["handling + locust CPU ms, sparse"]) == ("2.50x", "2.0")
    written = json.loads((out.parent / "efficiency.json").read_text())
    assert written["rows"][0]["images_per_s"] == 210 and written["command"] == "advmoe bench serve --duration 10"


def test_the_probe_check_is_reported_beside_the_same_level_without_probes(tmp_path):
    measured = result()
    measured["rows"] += [level("sparse", 1, "32 without probes", 200, 100.0, 5.0),
                         level("sparse", 1, "32 with probes", 150, 180.0, 6.5)]
    measured["probe_check"] = {"onnxruntime": {"probes": 7, "failed": 0, "images_per_probe": 8, "steps": 20,
                                               "median_s": 1.25}}
    out = tmp_path / "efficiency.md"
    serve_report.write_report(measured, out, "advmoe bench serve --probe-check")
    probes = table_with(out.read_text(), "median probe s")
    assert [list(r.values())[1:] for r in probes] == [["without probes", "200.0", "50.0", "100.0", "5.0", "0", "-"],
                                                      ["with probes", "150.0", "90.0", "180.0", "6.5", "7", "1.2"]]


def test_report_only_rerenders_the_same_report_from_the_json(tmp_path):
    out = tmp_path / "efficiency.md"
    serve_report.write_report(result(), out, "advmoe bench serve --duration 10")
    before = out.read_text()
    out.unlink()
    assert bench_serve.main(["--report-only", "--out", str(out)]) == 0
    assert out.read_text() == before


def test_report_only_without_a_json_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        bench_serve.main(["--report-only", "--out", str(tmp_path / "efficiency.md")])
    assert exit.value.code == 2 and "efficiency.json not found" in capsys.readouterr().err


def test_each_plotted_series_has_its_own_colour_and_marker():
    series = [(v, r) for r in ("onnxruntime", "torch") for v in ("sparse", "masked", "dense twin")]
    styles = serve_plots.styles(series)
    assert len(set(colour for colour, _ in styles.values())) == len(set(m for _, m in styles.values())) == 6
    with pytest.raises(ValueError):
        serve_plots.styles(series + [("another", "onnxruntime")])


class FakeServer:
    url = "http://127.0.0.1:1"

    def processes(self):
        return []


def test_every_round_visits_every_variant_and_a_lone_request_follows_the_burst(monkeypatch):
    from benchmarks import serve_measure

    calls = []

    def measured_level(server, processes, concurrency, duration_s, images, n, warmup):
        calls.append((concurrency, n, warmup))
        return level("sparse", n, str(concurrency), 100.0, 10.0, 2.0)

    monkeypatch.setattr(serve_measure, "measured_level", measured_level)
    variants = [v for v in serve_measure.VARIANTS if v[2] == "onnxruntime"]
    load = serve_measure.Load({v: FakeServer() for v in variants}, variants, [b""], 1.0, (1, 8), LEVELS)
    for round_index in range(2):
        load.round(round_index, (1, 32, 64), (1, 8), after_burst=True)
    assert {key: len(found) for key, found in load.samples.items()} == {
        (v, n, name): 2 for v in variants for n in (1, 8) for name in LEVELS}
    # each variant's concurrency 64 is followed at once by concurrency 1 without warm-up requests
    bursts = [i for i, call in enumerate(calls) if call[0] == 64]
    assert len(bursts) == 12 and all(calls[i + 1] == (1, calls[i][1], 0) for i in bursts)
    # the rows keep the report's order (variant, request size, level), not the rotating order measured in
    assert list(load.samples) == [(v, n, name) for v in variants for n in (1, 8) for name in LEVELS]


def shipped_result(sparse_cpu=1.5, twin_cpu=3.0, sparse_rate=300, equal_rate=280):
    rows = []
    for name in ("1", "8", "32"):
        rows += [dict(level("sparse", 1, name, sparse_rate, 20.0, sparse_cpu), runtime="auto"),
                 dict(level("dense twin", 1, name, 200, 30.0, twin_cpu), runtime="auto"),
                 dict(level("dense, its MACs", 1, name, equal_rate, 25.0, 2.0), runtime="auto")]
    return {"checkpoint": "checkpoints/x", "rows": rows, "models": {"sparse": "sparse MoE", "dense twin": "dense twin "
            "(width 0.25)", "dense, its MACs": "dense, its MACs (width 0.15625)"},
            "served_runtime": {"sparse": "onnxruntime", "dense twin": "onnxruntime", "dense, its MACs": "torch"},
            "macs": {"sparse": 10e6, "dense twin": 28e6, "dense, its MACs": 11e6}, "concurrency": [1, 8, 32],
            "levels": ["1", "8", "32"], "images_per_request": [1], "duration_s": 5, "rounds": 1, "workers": 0,
            "threads": 0, "cpus": 2, "machine": "x86_64", "torch": "2.14.1", "advmoe": "0.1.0"}


@pytest.mark.parametrize("sparse_cpu, equal_rate, met", [(1.5, 280, [True, True]), (2.0, 320, [False, False])])
def test_a_shipped_model_is_judged_against_its_twins_cpu_and_the_dense_model_of_its_macs(sparse_cpu, equal_rate, met):
    from benchmarks import serve_shipped

    found = serve_shipped.checks(shipped_result(sparse_cpu=sparse_cpu, equal_rate=equal_rate))
    assert [c.measured for c in found[:2]] == pytest.approx([3.0 / sparse_cpu, 300 / equal_rate])
    assert [c.met for c in found[:2]] == met and found[2].met
    # the CPU outside the model (1 ms each here) bounds the first ratio, however cheap the model: 3.0 / 1.0;
    # the models' own CPU (2.0 and 0.5 ms) bounds it however cheap the handling: 2.0 / 0.5
    assert serve_shipped.cpu_ceiling(shipped_result(sparse_cpu=1.5)) == pytest.approx((1.0, 3.0, 4.0))


def test_the_shipped_report_names_each_served_runtime_and_rerenders_from_its_json(tmp_path, capsys):
    from benchmarks import serve_shipped

    out = tmp_path / "shipped.md"
    serve_shipped.write_report(shipped_result(), out, "advmoe bench serve --checkpoint checkpoints/x")
    models = table_with(out.read_text(), "served runtime")
    assert [(m["variant"], m["served runtime"], m["MACs vs sparse"]) for m in models] == [
        ("sparse", "onnxruntime", "1.00x"), ("dense twin", "onnxruntime", "2.80x"), ("dense, its MACs", "torch", "1.10x")]
    first = out.read_text()
    assert bench_serve.main(["--report-only", "--checkpoint", "checkpoints/x", "--out", str(out)]) == 0
    assert out.read_text() == first
