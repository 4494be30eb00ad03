"""The benchmark runs and reports consistent numbers; its speed targets are read from its
printed ratios (docs/sparse.md), never asserted on time here."""
import json

from benchmarks import bench_sparse


def test_run_reports_every_model_and_batch():
    rows = bench_sparse.run(archs=("resnet18",), batch_sizes=(1, 5), width=0.125, rounds=1)
    assert [(r["router"], r["batch"]) for r in rows] == [("shared", 1), ("shared", 5), ("per_layer", 1), ("per_layer", 5)]
    for r in rows:
        assert min(r["dense_ms"], r["masked_ms"], r["sparse_ms"]) > 0
        assert r["speedup_vs_dense"] == r["dense_ms"] / r["sparse_ms"]
        assert r["max_abs_diff"] <= 1e-5  # the sparse model it timed computes what masked does
        assert r["routes_differ"] == 0  # and routes as it does (in float32 on the CPU)
        assert r["closest_tie"] >= 0
        assert r["sparse_gmacs"] < r["masked_gmacs"]


def test_main_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_sparse.main(["--archs", "vgg16", "--routers", "per_layer", "--batch-sizes", "2",
                              "--width", "0.125", "--rounds", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| moe_vgg16 | per_layer | 2 |" in printed
    assert json.loads(out.read_text())[0]["arch"] == "vgg16"
