import pytest

from benchmarks import bench_methods

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny batches: one thread is faster on a busy machine


def test_every_method_is_timed_with_its_attack_steps():
    rows, cfg, batch, batches = bench_methods.run("fmnist-tiny", batch_size=8, rounds=1)
    steps = {r["method"]: r["attack_steps"] for r in rows}
    assert steps == {"standard": 0, "pgd-at": 2, "trades": 2, "moe-at": 2, "router-only": 2, "advmoe": 4,
                     "route-aware": 8, "advmoe --no-recraft": 2, "route-aware --no-recraft": 4}
    assert all(r["ms_per_batch"] > 0 for r in rows)
    assert next(r for r in rows if r["method"] == "moe-at")["relative_to_moe_at"] == 1.0


def test_the_width_and_a_subset_of_methods_can_be_chosen():
    rows, cfg, _, _ = bench_methods.run("fmnist-tiny", batch_size=4, rounds=1, width=0.0625, methods=["standard"])
    assert cfg.width == 0.0625 and [r["method"] for r in rows] == ["standard", "moe-at"]
