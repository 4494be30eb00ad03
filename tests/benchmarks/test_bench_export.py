"""The export benchmark runs end to end; its ratios are read from its printout, not asserted."""
from benchmarks import bench_export


def test_run_reports_each_runtime(capsys):
    # aoti is left out: two more compiles would take a minute; tests/export checks its export.
    rows = bench_export.run(routers=("shared",), batch_sizes=(2,), width=0.125, rounds=1,
                            runtimes=("torch", "onnxruntime", "torchscript"))
    assert [(r["runtime"], r["batch"]) for r in rows] == [("torch", 2), ("onnxruntime", 2), ("torchscript", 2)]
    for r in rows:
        assert min(r["dense_ms"], r["sparse_ms"]) > 0
        assert r["speedup_vs_dense"] == r["dense_ms"] / r["sparse_ms"]
    assert rows[0]["speedup_vs_torch_sparse"] == 1.0
    assert rows[1]["speedup_vs_masked"] == rows[1]["masked_ms"] / rows[1]["sparse_ms"]
    assert rows[2]["masked_ms"] is None  # TorchScript holds sparse execution only
    out = capsys.readouterr().out
    assert "| moe_resnet18 | shared | 2 | onnxruntime |" in out and "| moe_resnet18 | shared | 2 | torchscript |" in out
