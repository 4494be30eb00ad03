"""The frontier study on a tiny plan, trained once per session and shared by the modules that read
its runs and result files (the study end to end, shipping)."""
from types import SimpleNamespace

import pytest

from studies.design import Plan, Row
from studies.report import write_report
from studies.run import run_study
from training.config import resolve

TINY = dict(preset="fmnist-tiny", moe_width=0.0625, epochs=1, train_examples=64, eval_examples=8,
            autoattack_examples=4, select_examples=6, seeds=(0,), headline_seeds=(0,),
            attack_settings={"pgd_steps": (2, 3), "route_steps": 2, "square_queries": 10, "apgd_iterations": 3,
                             "sweep_examples": 4, "gradient_examples": 4})


@pytest.fixture(scope="session")
def study(tmp_path_factory, fashion_dir):
    """A dense row and a MoE headline row, one seed each: trained, evaluated, AutoAttack added, reported."""
    root = tmp_path_factory.mktemp("frontier")
    plan = Plan(**TINY, runs=str(root / "runs"),
                overrides={"data_dir": str(fashion_dir), "val_size": 50, "val_examples": 8, "batch_size": 32,
                           "eval_steps": 2, "router_width": 4})
    base = resolve(plan.preset, **plan.overrides)
    rows = [Row("pgd-at-tiny", "dense PGD-AT, tiny", "pgd-at", "resnet18", 0.0625, (0,)),
            Row("advmoe-tiny", "AdvMoE, tiny", "advmoe", base.model, 0.0625, (0,), headline=True)]
    results = run_study(plan, rows, root / "results", log=lambda *a: None)
    write_report(root / "results", root / "frontier.md", plan)
    return SimpleNamespace(plan=plan, rows=rows, root=root, results=results)
