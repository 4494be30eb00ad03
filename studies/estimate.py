"""What the frontier study costs: the estimate before it runs (--plan: finished runs at what they
took, the others from a measured training step and counted attack passes), and the hours its
result files record."""
from __future__ import annotations

import functools
import math

import advmoe

from .cost import ATTACKED, ROUTE_ATTACKS, SANITY_SWEEP, gradient_passes, pass_seconds, step_seconds
from .design import Plan, Row, macs_per_image, run_name
from .record import RunResult
from .run import finished

BUDGET_HOURS = 12  # what the study at its defaults was sized for on a 2-core CPU
CURVES_BUDGET_HOURS = 14  # the study with its curves (--curves), on the same CPU
STAGES = ("train", "eval", "autoattack")
MAIN_PASSES = ("pgd-10", "pgd-50", "apgd-ce", "apgd-t", "route-fixed", "router")  # the main evaluation's attacks
AUTOATTACK_PASSES = ("fab-t", "square")  # what AutoAttack adds to them


def _mean_hours(runs: list[RunResult], stage: str) -> float | None:
    took = [r.seconds[stage] / 3600 for r in runs if stage in r.seconds]
    return sum(took) / len(took) if took else None


def _train_hours(cfg, per_pass) -> float:
    """Training hours of one run from one measured step and the validation's counted passes."""
    train_size = cfg.train_examples or len(advmoe.load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.val_size))
    batches = math.ceil(train_size / cfg.batch_size)
    val_passes = cfg.val_examples * (1 + cfg.eval_steps)
    return cfg.epochs * (batches * step_seconds(cfg) + val_passes * per_pass()) / 3600


def estimate(plan: Plan, rows: list[Row], results=None) -> list[dict]:
    """Hours per row (all its seeds). A row with finished runs in `results` costs what they took
    (their mean; a repeat costs what the first runs took); otherwise training comes from a measured
    step and evaluation from counted passes."""
    out = []
    for row in rows:
        cfg = plan.config(row, row.seeds[0])
        landed = [r for s in row.seeds for k in sorted({0, plan.repeat})
                  if (r := finished(results, row, s, plan.config(row, s), k))] if results else []
        per_pass = functools.cache(lambda: pass_seconds(cfg))  # timed only if something needs it
        train_h = _mean_hours(landed, "train")
        if train_h is None:
            train_h = _train_hours(cfg, per_pass)
        eval_h = _mean_hours(landed, "eval")
        if eval_h is None:
            attacks = tuple(a for a in MAIN_PASSES if cfg.is_moe or a not in ROUTE_ATTACKS)
            eval_h = plan.eval_examples * (gradient_passes(attacks) + SANITY_SWEEP) * per_pass() / 3600
        if row.headline:
            aa_h = _mean_hours(landed, "autoattack")
            eval_h += aa_h if aa_h is not None else (
                plan.autoattack_examples * gradient_passes(AUTOATTACK_PASSES, ATTACKED) * per_pass() / 3600)
        out.append({"row": row.key, "seeds": len(row.seeds), "train_hours": train_h * len(row.seeds),
                    "eval_hours": eval_h * len(row.seeds), "macs": macs_per_image(row.model, row.width, cfg),
                    "measured_runs": len(landed)})
    return out


def estimate_table(costs: list[dict], done: set[str], rows: list[Row], repeat: int = 0) -> str:
    lines = ["| row | MACs per image | seeds | training (h) | evaluation (h) | from |", "|---|---|---|---|---|---|"]
    for c in costs:
        source = f"{c['measured_runs']} finished run(s)" if c["measured_runs"] else "a measured step"
        lines.append(f"| {c['row']} | {c['macs'] / 1e6:.2f} M | {c['seeds']} | {c['train_hours']:.1f} "
                     f"| {c['eval_hours']:.1f} | {source} |")
    remaining = sum((c["train_hours"] + c["eval_hours"]) * sum(run_name(r.key, s, repeat) not in done for s in r.seeds)
                    / len(r.seeds) for c, r in zip(costs, rows))
    total = sum(c["train_hours"] + c["eval_hours"] for c in costs)
    lines.append(f"\nestimated: {total:.1f} hours in all on this machine, {remaining:.1f} hours for the runs not done "
                 f"yet ({len(done)} done)")
    return "\n".join(lines)


def study_cost(grouped: dict[str, list[RunResult]], rows: list[Row], budget_hours: float = BUDGET_HOURS) -> dict | None:
    """What the study itself (its rows at their seeds; no variant, extra seed or repeat) has cost:
    the hours its result files record, and those hours again at each row's quickest run, stage by
    stage, which is what a machine with nothing else on it would have taken. The quickest run of
    a stage is sought among every run of the row's own settings, its extra seeds and repeats
    included: each is the same work, one more sample of what the stage costs."""
    planned = {r.key: r for r in rows}
    own = [r for runs in grouped.values() for r in runs
           if r.row.key in planned and r.seed in planned[r.row.key].seeds and not r.repeat]
    if not own:
        return None
    quickest = 0.0
    for row in rows:
        for stage in STAGES:
            times = [r.seconds[stage] for r in grouped.get(row.key, []) if stage in r.seconds]
            if times and (stage != "autoattack" or row.headline):
                quickest += min(times) * len(row.seeds) / 3600
    return {"rows": len(rows), "rows_started": sum(bool(grouped.get(r.key)) for r in rows),
            "runs_planned": sum(len(r.seeds) for r in rows), "runs_finished": len(own),
            "hours_recorded": sum(sum(r.seconds.values()) for r in own) / 3600, "hours_at_quickest": quickest,
            "budget_hours": budget_hours if all(r.config.get("device", "cpu") == "cpu" for r in own) else None,
            "autoattack_missing": [r.name for r in own if planned[r.row.key].headline and "autoattack" not in r.seconds]}
