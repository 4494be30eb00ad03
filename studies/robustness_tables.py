"""The robustness report's text, from its .json alone (studies.robustness.document): tables, a few
templated verdict lines, and what the numbers rest on. Nothing here evaluates or measures."""
from __future__ import annotations

import statistics

from advmoe.stats import mean_std, percent
from training.methods import METHODS

from .columns import header

DENSE, ADVMOE = "dense " + METHODS["pgd-at"].label, METHODS["advmoe"].label
COLUMNS = ("clean", "pgd-10", "pgd-50", "autoattack", "route-fixed", "router", "square", "robust")
# (reference, attack): points the attack takes off the reference, per seed (paired on the same images)
PAIRS = (("pgd-10", "autoattack"), ("pgd-10", "robust"), ("pgd-10", "route-fixed"), ("pgd-50", "square"))
# the throughput table's rows: what each attack is at the default settings
RATES = {"clean": "clean", "pgd-10": "PGD-10", "pgd-50": "PGD-50", "autoattack": "AutoAttack (4 attacks)",
         "route-fixed": "route-fixed (2 routes x PGD-50)", "router": "router attack (PGD-50)",
         "square": "Square alone (5,000 queries)"}
COLLAPSED = 0.9  # a router that sends more of the clean images than this to one expert has collapsed


def cells(accuracy: dict) -> list[str]:
    return ["n/a" if key not in accuracy else f"{100 * accuracy[key]:.1f}" for key in COLUMNS]


def accuracy_table(runs: dict[str, list[dict]]) -> str:
    lines = ["| method | " + " | ".join(map(header, COLUMNS)) + " | PGD-10 on 2,000 (training report) |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for label, docs in runs.items():
        row = [percent([d["accuracy"].get(key) for d in docs]) for key in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(row) + f" | {percent([d['pgd_2000'] for d in docs])} |")
    return "\n".join(lines)


def drops(docs: list[dict]) -> dict[str, tuple[float, float]]:
    """Points taken off PGD-10 (PGD-50 for Square) by each attack, per seed (paired), mean ± std."""
    return {attack: mean_std([100 * (d["accuracy"][ref] - d["accuracy"][attack]) for d in docs])
            for ref, attack in PAIRS if all(attack in d["accuracy"] and ref in d["accuracy"] for d in docs)}


def drop_table(runs: dict[str, list[dict]]) -> str:
    lines = ["| method | " + " | ".join(f"{header(ref)} - {header(attack)}" for ref, attack in PAIRS)
             + " | route flips under the router attack (%) | prediction flips given a route flip (%) "
             "| sanity checks passed |", "|---" * (len(PAIRS) + 4) + "|"]
    for label, docs in runs.items():
        d = drops(docs)
        row = [f"{d[k][0]:.1f} ± {d[k][1]:.1f}" if k in d else "dense" for _, k in PAIRS]
        router = [x["router"] for x in docs]
        for key in ("route_flip_rate", "prediction_flip_given_route_flip"):
            row.append(percent([r and r[key] for r in router]) if any(router) else "dense")
        row.append(f"{sum(x['sanity']['passed'] for x in docs)} of {len(docs)}")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def collapsed_seeds(docs: list[dict]) -> int:
    """Seeds whose router sends over COLLAPSED of the clean images to one expert."""
    return sum(max(d["experts"]["clean_share"]) > COLLAPSED for d in docs)


def verdicts(runs: dict[str, list[dict]]) -> list[str]:
    """Short templated lines; every number in them comes from the evaluations."""
    (moe, moe_sd), (dense, dense_sd) = drops(runs[ADVMOE])["autoattack"], drops(runs[DENSE])["autoattack"]
    more = "more" if moe > dense else "less" if moe < dense else "as much"
    lines = [f"AutoAttack off PGD-10 (paired per seed): {ADVMOE} {moe:.1f} ± {moe_sd:.1f} points, {DENSE} "
             f"{dense:.1f} ± {dense_sd:.1f}: {more} for {ADVMOE}."]
    moe_runs = {label: docs for label, docs in runs.items() if docs[0]["moe"]}
    if moe_runs:
        lines.append(f"Router collapsed (over {100 * COLLAPSED:.0f} % of the clean images to one expert): "
                     + ", ".join(f"{label} {collapsed_seeds(docs)} of {len(docs)} seeds"
                                 for label, docs in moe_runs.items()) + ".")
    return lines


def sanity_lines(runs: dict[str, list[dict]]) -> list[str]:
    lines = [f"- FAIL, {label} seed {d['seed']}: {check['name']} ({check['detail']})"
             for label, docs in runs.items() for d in docs
             for check in d["sanity"]["checks"] if check["passed"] is False]
    flags = sorted({f for docs in runs.values() for d in docs for f in d["autoattack_flags"]})
    return (lines or ["- Every check passed on every checkpoint."]) + [f"- AutoAttack reported: {f}" for f in flags]


def throughput(runs: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Examples per CPU-second of each attack, averaged over the MoE and over the dense checkpoints."""
    table: dict[str, dict[str, float]] = {}
    for kind, labels in (("MoE", [label for label in runs if label != DENSE]), ("dense", [DENSE])):
        docs = [d for label in labels for d in runs[label]]
        for name in RATES:
            rates = [d["throughput"][name] for d in docs if name in d["throughput"]]
            if rates:
                table.setdefault(name, {})[kind] = statistics.mean(rates)
    return table


def throughput_table(runs: dict[str, list[dict]]) -> str:
    lines = ["| attack | MoE: examples per CPU-second | dense: examples per CPU-second |", "|---|---|---|"]
    for key, rate in throughput(runs).items():
        moe, dense = ("" if rate.get(kind) is None else f"{rate[kind]:.3g}" for kind in ("MoE", "dense"))
        lines.append(f"| {RATES[key]} | {moe} | {dense} |")
    return "\n".join(lines)


def estimate_table(estimate: dict) -> str:
    lines = ["| component | attacked images | passes per attacked image (gradient + forward) | CPU hours "
             "| Fashion-MNIST: measured / counted |", "|---|---|---|---|---|"]
    for name, c in estimate["components"].items():
        ratio = c["fmnist_measured_over_counted"]
        lines.append(f"| {name.upper()} | {c['attacked']:.0f} | {c['gradient_passes']} + {c['forward_passes']} | "
                     f"{c['cpu_hours']:.0f} | {'' if ratio is None else f'{ratio:.1f}x'} |")
    return "\n".join(lines)


def also_section(also: list[dict]) -> str:
    """Other checkpoints (e.g. the shipped model), each on its own number of images."""
    if not also:
        return ""
    lines = ["## Other checkpoints", "",
             "| checkpoint | images | " + " | ".join(map(header, COLUMNS)) + " | PGD-10 on 2,000 | sanity |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    for d in also:
        pgd = "" if d["pgd_2000"] is None else f"{100 * d['pgd_2000']:.1f}"
        sanity = "passed" if d["sanity"]["passed"] else "failed: " + ", ".join(d["sanity"]["failed"])
        lines.append(f"| `{d['checkpoint']}` | {d['examples']} | " + " | ".join(cells(d["accuracy"]))
                     + f" | {pgd} | {sanity} |")
    return "\n".join(lines) + "\n"


def per_run_lines(runs: dict[str, list[dict]]) -> list[str]:
    def one(d: dict) -> str:
        a = {k: f"{100 * v:.0f}" for k, v in d["accuracy"].items()}
        text = (f"seed {d['seed']}: clean {a['clean']}, PGD-10 {a['pgd-10']}, AA {a['autoattack']}, "
                f"worst {100 * d['robust_accuracy']:.0f}")
        if d["moe"]:
            shares = ", ".join(f"{100 * s:.0f}" for s in d["experts"]["clean_share"])
            text += f", route-fixed {a['route-fixed']}, experts {shares} %"
        return text
    return [f"- {label}: " + "; ".join(one(d) for d in docs) for label, docs in runs.items()]


def setup(doc: dict) -> str:
    """What was evaluated, how, and what the sample size allows."""
    runs, n = doc["runs"], doc["examples"]
    evaluations = [d for docs in runs.values() for d in docs]
    aa_costs = [1 / d["throughput"]["autoattack"] for d in evaluations]  # CPU-seconds per image
    return f"""Produced by `{doc['command']}` (studies/robustness.py). The evaluations took
{sum(d['seconds'] for d in evaluations) / 60:.0f} min of wall time and {sum(d['cpu_seconds'] for d in evaluations) / 60:.0f} min
of CPU time with {doc['threads']} torch thread(s) (this invocation: {doc['seconds'] / 60:.0f} min; it reuses an eval.json
whose checkpoint and settings match). Checkpoints: the {len(evaluations)} runs in `{doc['runs_dir']}` (trained by
`python -m studies.methods`); each one's eval.json lies next to its `best/` checkpoint. Threat model: linf
ε = {doc['eps']:g} in [0, 1] pixels. Images: the first {n} of the test set, the same for every checkpoint.
Mean ± standard deviation over seeds {', '.join(map(str, doc['seeds']))}.

Attacks (pyautoattack {doc['versions']['pyautoattack']}, torch {doc['versions']['torch']}):
PGD-10 and PGD-50 (step ε/4, random start, through the straight-through router); AutoAttack standard
(APGD-CE, APGD-T, FAB-T with 9 target classes, Square with 5,000 queries); route-fixed (every router
forced to each expert in turn, PGD-50 on that route while the real router is pushed towards it, each
candidate judged on the real model, the worst kept per image); router attack (PGD-50 on the KL of the
router scores); Square alone on every clean-correct image. The worst case counts an image as robust only
if it is classified correctly clean and under every attack. Verdicts come from the real model (sparse
execution); every adversarial image is checked to lie within ε and [0, 1].

**Sample size.** AutoAttack costs {min(aa_costs):.0f}-{max(aa_costs):.0f} CPU-seconds per image for these checkpoints
on this CPU (table below). One accuracy on {n} images has a standard error of up to
{100 * (0.25 / n) ** 0.5:.0f} points; the same images are used for every checkpoint, so differences between attacks
on one checkpoint (paired) are far more precise than absolute levels or differences between methods. The
last column (PGD-10 on 2,000 images, from the methods comparison) shows how typical these {n} images are."""


def cost_section(doc: dict) -> str:
    estimate, n = doc["cifar10_estimate"], doc["examples"]
    cp, scenario, hours = estimate["cifar_pass_seconds"], estimate["scenario"], estimate["cpu_hours"]
    return f"""MoE ResNet-18 at full width (N = 2, r = 0.5, ResNet-20 router) measured here: {1000 * cp['forward_backward']:.0f} ms per
image for a forward and input-gradient pass (masked execution, which the straight-through gradient needs)
and {1000 * cp['forward']:.0f} ms per forward (sparse), on one thread, batch 64. Passes per attacked image are counted from
pyautoattack's standard settings (studies/cost.py). The CIFAR-10 scenario assumes {100 * scenario['clean']:.0f} % clean
accuracy (the third-party reference run: 85.67 %), {100 * scenario['survive_apgd_ce']:.0f} % surviving APGD-CE and
{100 * scenario['robust']:.0f} % reaching Square (RobustBench ResNet-18 anchors: 43-52 %). The last column applies
the same count to the Fashion-MNIST AdvMoE model and divides the CPU time measured above by it: the few
survivors of a {n}-image run make small batches whose fixed costs the count leaves out, so the count is a
lower bound.

{estimate_table(estimate)}

Total: about {hours:.0f} CPU-hours for {scenario['images']:,} images ({hours / 24:.0f} days on one core, about
{hours / 16:.0f} hours on 16 ideally used cores). PGD-10, PGD-50, the route-fixed and the router attack add
{estimate['suite_extra_cpu_hours']:.0f} CPU-hours ({estimate['suite_gradient_passes']:.0f} gradient passes per image). Square alone
on every clean-correct image adds about {100 * (scenario['clean'] - scenario['robust']) / scenario['robust']:.0f} % to
Square's line at most (images that are not robust are usually fooled in far fewer than 5,000 queries)."""


def render(doc: dict) -> str:
    """The report (markdown) from its .json."""
    runs = doc["runs"]
    return f"""# Robustness of the Fashion-MNIST runs under `advmoe eval`

{setup(doc)}

## Accuracy (%)

{accuracy_table(runs)}

## What the stronger attacks take off PGD-10

Points, mean ± std over seeds of the per-seed differences on the same images.

{drop_table(runs)}

{chr(10).join('- ' + line for line in verdicts(runs))}

## Sanity checks (thresholds fixed in evaluation/sanity.py before any result)

{chr(10).join(sanity_lines(runs))}

## Throughput on this CPU (CPU seconds)

{throughput_table(runs)}

AutoAttack's rate depends on how many images survive its first attack: APGD-T and FAB-T (9 target
classes x 100 iterations each) and Square (5,000 queries) run on the survivors only.

## What a full CIFAR-10 AutoAttack run costs

{cost_section(doc)}

{also_section(doc['also'])}
## Per run (%)

{chr(10).join(per_run_lines(runs))}
"""
