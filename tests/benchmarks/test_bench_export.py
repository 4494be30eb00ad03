"""The export benchmark runs end to end; its ratios are read from its printout, not asserted."""
from benchmarks import bench_export


def test_run_reports_both_runtimes(capsys):
    rows = bench_export.run(routers=("shared",), batch_sizes=(2,), width=0.125, rounds=1)
    assert [(r["runtime"], r["batch"]) for r in rows] == [("torch", 2), ("onnxruntime", 2)]
    for r in rows:
        assert min(r["dense_ms"], r["masked_ms"], r["sparse_ms"]) > 0
        assert r["speedup_vs_masked"] == r["masked_ms"] / r["sparse_ms"]
    assert "| moe_resnet18 | shared | 2 | onnxruntime |" in capsys.readouterr().out
