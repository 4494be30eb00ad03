"""The benchmark runs and reports consistent numbers; its speed targets are read from its
printed ratios (docs/sparse.md), never asserted on time here."""
import json

import pytest

import advmoe
from benchmarks import bench_sparse
from helpers import fmnist_moe_checkpoint


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


def test_the_imagenet_stem_model_is_timed_with_the_router_stride_given():
    rows = {stride: bench_sparse.run(archs=("resnet18",), routers=("shared",), batch_sizes=(2,), image_size=96,
                                     width=0.0625, rounds=1, router_stride=stride)[0] for stride in (1, 2)}
    assert rows[2]["sparse_gmacs"] < rows[1]["sparse_gmacs"] and rows[2]["dense_gmacs"] == rows[1]["dense_gmacs"]
    assert all(r["max_abs_diff"] <= 1e-5 and r["routes_differ"] == 0 for r in rows.values())


def test_main_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_sparse.main(["--archs", "vgg16", "--routers", "per_layer", "--batch-sizes", "2",
                              "--width", "0.125", "--rounds", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| moe_vgg16 | per_layer | 2 |" in printed
    assert json.loads(out.read_text())[0]["arch"] == "vgg16"


def test_a_checkpoint_is_timed_against_its_twin_and_the_dense_model_of_its_macs(tmp_path, capsys):
    from benchmarks.shipped_speed import WIDTH_STEP, dense_args

    checkpoint = fmnist_moe_checkpoint(tmp_path)
    assert bench_sparse.main(["--checkpoint", str(checkpoint), "--batch-sizes", "1", "4", "--rounds", "1",
                              "--json", str(tmp_path / "r.json")]) == 0
    assert "| dense twin (width 0.0625) |" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["batches"] == [1, 4]
    moe, twin, equal = result["models"].values()
    names = list(result["models"])
    assert names[:2] == ["sparse MoE", "dense twin (width 0.0625)"] and names[2].startswith("dense, its MACs (width ")
    assert twin["macs"] > moe["macs"] and equal["macs"] >= moe["macs"]
    arch, args = dense_args(advmoe.load_checkpoint(checkpoint))
    narrower = advmoe.create_model(arch, **{**args, "width": equal_width(result) - WIDTH_STEP})
    assert advmoe.count_macs(narrower, (1, 28, 28)) < moe["macs"]  # the narrowest dense model of at least its MACs
    for m in result["models"].values():
        assert {"onnxruntime", "torch", "pt2"} == set(m["ms"]) and m["runtime"] in m["ms"]
        assert all(len(ms) == 2 and min(ms) > 0 for ms in m["ms"].values())


def equal_width(result) -> float:
    return float(list(result["models"])[2].split("width ")[1].rstrip(")"))


def test_changes_time_the_checkpoints_architecture_changed_and_untrained(tmp_path, capsys):
    from benchmarks.shipped_speed import run

    checkpoint = fmnist_moe_checkpoint(tmp_path)
    base = advmoe.count_macs(advmoe.load_checkpoint(checkpoint), (1, 28, 28))
    wider = run(checkpoint, batch_sizes=(2,), rounds=1, changes={"width": 0.125, "router_stride": 2})
    assert wider["changes"] == {"width": 0.125, "router_stride": 2} and wider["models"]["sparse MoE"]["macs"] > base
    assert "dense twin (width 0.125)" in wider["models"]
    with pytest.raises(SystemExit):  # a misspelt setting is a usage error that names the known ones
        bench_sparse.main(["--checkpoint", str(checkpoint), "--changes", "widht=2"])
    assert "unknown model settings ['widht']" in capsys.readouterr().err
