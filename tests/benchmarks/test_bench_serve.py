"""The serving benchmark's report: targets judged from the measured rows, tables and plots written
whole. (The measurement itself starts six servers; it runs as `advmoe bench serve`, not here.)"""
import json

from benchmarks import bench_serve


def level(variant, runtime, concurrency, images_per_s, p99):
    return {"variant": variant, "runtime": runtime, "concurrency": concurrency, "requests": 100, "errors": 0,
            "images_per_s": images_per_s, "p50_ms": p99 / 2, "p95_ms": p99 * 0.9, "p99_ms": p99,
            "mean_batch_size": 8.0, "expert_share": [0.5, 0.5], "compute_ms_per_image": 1000 / images_per_s / 2,
            "cpu_ms_per_image": {"api": 4.0, "model": 2000 / images_per_s, "probe": 0.0, "load generator": 1.0}}


def result(sparse, masked, dense, sparse_p99=100.0, dense_p99=200.0):
    rows = [level("sparse", "onnxruntime", c, sparse, sparse_p99) for c in (1, 32)]
    rows += [level("masked", "onnxruntime", c, masked, 150.0) for c in (1, 32)]
    rows += [level("dense twin", "onnxruntime", c, dense, dense_p99) for c in (1, 32)]
    return {"rows": rows, "macs": {"sparse": 0.19e9, "masked": 0.36e9, "dense": 0.56e9}, "concurrency": [1, 32],
            "duration_s": 10, "rounds": 1, "image_size": 32, "width": 1.0, "router_blocks": 3, "cpus": 2,
            "machine": "x86_64", "torch": "2.14.1", "advmoe": "0.1.0"}


def test_targets_pass_or_say_by_how_much_they_miss():
    passed = bench_serve.verdicts(result(sparse=210, masked=120, dense=100))
    assert len(passed) == 3 and all(line.endswith("PASS") for line in passed)
    missed = bench_serve.verdicts(result(sparse=150, masked=120, dense=100, sparse_p99=250))
    assert "1.50x the dense twin (target 2.0x): MISS by 0.50x (-25%)" in missed[0]
    assert "1.25x the masked (target 1.5x): MISS by 0.25x (-17%)" in missed[1]
    assert missed[2].endswith("MISS by 50 ms")


def test_report_files_are_written_together(tmp_path):
    out = tmp_path / "reports" / "efficiency.md"
    bench_serve.write_report(result(sparse=210, masked=120, dense=100), out, "advmoe bench serve --duration 10")
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "efficiency.json", "efficiency.md", "efficiency_latency.png", "efficiency_macs.png", "efficiency_throughput.png"]
    text = out.read_text()
    assert "`advmoe bench serve --duration 10`" in text and "| onnxruntime | sparse | 32 | 210.0 |" in text
    assert "| onnxruntime | 32 | 2.10x | 2.95x | 1.75x | 1.89x |" in text  # measured vs MAC ratios
    assert "| onnxruntime | sparse | 210.0 | 2.4 | 9.5 | 4.0 | 1.0 | 14.5 |" in text  # where the time goes
    assert "2.4 ms per sparse image (2.10x)" in text and "burn 5.0 (sparse) and 5.0 (dense) CPU ms" in text
    assert json.loads((out.parent / "efficiency.json").read_text())["rows"][0]["images_per_s"] == 210
