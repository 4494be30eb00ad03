"""The frontier study's report: a table per row, the verdicts as tables and short lines, a plot, and
the same numbers as JSON beside it (reports/robustness_frontier.md, .png, .json), written from
whatever result files there are."""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import advmoe
from advmoe.io import atomic_write_text
from advmoe.settings import number_text
from advmoe.stats import mean_std, percent

from .columns import header
from .curves import regime
from .speed import BATCHES, Speed, read_speeds, with_dense_alike
from .design import Plan, default_rows
from .estimate import BUDGET_HOURS, CURVES_BUDGET_HOURS, study_cost
from .falls import DROP
from .plot import plot
from .record import RunResult, load_results, worst
from .verdicts import Findings, verdicts

COLUMNS = ("clean", "pgd-10", "pgd-50", "apgd", "route-fixed", "router")


def percent_cell(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _autoattack_cell(runs: list[RunResult]) -> str:
    aa = [r.autoattack for r in runs if r.autoattack]
    if not aa:
        return "-"
    cell = f"{percent([a['accuracy'] for a in aa])} ({percent([a['worst_case_with_main'] for a in aa])})"
    if len(aa) < len(runs):  # a seed whose checkpoint was gone before its AutoAttack ran
        cell += f", seed {', '.join(r.run_label for r in runs if r.autoattack)}"
    return cell


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table: every table of the report is built here."""
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def table(grouped: dict[str, list[RunResult]]) -> str:
    headers = (["row", "MACs per image", "seeds", *(header(k) for k in COLUMNS), "**worst case**", "PGD - worst",
                "route flips", "busiest expert", "AutoAttack (worst with the rest)"])
    rows = []
    for runs in grouped.values():
        cells = [percent([r.accuracy.get(k) for r in runs]) if any(k in r.accuracy for r in runs) else "-" for k in COLUMNS]
        moe = runs[0].route_flip_rate is not None
        # the busiest expert's share of the clean test routes: 100 % is a collapsed router, a dense model in effect
        rows.append([runs[0].row.label, f"{runs[0].macs_per_image / 1e6:.2f} M", ", ".join(r.run_label for r in runs),
                     *cells, f"**{percent([r.worst_case for r in runs])}**", percent([r.pgd_minus_worst for r in runs]),
                     percent([r.route_flip_rate for r in runs]) if moe else "-",
                     percent([max(r.expert_share) for r in runs]) if runs[0].expert_share else "-", _autoattack_cell(runs)])
    return markdown(headers, rows)


def comparisons_table(found: Findings) -> str:
    headers = ["row", "against", "other row", "worst case", "other's", "difference", "spread", "verdict",
               "by attack, where it does not beat"]
    return markdown(headers, [[c.row, c.against, c.other, percent_cell(c.mean), percent_cell(c.other_mean), f"{100 * c.difference:+.1f}",
                               "-" if c.one_run else percent_cell(c.spread), c.verdict,
                               ", ".join(f"{header(k)} {100 * v:+.1f}" for k, v in c.by_attack.items())]
                              for c in found.comparisons])


def _ms_cell(speed: Speed | None) -> str:
    return "-" if speed is None else " / ".join(f"{speed.ms_per_image[b]:.3f}" for b in BATCHES)


def gaps_table(found: Findings, speeds: dict[str, Speed]) -> str:
    headers = ["MoE row", "experts", "router", "MACs per image", f"ms per image, batch {' / '.join(map(str, BATCHES))}",
               "worst case", "dense curve at its MACs", "difference", "spread", "verdict"]
    return markdown(headers, [[g.row, str(g.experts), g.router, f"{g.macs / 1e6:.2f} M", _ms_cell(speeds.get(g.key)),
                               percent_cell(g.mean), percent_cell(g.dense),
                               "-" if g.difference is None else f"{100 * g.difference:+.1f}",
                               "-" if g.dense is None else percent_cell(max(g.spread, g.dense_spread)), g.verdict]
                              for g in found.gaps])


def dense_curves_table(found: Findings, speeds: dict[str, Speed]) -> str:
    headers = ["epochs", "dense row", "MACs per image", f"ms per image, batch {' / '.join(map(str, BATCHES))}",
               "worst case"]
    return markdown(headers, [[str(c.trained["epochs"]), p.row, f"{p.macs / 1e6:.2f} M", _ms_cell(speeds.get(p.key)),
                               f"{percent_cell(p.mean)} ± {percent_cell(p.spread)}"]
                              for c in found.dense_curves for p in c.points])


def curves_table(found: Findings) -> str:
    headers = ["row", "validation PGD by epoch (%)", "route-fixed by epoch (%)", "curve", "one-epoch falls of a run",
               "rolled back (collapse guard)"]
    rows = []
    for c in found.curves:
        fell = "; ".join(f"seed {run}: {percent_cell(a)} → {percent_cell(b)} at epoch {e}" + (f", {percent_cell(n)} the next" if n is not None else "")
                         for run, e, a, b, n in c.falls)
        state = f"{c.state} ({100 * (c.pgd[-1] - c.pgd[-2]):+.1f} last epoch)" if c.state == "still rising" else c.state
        rows.append([c.row, ", ".join(percent_cell(v) for v in c.pgd), ", ".join(percent_cell(v) for v in c.route_fixed) if c.route_fixed
                     else "-", state, fell or "-", "; ".join(f"seed {run}: epoch {e}" for run, e in c.rollbacks) or "-"])
    return markdown(headers, rows)


def _seeds_met(met: bool | None) -> str:
    return "too few runs" if met is None else "met" if met else "missed"


def finding_lines(found: Findings) -> list[str]:
    """The findings that are no comparison, one short line each."""
    lines = [f"Router collapsed: {row} (busiest expert {100 * share:.0f} % of clean routes); not counted as a mixture."
             for row, share in found.collapsed.items()]
    lines += [f"Above the best MoE row on one run: {row}; a second seed would tell." for row in found.ahead_on_one_run]
    if found.width:
        w = found.width
        by_cost = ", ".join(f"{macs / 1e6:.1f} M: {percent_cell(v)} %" for macs, v in w["rows"])
        lines.append(f"Dense PGD-AT by cost: {by_cost}. {w['macs_ratio']:.1f}x the MACs: {100 * w['rise']:+.1f} points "
                     f"(spread {percent_cell(w['spread'])}); capacity limits robustness here: {'yes' if w['capacity_limits'] else 'no'}.")
    if found.twin:
        t = found.twin
        kept = f"{100 * t['kept']:.0f} %" if t["kept"] is not None else "-"
        lines.append(f"{t['row']} against its twin ({t['twin']}): {t['macs_ratio']:.2f}x the MACs, keeps {kept} of its "
                     f"worst case ({percent_cell(t['worst'])} vs {percent_cell(t['twin_worst'])} %).")
    lines += [f"Masking check failed: {row}, seed {seed} ({detail})." for row, seed, detail in found.masking]
    for t in found.targets:
        met = t.met
        lines.append(f"Targets, {t.row}: {t.pgd.upper()} minus worst {100 * t.pgd_minus_worst:.1f} points (≤ 5: "
                     f"{'met' if met['pgd_gap'] else 'missed'}); route flips {percent_cell(t.route_flips)} % (≤ 10: "
                     f"{'met' if met['route_flips'] else 'missed'}); worst case over {t.runs} runs ± "
                     f"{percent_cell(t.worst_std)}, lowest {100 * t.lowest_under_mean:.1f} points under the mean (≤ 1.5 and "
                     f"≤ 3 over 3 runs or more: {_seeds_met(met['seeds'])}).")
    return lines


def against_curve(found: Findings, speeds: dict[str, Speed] | None = None) -> str:
    """The MoE rows against the dense curve (worst case by MACs, interpolated), where there is one;
    with each row's measured speed where `speeds` has it."""
    speeds = speeds or {}
    if not found.dense_curves:
        return ""
    above = regime(found.gaps)
    return f"""
## Against the dense curve

Dense PGD-AT's worst case by MACs per image (mean ± std over runs):

{dense_curves_table(found, speeds)}

{gaps_table(found, speeds)}

Above the dense curve beyond the spread: {'; '.join(above) if above else 'none'}.
"""


def cost_line(cost: dict | None) -> str:
    if not cost:
        return ""
    budget = f" (budget {cost['budget_hours']} h)" if cost["budget_hours"] else ""
    line = (f"Study cost: {cost['runs_finished']} of {cost['runs_planned']} planned runs, {cost['hours_recorded']:.1f} h "
            f"recorded{budget}, {cost['hours_at_quickest']:.1f} h at each row's quickest run per stage"
            f" ({cost['rows_started']} of {cost['rows']} rows started).")
    if cost["autoattack_missing"]:
        line += f" AutoAttack missing on: {', '.join(cost['autoattack_missing'])}."
    return line + "\n"


def summary(grouped: dict[str, list[RunResult]], found: Findings, cost: dict | None,
            speeds: dict[str, Speed] | None = None) -> dict:
    """The report's numbers as JSON: each row's mean and spread, and every finding."""
    rows = {k: {"label": runs[0].row.label, "macs_per_image": runs[0].macs_per_image, "runs": [r.name for r in runs],
                "worst_case": worst(runs),
                "accuracy": {a: mean_std([r.accuracy.get(a) for r in runs]) for a in COLUMNS if a in runs[0].accuracy}}
            for k, runs in grouped.items()}
    findings = asdict(found)
    for c, found_c in zip(findings["comparisons"], found.comparisons):  # what the tables say, not only what it is from
        c.update(difference=found_c.difference, verdict=found_c.verdict)
    for t, found_t in zip(findings["targets"], found.targets):
        t["met"] = found_t.met
    for f, found_f in zip(findings["fall_census"], found.fall_census):
        f.update(kind=found_f.kind, recovered=found_f.recovered)
    for g, found_g in zip(findings["gaps"], found.gaps):
        g.update(difference=found_g.difference, verdict=found_g.verdict)
    return {"rows": rows, "findings": findings, "cost": cost, "speeds": {k: vars(v) for k, v in (speeds or {}).items()}}


def falls_section(found: Findings, runs: int) -> str:
    """Every one-epoch fall of the study's runs, its kind, and whether the run came back."""
    falls = found.fall_census
    if not falls:
        return ""

    def moved(f, k):
        return f"{percent_cell(f.before[k])} → {percent_cell(f.after[k])}" if f.after[k] is not None else "-"

    headers = ["row", "seed", "epoch", "clean", "PGD-10", "APGD", "training attack", "routes PGD-10 flips",
               "PGD-10 the next epoch", "kind"]
    rows = [[f.row, f.run, f"{f.epoch} of {f.epochs}",
             *(moved(f, k) for k in ("clean", "pgd", "apgd", "train_attack", "route_flips")),
             percent_cell(f.next_pgd) if f.next_pgd is not None else "- (last epoch)", f.kind] for f in falls]
    kinds = Counter(f.kind for f in falls)
    back = [f.recovered for f in falls if f.recovered is not None]
    return f"""
## Falls

Each epoch where a run's validation PGD-10 or APGD fell {100 * DROP:.0f} points or more (validation images, %).
{len(falls)} falls in {len({(f.row, f.run) for f in falls})} of {runs} runs; by kind: {', '.join(f'{k} {n}' for k, n in kinds.most_common())};
back within {100 * DROP:.0f} points the next epoch: {sum(back)} of {len(back)}; in the last epoch: {len(falls) - len(back)}.

{markdown(headers, rows)}
"""


def speed_path(report: Path) -> Path:
    """Where `--time-rows` records the rows' speeds for `report`."""
    return report.with_name(f"{report.stem}_speed.json")


def write_report(results: Path, report: Path, plan: Plan, command: str | None = None) -> str:
    grouped = load_results(results)
    if not grouped:
        return ""
    found = verdicts(grouped)
    cost = study_cost(grouped, default_rows(plan), CURVES_BUDGET_HOURS if plan.curves else BUDGET_HOURS)
    speeds = with_dense_alike(grouped, read_speeds(speed_path(report)))
    plot(grouped, report.with_suffix(".png"), speeds)
    first = next(iter(grouped.values()))[0].config
    runs = [r for rs in grouped.values() for r in rs]
    hours = sum(sum(r.seconds.values()) for r in runs) / 3600
    folder = os.path.relpath(results, report.parent)
    devices = sorted({r.config.get("device", "cpu").split(":")[0] for r in runs})
    where = " and ".join({"cpu": "the CPU", "cuda": "a GPU"}.get(d, d) for d in devices)
    text = f"""# Robustness against cost on {advmoe.get_dataset_info(first['dataset']).title}

Produced by `{command or 'advmoe study frontier --report-only'}` (studies/) from the result files in
[{folder}/]({folder}/): {len(runs)} runs, {hours:.1f} hours on {where}. Numbers also in [{report.with_suffix('.json').name}]({report.with_suffix('.json').name}).
{cost_line(cost)}
linf ε = {number_text(first['eps'])}. Training: {first['epochs']} epochs, {first['train_examples'] or 'all'} training images,
PGD-{first['attack_steps']} training attack, checkpoints selected on validation PGD accuracy. Evaluation: the first
{plan.eval_examples} test images. The **worst case** counts an image only if it survives every attack of its row.
AutoAttack (headline rows, first {plan.autoattack_examples} images): APGD-CE and APGD-T from the main evaluation,
FAB-T and Square added; in brackets the worst case with everything else. Mean ± standard deviation over a row's runs.
How to read it: [docs/frontier.md](../docs/frontier.md).

![frontier]({report.with_suffix('.png').name})

{table(grouped)}

## Comparisons

{comparisons_table(found)}

{chr(10).join('- ' + line for line in finding_lines(found))}
{against_curve(found, speeds)}
## Validation curves

{curves_table(found)}
{falls_section(found, len(runs))}"""
    atomic_write_text(report.with_suffix(".json"), json.dumps(summary(grouped, found, cost, speeds), indent=1) + "\n")
    atomic_write_text(report, text)
    return text
