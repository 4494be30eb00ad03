"""The frontier study's design: the dense widths of its rows, and the settings a call may change."""
import pytest

from studies.design import RESULTS, WIDTH_STEP, Plan, default_rows, macs_per_image, parse_settings, width_for_macs
from studies.run import commands, finished
from training.config import resolve


def test_the_dense_row_of_equal_macs_costs_what_the_moe_model_costs():
    cfg = resolve("fmnist-tiny")
    target = macs_per_image(cfg.model, 0.5, cfg)
    width = width_for_macs(target, "resnet18", cfg)
    assert abs(macs_per_image("resnet18", width, cfg) / target - 1) < 0.15
    # the narrowest whole-channel width that costs at least the MoE model: never a cheaper dense model
    assert width / WIDTH_STEP == round(width / WIDTH_STEP)
    assert macs_per_image("resnet18", width, cfg) >= target > macs_per_image("resnet18", width - WIDTH_STEP, cfg)


@pytest.mark.parametrize("moe_width", [0.25, 0.125])
def test_the_study_has_three_dense_widths_including_the_equal_macs_one_and_the_twin(moe_width):
    """At 0.125 the width of the MoE model's MACs (7/64) and the twin's (8/64) have no whole-channel
    width between them; the third dense row is then twice the twin's width, not a second copy of it."""
    plan = Plan(moe_width=moe_width)
    dense = [r for r in default_rows(plan) if r.method == "pgd-at"]
    widths = [r.width for r in dense]
    assert len(set(widths)) == len({r.key for r in dense}) == 3
    base = resolve(plan.preset)
    moe_macs = macs_per_image(base.model, moe_width, base)
    assert macs_per_image(dense[0].model, widths[0], base) >= moe_macs and moe_width in widths


def test_the_moe_rows_are_labelled_by_their_methods_entry():
    labels = [r.label for r in default_rows(Plan()) if r.is_moe]
    assert labels == ["MoE-AT, width 0.25", "AdvMoE, width 0.25", "route-aware AT, width 0.25"]


def test_settings_are_read_as_toml_values():
    assert parse_settings(["attack_steps=3", "eps=0.1", "balance=true", 'router="shared"']) == {
        "attack_steps": 3, "eps": 0.1, "balance": True, "router": "shared"}


def test_the_curves_add_dense_widths_and_each_moe_width_with_each_number_of_experts_and_router():
    plan = Plan(curves=True)
    rows = default_rows(plan)
    assert len({r.key for r in rows}) == len(rows)
    dense = sorted(r.width for r in rows if r.method == "pgd-at" and not r.is_moe)
    assert dense == sorted(plan.dense_widths) and len(dense) >= 6
    curve = [r for r in rows if r.settings]
    configs = {r.key: plan.config(r, 0) for r in curve}
    points = {(r.width, configs[r.key].num_experts, configs[r.key].router_blocks) for r in curve}
    assert {(w, n, 1) for w in plan.moe_widths for n in plan.experts} | {(min(plan.moe_widths), 2, 2)} == points
    assert all(c.expert_loss == "ce" and c.attack_steps == 3 and c.method == "advmoe" for c in configs.values())
    # four experts: the same MACs per image as two (but for the router's output layer); the larger router costs more
    macs = {(r.width, configs[r.key].num_experts, configs[r.key].router_blocks):
            macs_per_image(r.model, r.width, configs[r.key]) for r in curve}
    assert all(macs[w, 4, 1] == pytest.approx(macs[w, 2, 1], rel=1e-3) for w in plan.moe_widths)  # the router's last layer
    assert macs[0.125, 2, 2] > macs[0.125, 2, 1]


def test_the_curves_reuse_the_committed_runs_of_their_settings():
    """The two-expert row at the study's MoE width is the committed `ce_steps3` row, run for run."""
    plan = Plan(curves=True)
    [row] = [r for r in default_rows(plan) if r.key == "advmoe-w0.25-ce_steps3"]
    assert all(finished(RESULTS, row, seed, plan.config(row, seed)) for seed in plan.seeds)


def test_each_job_of_the_curves_selects_its_own_row(tmp_path):
    plan = Plan(curves=True)
    rows = default_rows(plan)
    jobs = commands(plan, [r for r in rows if r.settings], tmp_path, ["--curves"])
    assert {job.split("--rows ")[1].split()[0] for job in jobs} == {r.key for r in rows if r.settings}
