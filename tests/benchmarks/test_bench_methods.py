import pytest

from benchmarks import bench_methods

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny batches: one thread is faster on a busy machine


def test_every_method_is_timed_with_its_attack_steps():
    rows, cfg, batch, batches = bench_methods.run("fmnist-tiny", batch_size=8, rounds=1)
    steps = {r["method"]: r["attack_steps"] for r in rows}
    assert steps == {"standard": 0, "pgd-at": 2, "trades": 2, "moe-at": 2, "router-only": 2, "advmoe": 4,
                     "route-aware": 8, "route-aware (every expert)": 8, "advmoe --no-recraft": 2,
                     "route-aware --no-recraft": 4}
    assert all(r["ms_per_batch"] > 0 for r in rows)
    assert next(r for r in rows if r["method"] == "moe-at")["relative_to_moe_at"] == 1.0


def test_the_width_and_a_subset_of_methods_can_be_chosen():
    rows, cfg, _, _ = bench_methods.run("fmnist-tiny", batch_size=4, rounds=1, width=0.0625, methods=["standard"])
    assert cfg.width == 0.0625 and [r["method"] for r in rows] == ["standard", "moe-at"]


def test_under_the_chosen_gate_gradient_each_method_is_timed_against_computing_every_expert():
    rows, cfg, _, _ = bench_methods.run("fmnist-tiny", batch_size=8, rounds=1, methods=["advmoe"], gate_grad="chosen")
    assert cfg.gate_grad == "chosen"
    by_label = {r["method"]: r for r in rows}
    assert set(by_label) == {"advmoe", "advmoe (every expert)", "advmoe --no-recraft", "moe-at", "moe-at (every expert)"}
    assert by_label["advmoe"]["speedup_over_every_expert"] == pytest.approx(
        by_label["advmoe (every expert)"]["ms_per_batch"] / by_label["advmoe"]["ms_per_batch"])
    assert by_label["advmoe (every expert)"]["speedup_over_every_expert"] is None
    assert all(0.5 <= r["busiest_expert"] <= 1 for r in rows)  # two experts: the busier has half or more


def test_under_the_softmax_gate_gradient_only_the_forced_routes_skip():
    """AdvMoE's attack and updates all reach the router; route-aware training's second attack
    forces the route, so it is timed against computing every expert there too."""
    rows, cfg, _, _ = bench_methods.run("fmnist-tiny", batch_size=4, rounds=1, methods=["advmoe", "route-aware"],
                                        gate_grad="softmax")
    by_label = {r["method"]: r for r in rows}
    assert "route-aware (every expert)" in by_label and by_label["route-aware"]["speedup_over_every_expert"] > 0
    others = [r for label, r in by_label.items() if not label.startswith("route-aware")]
    assert all(r["speedup_over_every_expert"] is None and "every expert" not in r["method"] for r in others)
