"""The GPU benchmark's code, run on the CPU (no graphs to capture here): every row it would
measure on a GPU, the router split as asked."""
import json

from benchmarks import bench_gpu


def test_rows_time_both_models_in_each_mode_and_precision_with_the_split_asked(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--device", "cpu", "--image-sizes", "32", "--batch-sizes", "4", "--precisions", "fp32", "bf16",
                           "--splits", "0.5", "0.75", "1.0", "--rounds", "1", "--warmup", "1", "--width", "0.25",
                           "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["precision"], r["mode"], r["split"]) for r in rows] == [
        (p, m, s) for p in ("fp32", "bf16") for m in ("graphs", "eager") for s in (0.5, 0.75, 1.0)]
    for r in rows:
        assert r["expert0_share"] == r["split"] and r["dense_ms"] > 0 and r["moe_ms"] > 0 and r["mac_ratio"] > 1
    assert "| 32 | 4 | bf16 | graphs | 0.75 (0.75) |" in capsys.readouterr().out
