"""The serving benchmark's report: targets judged from the measured rows, tables and plots written
whole. (The measurement itself starts six servers; it runs as `advmoe bench serve`, not here.)"""
import json

from benchmarks import bench_serve

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


def test_targets_pass_or_say_by_how_much_they_miss():
    passed = bench_serve.verdicts(result())
    assert len(passed) == 11 and all(line.endswith("PASS") for line in passed), passed
    missed = bench_serve.verdicts(result(sparse=150, dense_cpu=9.0, sparse_p99=250, lone_p50=12.0, errors=3))
    text = "\n".join(missed)
    assert "1 image(s)/request, concurrency 32: server CPU per image, dense twin / sparse 1.80x (9.0 vs 5.0 ms; " \
           "target 1.9x): MISS by 0.10x (-5%)" in text
    assert "1 image(s)/request, concurrency 32: sparse throughput 1.50x the dense twin (target 1.8x): MISS by 0.30x " \
           "(-17%)" in text
    assert "8 image(s)/request, concurrency 32: sparse throughput 1.50x the dense twin (target 2.0x): MISS by 0.50x" \
           in text
    assert "concurrency 1 right after 64: sparse p50 12.0 ms vs the model's 4.0 ms per call + 5 ms: MISS by 3.0 ms" \
           in text
    assert "MISS at concurrency 1 (250 vs 200 ms), concurrency 32 (250 vs 200 ms)" in text
    assert "concurrency 64: 3 errors over all variants (target 0): MISS" in text


def test_report_files_are_written_together(tmp_path):
    out = tmp_path / "reports" / "efficiency.md"
    bench_serve.write_report(result(), out, "advmoe bench serve --duration 10")
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "efficiency.json", "efficiency.md", "efficiency_latency.png", "efficiency_macs.png", "efficiency_throughput.png"]
    text = out.read_text()
    assert "`advmoe bench serve --duration 10`" in text
    assert "| onnxruntime | 8 | sparse | 1 after 64 | 210.0 | 6.0 | 90.0 | 100.0 | 0 | 8.0 | 4.0 | 5.0 | 0.50 |" in text
    # served, model-only and server-CPU ratios beside the MAC ratios
    assert "| onnxruntime | 1 | 32 | 2.10x | 2.10x | 2.20x | 2.95x | 1.75x | 1.75x | 1.89x |" in text
    assert "| onnxruntime | 1 | sparse | 210.0 | 2.4 | 4.0 | 1.0 | 5.0 | 1.0 | 6.0 |" in text  # where the time goes
    assert "costs 10.0 CPU ms per dense-twin image and 4.0 per sparse image (2.50x)" in text
    assert json.loads((out.parent / "efficiency.json").read_text())["rows"][0]["images_per_s"] == 210


def test_the_probe_check_is_reported_beside_the_same_level_without_probes(tmp_path):
    measured = result()
    measured["rows"] += [level("sparse", 1, "32 without probes", 200, 100.0, 5.0),
                         level("sparse", 1, "32 with probes", 150, 180.0, 6.5)]
    measured["probe_check"] = {"onnxruntime": {"probes": 7, "failed": 0, "images_per_probe": 8, "steps": 20,
                                               "median_s": 1.25}}
    out = tmp_path / "efficiency.md"
    bench_serve.write_report(measured, out, "advmoe bench serve --probe-check")
    text = out.read_text()
    assert "| onnxruntime | without probes | 200.0 | 50.0 | 100.0 | 5.0 | 0 | - |" in text
    assert "| onnxruntime | with probes | 150.0 | 90.0 | 180.0 | 6.5 | 7 | 1.2 |" in text
