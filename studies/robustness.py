"""The runs of the methods comparison re-evaluated with `advmoe eval`: reports/fmnist_robustness.md
and its .json.

    python -m studies.robustness --runs runs/report --n-examples 20 --eps 0.1 --threads 1

Every run (a folder of --runs holding best/, trained by `python -m studies.methods`; named by the
method and seed in its config) has its best checkpoint evaluated with the whole suite on the same
first N test images; eval.json goes next to the checkpoint and is reused when the checkpoint, eps
and settings are unchanged (a cut-off report resumes). The .json holds every number of the report,
which --report-only renders again without evaluating: mean ± standard deviation over seeds of every
attack's accuracy and of the per-example worst case, how much AutoAttack and the worst case take off
PGD-10 for each method, the sanity checks, the throughput of each attack on this CPU, and what a
full CIFAR-10 AutoAttack run would cost.
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
from advmoe.checkpoint import WEIGHTS, read_config, read_metrics
from evaluation.cache import evaluated_with
from evaluation.robustness import EvalSettings
from evaluation.suite import ATTACKS
from training.methods import METHODS

from .cost import PASSES, fastest, gradient_passes
from .evaluations import kept_or_run, write
from .robustness_tables import ADVMOE, DENSE, render

ORDER = (DENSE, METHODS["moe-at"].label, ADVMOE)  # the tables' order; other methods follow by name
# A CIFAR-10 scenario for the cost estimate: clean accuracy of a third-party run of the reference
# code (85.67 %, docs/method.md) and a robust accuracy near RobustBench's ResNet-18 anchors (43-52 %).
CIFAR = {"images": 10_000, "clean": 0.85, "survive_apgd_ce": 0.52, "robust": 0.48}
AUTOATTACK = ("apgd-ce", "apgd-t", "fab-t", "square")  # AutoAttack standard's components, in cascade
SUITE = ("pgd-10", "pgd-50", "route-fixed", "router")  # the rest of the suite at its default settings
# what --report-only needs from the .json, beyond the tables' accuracies
RUN_KEYS = ("seed", "checkpoint", "moe", "accuracy", "robust_accuracy", "sanity", "experts", "router",
            "autoattack_flags", "throughput", "pgd_2000", "seconds", "cpu_seconds")
DOCUMENT_KEYS = ("command", "eps", "examples", "seeds", "runs_dir", "threads", "seconds", "versions", "runs", "also",
                 "cifar10_estimate")


def run_label(config: dict) -> str:
    """How the report names a run: its method's label ("dense " before it for a dense model), and
    AdvMoE's router loss when it is not the default."""
    training = config.get("training") or {}
    method = METHODS.get(training["method"])
    label = method.label if method else training["method"]
    if not advmoe.is_moe_model(config["architecture"]):
        label = "dense " + label
    if training["method"] == "advmoe" and training.get("router_loss") == "model":
        label += ", router loss model"
    return label


def evaluate(best: Path, n: int, eps: float, log=print) -> dict:
    """eval.json of a checkpoint under the default suite: the kept one when it matches, else a new one,
    next to the checkpoint; with the checkpoint's PGD-10 accuracy on 2,000 test images (pgd_2000)."""
    if not (best / WEIGHTS).is_file():
        raise FileNotFoundError(f"{best} is missing: train the runs first (python -m studies.methods)")
    settings = asdict(EvalSettings(eps=eps))
    doc = kept_or_run(best, best, lambda d: evaluated_with(d, best, n, settings), n, settings, log=log)
    doc["pgd_2000"] = read_metrics(best).get("test_pgd_accuracy")
    return doc


def evaluate_runs(runs: Path, seeds: list[int], n: int, eps: float, log=print) -> dict[str, list[dict]]:
    """{label: eval.json per seed} of the runs of `seeds` in `runs`, labels in ORDER."""
    found = []
    for best in sorted(runs.glob("*/best")):
        config = read_config(best)
        if (config.get("training") or {}).get("seed") in seeds:
            found.append((run_label(config), config["training"]["seed"], best))
    if not found:
        raise FileNotFoundError(f"no run of seeds {seeds} in {runs}: train the runs first (python -m studies.methods)")
    found.sort(key=lambda t: (ORDER.index(t[0]) if t[0] in ORDER else len(ORDER), t[0], t[1]))
    results: dict[str, list[dict]] = {}
    for label, seed, best in found:
        log(f"{label}, seed {seed}")
        results.setdefault(label, []).append({**evaluate(best, n, eps, log), "seed": seed})
    for label in (DENSE, ADVMOE):
        if label not in results:
            raise FileNotFoundError(f"no {label} run of seeds {seeds} in {runs}: the report compares it")
    return results


def _pass_seconds(model: torch.nn.Module, shape: tuple[int, ...], batch: int) -> tuple[float, float]:
    """CPU seconds per image of a forward and input-gradient pass (masked execution) and of a forward
    (sparse execution), each the fastest of two after a warm-up."""
    model = model.eval().requires_grad_(False)
    sparse = advmoe.set_execution(copy.deepcopy(model), "sparse")  # a model that has not run yet copies
    x = torch.rand(batch, *shape)
    xg = x.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            sparse(x)

    gradient = fastest(lambda: torch.autograd.grad(model(xg).sum(), xg), repeats=2, clock=time.process_time)
    return gradient / batch, fastest(forward, repeats=2, clock=time.process_time) / batch


def cifar_estimate(results: dict[str, list[dict]]) -> dict:
    """CPU cost of AutoAttack standard on CIFAR-10, MoE ResNet-18 at full width: the passes each
    component makes per attacked image (studies.cost.PASSES) times one pass of that model measured
    here, times the images each component attacks in the CIFAR scenario. The same count applied to
    the Fashion-MNIST AdvMoE model says how far the measured time is above it (small batches of
    survivors)."""
    tiny_fb, tiny_f = _pass_seconds(advmoe.load_checkpoint(results[ADVMOE][0]["checkpoint"]), (1, 28, 28), batch=16)
    torch.manual_seed(0)
    cifar = advmoe.create_model("moe_resnet18", num_classes=10, in_channels=3, image_size=32, num_experts=2,
                                expert_ratio=0.5, router="shared")
    cifar_fb, cifar_f = _pass_seconds(cifar, (3, 32, 32), batch=64)
    attacked = dict(zip(AUTOATTACK, (CIFAR["clean"], CIFAR["survive_apgd_ce"], CIFAR["survive_apgd_ce"],
                                     CIFAR["robust"])))
    components = {}
    for name, share in attacked.items():
        fb, f = PASSES[name]
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
            "suite_gradient_passes": gradient_passes(SUITE),
            "suite_extra_cpu_hours": CIFAR["images"] * gradient_passes(SUITE) * cifar_fb / 3600}


def run_summary(doc: dict) -> dict:
    """What the report shows of one eval.json."""
    router = doc["attacks"].get("router")
    return {**{k: doc[k] for k in ("seed", "checkpoint", "checkpoint_sha256", "moe", "accuracy", "robust_accuracy",
                                    "sanity", "experts", "per_example", "autoattack_flags", "seconds", "cpu_seconds",
                                    "pgd_2000")},
            "router": router and {k: router[k] for k in ("route_flip_rate", "prediction_flip_given_route_flip")},
            "throughput": {a: entry["examples_per_cpu_second"] for a, entry in doc["attacks"].items()}}


def document(results: dict[str, list[dict]], also: list[dict], args: argparse.Namespace, command: str,
             seconds: float) -> dict:
    """The report's .json: every number render() shows."""
    return {"command": command, "eps": args.eps, "examples": args.n_examples, "attacks": list(ATTACKS),
            "seeds": args.seeds, "runs_dir": args.runs, "threads": args.threads, "seconds": seconds,
            "versions": results[ADVMOE][0]["versions"],
            "runs": {label: [run_summary(d) for d in docs] for label, docs in results.items()},
            "also": [{k: d[k] for k in ("checkpoint", "checkpoint_sha256", "examples", "accuracy", "robust_accuracy",
                                        "sanity", "pgd_2000")} for d in also],
            "cifar10_estimate": cifar_estimate(results)}


def read_document(path: Path) -> dict:
    """The report's .json, refused when it lacks a number the report shows."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; run the report once without --report-only")
    doc = json.loads(path.read_text())
    missing = [k for k in DOCUMENT_KEYS if k not in doc]
    missing += sorted({k for docs in doc.get("runs", {}).values() for d in docs for k in RUN_KEYS if k not in d})
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)} (written by an older version of this report): "
                         "run the report without --report-only")
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advmoe study robustness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/report")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n-examples", type=int, default=20)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--also", nargs="*", default=[], metavar="CHECKPOINT",
                        help="more checkpoints to evaluate, each on --also-examples images (e.g. the shipped model)")
    parser.add_argument("--also-examples", type=int, default=100)
    parser.add_argument("--out", default="reports/fmnist_robustness.md")
    parser.add_argument("--report-only", action="store_true",
                        help="render the report again from its .json (beside --out); evaluate nothing")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        try:
            doc = read_document(out.with_suffix(".json"))
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
        write(out, doc, render(doc))
        return 0
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = evaluate_runs(Path(args.runs), args.seeds, args.n_examples, args.eps)
    also = [evaluate(Path(p), args.also_examples, args.eps) for p in args.also]
    command = " ".join(["python -m studies.robustness", *(argv if argv is not None else sys.argv[1:])])
    doc = document(results, also, args, command, time.perf_counter() - start)
    write(out, doc, render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
