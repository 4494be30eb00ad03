"""The runs of reports/fmnist_methods.md re-evaluated with `advmoe eval`: reports/fmnist_robustness.md.

    python -m evaluation.robustness_report --runs runs/report --n-examples 20 --eps 0.1 --threads 1

Every run (a folder of --runs holding best/, trained by `python -m training.report`; named by the
method and seed in its config) has its best checkpoint evaluated with the
whole suite on the same first N test images; eval.json goes next to the checkpoint and is reused
when the checkpoint, eps and settings are unchanged (a cut-off report resumes). The report gives
mean ± standard deviation over seeds of every attack's accuracy and of the per-example worst
case, how much AutoAttack and the worst case take off PGD-10 for each method, the sanity checks,
the throughput of each attack on this CPU, and what a full CIFAR-10 AutoAttack run would cost.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import advmoe
from advmoe.checkpoint import read_config, read_metrics
from advmoe.io import atomic_write_text
from advmoe.stats import mean_std, percent

from .robustness import ATTACKS, EvalSettings, evaluate_checkpoint, file_sha256

COLUMNS = (("clean", "clean"), ("pgd-10", "PGD-10"), ("pgd-50", "PGD-50"), ("autoattack", "AutoAttack"),
           ("route-fixed", "route-fixed"), ("router", "router attack"), ("square", "Square alone"),
           ("robust", "worst case"))
DENSE, ADVMOE = "dense PGD-AT", "AdvMoE"
METHOD_LABELS = {"pgd-at": DENSE, "moe-at": "MoE-AT", "advmoe": ADVMOE}  # in the tables' order
# A CIFAR-10 scenario for the cost estimate: clean accuracy of a third-party run of the reference
# code (85.67 %, docs/method.md) and a robust accuracy near RobustBench's ResNet-18 anchors (43-52 %).
CIFAR = {"images": 10_000, "clean": 0.85, "survive_apgd_ce": 0.52, "robust": 0.48}


def _reusable(checkpoint: Path, settings: EvalSettings, n: int) -> dict | None:
    file = checkpoint / "eval.json"
    if not file.is_file():
        return None
    doc = json.loads(file.read_text())
    wanted = json.loads(json.dumps(asdict(settings)))
    same = (doc.get("settings") == wanted and doc.get("examples") == n
            and doc.get("checkpoint_sha256") == file_sha256(checkpoint / "model.safetensors"))
    return doc if same else None


def run_label(training: dict) -> str:
    """How the report names a run: its method, and AdvMoE's router loss when it is not the default."""
    label = METHOD_LABELS.get(training["method"], training["method"])
    if training["method"] == "advmoe" and training.get("router_loss") == "model":
        label += ", router loss model"
    return label


def evaluate_or_reuse(best: Path, n: int, eps: float, name: str, log=print) -> dict:
    """eval.json of a checkpoint with the default suite: reused when it matches, else made."""
    if not (best / "model.safetensors").is_file():
        raise FileNotFoundError(f"{best} is missing: train the runs first (python -m training.report)")
    doc = _reusable(best, EvalSettings(eps=eps), n)
    if doc is None:
        start = time.perf_counter()
        doc = evaluate_checkpoint(best, n_examples=n, eps=eps, progress=False)
        log(f"{name}: robust {100 * doc['robust_accuracy']:.1f} % ({time.perf_counter() - start:.0f} s)")
    else:
        log(f"{name}: reusing {best / 'eval.json'}")
    doc["pgd_2000"] = read_metrics(best).get("test_pgd_accuracy")
    return doc


def evaluate_runs(runs: Path, seeds: list[int], n: int, eps: float, log=print) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    found = []
    for best in sorted(runs.glob("*/best")):
        training = read_config(best).get("training") or {}
        if training.get("seed") in seeds:
            found.append((run_label(training), training["seed"], best))
    if not found:
        raise FileNotFoundError(f"no run of seeds {seeds} in {runs}: train the runs first (python -m training.report)")
    order = list(METHOD_LABELS.values())
    found.sort(key=lambda t: (order.index(t[0]) if t[0] in order else len(order), t[0], t[1]))
    for label, seed, best in found:
        doc = evaluate_or_reuse(best, n, eps, f"{label}, seed {seed}", log)
        doc["seed"] = seed
        results.setdefault(label, []).append(doc)
    return results


def also_section(docs: list[dict]) -> str:
    """Other checkpoints (e.g. the shipped model), each on its own number of images."""
    if not docs:
        return ""
    lines = ["## Other checkpoints", "",
             "| checkpoint | images | " + " | ".join(name for _, name in COLUMNS) + " | PGD-10 on 2,000 | sanity |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    for d in docs:
        cells = ["n/a" if key not in d["accuracy"] else f"{100 * d['accuracy'][key]:.1f}" for key, _ in COLUMNS]
        pgd = "" if d["pgd_2000"] is None else f"{100 * d['pgd_2000']:.1f}"
        lines.append(f"| `{d['checkpoint']}` | {d['examples']} | " + " | ".join(cells)
                     + f" | {pgd} | {'passed' if d['sanity']['passed'] else 'failed: ' + ', '.join(d['sanity']['failed'])} |")
    return "\n".join(lines) + "\n"


def accuracy_table(results: dict[str, list[dict]]) -> str:
    lines = ["| method | " + " | ".join(name for _, name in COLUMNS) + " | PGD-10 on 2,000 (training report) |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for label, docs in results.items():
        cells = [percent([d["accuracy"].get(key) for d in docs]) for key, _ in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {percent([d['pgd_2000'] for d in docs])} |")
    return "\n".join(lines)


# (reference, attack): points the attack takes off the reference, per seed (paired on the same images)
PAIRS = (("pgd-10", "autoattack"), ("pgd-10", "robust"), ("pgd-10", "route-fixed"), ("pgd-50", "square"))


def drops(docs: list[dict]) -> dict[str, tuple[float, float]]:
    """Points taken off PGD-10 (PGD-50 for Square) by each attack, per seed (paired), mean ± std."""
    return {attack: mean_std([100 * (d["accuracy"][ref] - d["accuracy"][attack]) for d in docs])
            for ref, attack in PAIRS if all(attack in d["accuracy"] and ref in d["accuracy"] for d in docs)}


def drop_table(results: dict[str, list[dict]]) -> str:
    lines = ["| method | PGD-10 - AutoAttack | PGD-10 - worst case | PGD-10 - route-fixed | PGD-50 - Square alone "
             "| route flips under the router attack (%) | prediction flips given a route flip (%) | sanity checks passed |",
             "|---|---|---|---|---|---|---|---|"]
    for label, docs in results.items():
        d = drops(docs)
        cells = [f"{d[k][0]:.1f} ± {d[k][1]:.1f}" if k in d else "dense" for k in ("autoattack", "robust", "route-fixed", "square")]
        router = [x["attacks"].get("router", {}) for x in docs]
        flips = percent([r.get("route_flip_rate") for r in router]) if any(router) else "dense"
        given = percent([r.get("prediction_flip_given_route_flip") for r in router]) if any(router) else "dense"
        passed = sum(x["sanity"]["passed"] for x in docs)
        lines.append(f"| {label} | {' | '.join(cells)} | {flips} | {given} | {passed} of {len(docs)} |")
    return "\n".join(lines)


def aa_verdict(results: dict[str, list[dict]]) -> str:
    (moe, moe_sd), (dense, dense_sd) = drops(results[ADVMOE])["autoattack"], drops(results[DENSE])["autoattack"]
    more = "more than" if moe > dense else "less than" if moe < dense else "as much as"
    return (f"AutoAttack lowers AdvMoE's robust accuracy {more} the dense baseline's: by {moe:.1f} ± {moe_sd:.1f} "
            f"points from PGD-10 for AdvMoE against {dense:.1f} ± {dense_sd:.1f} for dense PGD-AT "
            f"(paired on the same images, per seed).")


def findings(results: dict[str, list[dict]]) -> list[str]:
    """Sentences computed from the evaluations (no number in them is typed in)."""
    lines = [aa_verdict(results)]
    for label, docs in results.items():
        square = drops(docs)["square"]
        where = "below" if square[0] > 0 else "above" if square[0] < 0 else "level with"
        lines.append(f"{label}: gradient-free Square alone ends {abs(square[0]):.1f} ± {square[1]:.1f} points {where} "
                     f"PGD-50{' through the straight-through router' if docs[0]['moe'] else ''}.")
        if docs[0]["moe"]:
            collapsed = sum(max(d["experts"]["clean_share"]) > 0.9 for d in docs)
            lines.append(f"{label}: the router sends over 90 % of the clean images to one expert in {collapsed} of "
                         f"{len(docs)} seeds.")
    return lines


def sanity_lines(results: dict[str, list[dict]]) -> list[str]:
    lines = []
    for label, docs in results.items():
        for d in docs:
            for check in d["sanity"]["checks"]:
                if check["passed"] is False:
                    lines.append(f"- FAIL, {label} seed {d['seed']}: {check['name']} ({check['detail']})")
    return lines or ["- Every check passed on every checkpoint."]


def throughput(results: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Examples per CPU-second of each attack, averaged over the MoE and over the dense checkpoints."""
    table: dict[str, dict[str, float]] = {}
    for kind, labels in (("MoE", [l for l in results if l != DENSE]), ("dense", [DENSE])):
        docs = [d for l in labels for d in results[l]]
        for name in ("clean", "pgd-10", "pgd-50", "autoattack", "route-fixed", "router", "square"):
            rates = [d["attacks"][name]["examples_per_cpu_second"] for d in docs if name in d["attacks"]]
            if rates:
                table.setdefault(name, {})[kind] = statistics.mean(rates)
    return table


def _pass_seconds(model: torch.nn.Module, shape: tuple[int, ...], batch: int, reps: int = 2) -> tuple[float, float]:
    """CPU seconds per image of a forward+input-gradient pass (masked) and of a forward (sparse)."""
    model = model.eval().requires_grad_(False)
    x = torch.rand(batch, *shape)
    fast = advmoe.set_execution(copy.deepcopy(model), "sparse")  # a model that has not run yet copies
    timings = []
    for run in ("fb", "f"):
        best = float("inf")
        for _ in range(reps + 1):
            start = time.process_time()
            if run == "fb":
                xg = x.clone().requires_grad_(True)
                torch.autograd.grad(model(xg).sum(), xg)
            else:
                with torch.no_grad():
                    fast(x)
            best = min(best, time.process_time() - start)
        timings.append(best / batch)
    return timings[0], timings[1]


# Passes per attacked image of AutoAttack standard (pyautoattack's settings): forward+input-gradient
# passes and forward-only passes. APGD: one gradient per iteration; FAB-T: a gradient and a
# prediction per iteration; Square: one query (forward) per iteration, all 5,000 for a robust image.
AA_PASSES = {"apgd-ce": (100, 0), "apgd-t": (9 * 100, 0), "fab-t": (9 * 100, 9 * 100), "square": (0, 5000)}
# The rest of the suite with its default settings, gradient passes per image (2 experts).
SUITE_GRADIENT_PASSES = {"pgd-10": 10, "pgd-50": 50, "route-fixed": 2 * 50, "router": 50}


def cifar_estimate(results: dict[str, list[dict]]) -> dict:
    """CPU cost of AutoAttack standard on CIFAR-10, MoE ResNet-18 at full width: the passes each
    component makes per attacked image (AA_PASSES) times one pass of that model measured here,
    times the images each component attacks in the CIFAR scenario. The same count applied to the
    Fashion-MNIST model says how far the measured time is above it (small batches of survivors)."""
    tiny = advmoe.load_checkpoint(results[ADVMOE][0]["checkpoint"])
    tiny_fb, tiny_f = _pass_seconds(tiny, (1, 28, 28), batch=16)
    torch.manual_seed(0)
    cifar = advmoe.create_model("moe_resnet18", num_classes=10, in_channels=3, image_size=32, num_experts=2,
                                expert_ratio=0.5, router="shared")
    cifar_fb, cifar_f = _pass_seconds(cifar, (3, 32, 32), batch=64)
    attacked = {"apgd-ce": CIFAR["clean"], "apgd-t": CIFAR["survive_apgd_ce"], "fab-t": CIFAR["survive_apgd_ce"],
                "square": CIFAR["robust"]}
    components = {}
    for name, share in attacked.items():
        fb, f = AA_PASSES[name]
        measured = [p["cpu_seconds"] / p["attacked"] for d in results[ADVMOE]
                    for p in d["attacks"]["autoattack"]["components"] if p["name"] == name and p["attacked"]]
        counted = fb * tiny_fb + f * tiny_f
        components[name] = {"gradient_passes": fb, "forward_passes": f, "attacked": share * CIFAR["images"],
                            "cpu_hours": share * CIFAR["images"] * (fb * cifar_fb + f * cifar_f) / 3600,
                            "fmnist_measured_over_counted": statistics.mean(measured) / counted if measured else None}
    return {"tiny_pass_seconds": {"forward_backward": tiny_fb, "forward": tiny_f},
            "cifar_pass_seconds": {"forward_backward": cifar_fb, "forward": cifar_f},
            "scenario": CIFAR, "components": components,
            "cpu_hours": sum(c["cpu_hours"] for c in components.values()),
            "suite_extra_cpu_hours": CIFAR["images"] * sum(SUITE_GRADIENT_PASSES.values()) * cifar_fb / 3600}


def render(results: dict[str, list[dict]], estimate: dict, command: str, seconds: float, n: int, eps: float,
           seeds: list[int], also: list[dict] = ()) -> str:
    first = results[ADVMOE][0]
    rate = throughput(results)
    names = {"clean": "clean", "pgd-10": "PGD-10", "pgd-50": "PGD-50", "autoattack": "AutoAttack (4 attacks)",
             "route-fixed": "route-fixed (2 routes x PGD-50)", "router": "router attack (PGD-50)", "square": "Square alone (5,000 queries)"}
    rate_lines = ["| attack | MoE: examples per CPU-second | dense: examples per CPU-second |", "|---|---|---|"]
    for key, label in names.items():
        if key in rate:
            moe, dense = rate[key].get("MoE"), rate[key].get("dense")
            rate_lines.append(f"| {label} | {moe:.3g} | {'' if dense is None else f'{dense:.3g}'} |")
    comp = estimate["components"]
    estimate_lines = ["| component | attacked images | passes per attacked image (gradient + forward) | CPU hours "
                      "| Fashion-MNIST: measured / counted |", "|---|---|---|---|---|"]
    for name, c in comp.items():
        ratio = c["fmnist_measured_over_counted"]
        estimate_lines.append(f"| {name.upper()} | {c['attacked']:.0f} | {c['gradient_passes']} + {c['forward_passes']} | "
                              f"{c['cpu_hours']:.0f} | {'' if ratio is None else f'{ratio:.1f}x'} |")
    cp = estimate["cifar_pass_seconds"]
    per_run = []
    for label, docs in results.items():
        per_run.append(f"- {label}: " + "; ".join(
            f"seed {d['seed']}: clean {100 * d['accuracy']['clean']:.0f}, PGD-10 {100 * d['accuracy']['pgd-10']:.0f}, "
            f"AA {100 * d['accuracy']['autoattack']:.0f}, worst {100 * d['robust_accuracy']:.0f}"
            + (f", route-fixed {100 * d['accuracy']['route-fixed']:.0f}, experts {', '.join(f'{100 * s:.0f}' for s in d['experts']['clean_share'])} %"
               if d["moe"] else "") for d in docs))
    flags = sorted({f for docs in results.values() for d in docs for f in d["autoattack_flags"]})
    sem = 100 * (0.5 * 0.5 / n) ** 0.5
    aa_costs = [d["attacks"]["autoattack"]["cpu_seconds"] / d["examples"] for docs in results.values() for d in docs]
    aa_low, aa_high = min(aa_costs), max(aa_costs)
    return f"""# Robustness of the Fashion-MNIST runs under `advmoe eval`

Produced by `{command}` (evaluation/robustness_report.py). The evaluations took
{sum(d['seconds'] for docs in results.values() for d in docs) / 60:.0f} min of wall time and
{sum(d['cpu_seconds'] for docs in results.values() for d in docs) / 60:.0f} min of CPU time on one thread of the shared 2-core CPU,
niced below the other engineers' jobs (this invocation: {seconds / 60:.0f} min; it reuses an eval.json whose checkpoint and settings match). Checkpoints: the 12 runs of reports/fmnist_methods.md (`runs/report/*/best`,
fmnist-tiny at 3 epochs of 6,000 images); each one's eval.json lies next to it. Threat model: linf
ε = {eps:g} in [0, 1] pixels, the training ε. Images: the first {n} of the Fashion-MNIST test set, the same
for every checkpoint. Mean ± standard deviation over seeds {', '.join(map(str, seeds))}.

Attacks (pyautoattack {first['versions']['pyautoattack']}, torch {first['versions']['torch']}):
PGD-10 and PGD-50 (step ε/4, random start, through the straight-through router); AutoAttack standard
(APGD-CE, APGD-T, FAB-T with 9 target classes, Square with 5,000 queries); route-fixed (every router
forced to each expert in turn, PGD-50 on that route while the real router is pushed towards it, each
candidate judged on the real model, the worst kept per image); router attack (PGD-50 on the KL of the
router scores); Square alone on every clean-correct image. The worst case counts an image as robust only
if it is classified correctly clean and under every attack. Verdicts come from the real model (sparse
execution); every adversarial image is checked to lie within ε and [0, 1].

**Sample size.** AutoAttack costs {aa_low:.0f}-{aa_high:.0f} CPU-seconds per image for these checkpoints on this CPU
(table below), so {n} images per checkpoint is what fits a 45-minute budget. One accuracy on {n} images has a
standard error of up to {sem:.0f} points; the same images are used for every checkpoint, so differences
between attacks on one checkpoint (paired) are far more precise than absolute levels or differences
between methods. The last column (PGD-10 on 2,000 images, from the training report) shows how typical
these {n} images are.

## Accuracy (%)

{accuracy_table(results)}

## What the stronger attacks take off PGD-10

Points, mean ± std over seeds of the per-seed differences on the same images.

{drop_table(results)}

{chr(10).join('- ' + line for line in findings(results))}

## Sanity checks (thresholds fixed in evaluation/sanity.py before any result)

{chr(10).join(sanity_lines(results))}
{chr(10).join('- AutoAttack reported: ' + f for f in flags) if flags else ''}

## Throughput on this CPU (one thread, CPU seconds)

{chr(10).join(rate_lines)}

AutoAttack's rate depends on how many images survive its first attack: APGD-T and FAB-T (9 target
classes x 100 iterations each) and Square (5,000 queries) run on the survivors only.

## What a full CIFAR-10 AutoAttack run costs

MoE ResNet-18 at full width (N = 2, r = 0.5, ResNet-20 router) measured here: {1000 * cp['forward_backward']:.0f} ms per
image for a forward and input-gradient pass (masked execution, which the straight-through gradient needs)
and {1000 * cp['forward']:.0f} ms per forward (sparse), on one thread, batch 64. Passes per attacked image are counted from
pyautoattack's standard settings (APGD: a gradient per iteration, 100 iterations, 9 target classes for
APGD-T; FAB-T: a gradient and a prediction per iteration; Square: a forward per query, all 5,000 for a
robust image). The CIFAR-10 scenario assumes {100 * CIFAR['clean']:.0f} % clean accuracy (the third-party reference
run: 85.67 %), {100 * CIFAR['survive_apgd_ce']:.0f} % surviving APGD-CE and {100 * CIFAR['robust']:.0f} % reaching Square (RobustBench ResNet-18
anchors: 43-52 %). The last column applies the same count to the Fashion-MNIST AdvMoE model and divides
the CPU time measured above by it: the few survivors of a {n}-image run make small batches whose fixed
costs the count leaves out, so the count is a lower bound.

{chr(10).join(estimate_lines)}

Total: about {estimate['cpu_hours']:.0f} CPU-hours for 10,000 images ({estimate['cpu_hours'] / 24:.0f} days on one core, about
{estimate['cpu_hours'] / 16:.0f} hours on 16 ideally used cores): a GPU job. PGD-10, PGD-50, the route-fixed and
the router attack add {estimate['suite_extra_cpu_hours']:.0f} CPU-hours ({sum(SUITE_GRADIENT_PASSES.values())} gradient passes per image). Square alone on every clean-correct image, as `advmoe eval` runs it for the
masking check, adds about {100 * (CIFAR['clean'] - CIFAR['robust']) / CIFAR['robust']:.0f} % to Square's line at most
(images that are not robust are usually fooled in far fewer than 5,000 queries).

{also_section(list(also))}
## Per run (%)

{chr(10).join(per_run)}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.robustness_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/report")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n-examples", type=int, default=20)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--also", nargs="*", default=[], metavar="CHECKPOINT",
                        help="more checkpoints to evaluate, each on --also-examples images (e.g. the shipped model)")
    parser.add_argument("--also-examples", type=int, default=100)
    parser.add_argument("--out", default="reports/fmnist_robustness.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs = Path(args.runs)
    results = evaluate_runs(runs, args.seeds, args.n_examples, args.eps)
    also = [evaluate_or_reuse(Path(p), args.also_examples, args.eps, p) for p in args.also]
    estimate = cifar_estimate(results)
    command = "python -m evaluation.robustness_report " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(results, estimate, command.strip(), time.perf_counter() - start, args.n_examples, args.eps, args.seeds,
                  also)
    atomic_write_text(args.out, text)
    summary = {label: [{k: d[k] for k in ("seed", "checkpoint", "checkpoint_sha256", "accuracy", "robust_accuracy", "sanity",
                                          "experts", "per_example", "seconds", "cpu_seconds")}
                       | {"throughput": {a: d["attacks"][a]["examples_per_cpu_second"] for a in d["attacks"]},
                          "pgd_2000": d["pgd_2000"]} for d in docs] for label, docs in results.items()}
    atomic_write_text(Path(args.out).with_suffix(".json"), json.dumps(
        {"command": command.strip(), "eps": args.eps, "examples": args.n_examples, "attacks": list(ATTACKS),
         "runs": summary, "also": [{k: d[k] for k in ("checkpoint", "checkpoint_sha256", "examples", "accuracy",
                                                       "robust_accuracy", "sanity", "pgd_2000")} for d in also],
         "cifar10_estimate": estimate}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
