from benchmarks import bench_methods


def test_every_method_is_timed_with_its_attack_steps():
    rows, cfg, batch, batches = bench_methods.run("fmnist-tiny", batch_size=8, rounds=1)
    steps = {r["method"]: r["attack_steps"] for r in rows}
    assert steps == {"standard": 0, "pgd-at": 2, "trades": 2, "moe-at": 2, "router-only": 2, "advmoe": 4,
                     "route-aware": 8, "advmoe --no-recraft": 2}
    assert all(r["ms_per_batch"] > 0 for r in rows)
    assert next(r for r in rows if r["method"] == "moe-at")["relative_to_moe_at"] == 1.0
