"""`advmoe eval`: stronger attacks than PGD on a model trained here, a worst case taken per
example, gradient masking flagged, dense models handled, and one-line refusals of bad input."""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import advmoe
import advmoe.models.base as model_base
from advmoe.attacks import cross_entropy, pgd
from advmoe.calibrate import calibrate_batchnorm
from advmoe.gate import Route
from cli.main import main as cli
from advmoe.settings import ConfigError
from evaluation.cache import evaluated_with, kept_evaluation
from evaluation.document import worst_case
from evaluation.robustness import EvalSettings, evaluate_checkpoint
from evaluation.sharding import evaluate_in_processes
from evaluation.suite import evaluate_model
from evaluation.summary import summary
from helpers import fmnist_moe_checkpoint, small_model

EPS = 0.1
# AutoAttack's four attacks, with Square cut to 300 queries and 30 iterations (a custom, cheaper AutoAttack)
FAST = dict(eps=EPS, square_queries=300, apgd_iterations=30, pgd_steps=(10, 20), route_steps=20, sweep_examples=24,
            batch_size=64)
ROUTER_CHECK = "the router passes gradient to the input"


def stripes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """28x28 gratings whose orientation is the class (4 classes), random phase and contrast:
    low-contrast ones are not robust at EPS, high-contrast ones can be."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    i, j = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    coordinate = torch.stack([i, j, i + j, i - j])[y]
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    contrast = 0.05 + 0.4 * torch.rand(n, 1, 1, generator=g)
    x = 0.5 + contrast * torch.sin(coordinate * (2 * math.pi / 6) + phase) + 0.05 * torch.randn(n, 28, 28, generator=g)
    return x.clamp(0, 1)[:, None], y


def tiny_moe(**extra) -> advmoe.MoENet:
    return small_model("moe_resnet18", "shared", in_channels=1, image_size=28, width=0.0625, router_blocks=1,
                       router_width=4, **extra)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Attacks on a tiny model are thousands of small steps: on a shared 2-core machine a second
    thread only adds synchronisation (measured 6x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    """A MoE ResNet-18 at 1/16 width trained for a few seconds with FGSM (random start) at EPS;
    a router loss on y mod 2 (as the reference code's) keeps both experts in use."""
    torch.manual_seed(0)
    x, y = stripes(256, 0)
    model = tiny_moe(num_classes=4)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(8):
        for batch in torch.randperm(len(x)).split(32):
            xb, yb = x[batch], y[batch]
            model.eval()
            x_adv = pgd(model, xb, cross_entropy(yb), EPS, 1.25 * EPS, 1)
            model.train()
            loss = F.cross_entropy(model(x_adv), yb) + F.nll_loss(model.router_scores.clamp_min(1e-9).log(), yb % 2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    x_test, y_test = stripes(16, 1)
    return model.eval(), x_test, y_test


@pytest.fixture(scope="module")
def full(trained):
    model, x, y = trained
    return evaluate_model(model, x, y, EvalSettings(**FAST), progress=False)


def test_autoattack_and_route_fixed_are_at_least_as_strong_as_pgd10(full):
    accuracy = full["accuracy"]
    assert 0 < accuracy["pgd-10"] < accuracy["clean"]  # something to attack, and something left
    assert accuracy["autoattack"] <= accuracy["pgd-10"]
    assert accuracy["route-fixed"] <= accuracy["pgd-10"]
    aa = full["attacks"]["autoattack"]
    assert [c["name"] for c in aa["components"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert aa["standard"] is False  # 300 Square queries, not 5000: said so
    assert all(full["attacks"][a]["max_perturbation"] <= EPS + 1e-5 for a in full["attacks"] if a != "clean")
    routes = full["attacks"]["route-fixed"]["routes"]
    assert [r["expert"] for r in routes] == [0, 1]
    assert set(full["experts"]["per_route"]) == {"0", "1"}
    assert "AutoAttack runs APGD-CE and APGD-T already" in full["skipped"]["apgd"]
    assert "AutoAttack runs FAB-T already" in full["skipped"]["fab"]


def test_apgd_alone_is_autoattacks_first_two_in_cascade(trained, full):
    model, x, y = trained
    doc = evaluate_model(model, x, y, EvalSettings(**{**FAST, "attacks": ("apgd",), "apgd_iterations": 20}), progress=False)
    apgd = doc["attacks"]["apgd"]
    assert [c["name"] for c in apgd["components"]] == ["apgd-ce", "apgd-t"]
    assert apgd["components"][1]["attacked"] <= apgd["components"][0]["attacked"]  # APGD-T attacks the survivors
    assert doc["accuracy"]["apgd"] == apgd["components"][1]["accuracy_after"] <= doc["accuracy"]["clean"]


def test_fab_alone_attacks_every_clean_correct_example(trained):
    """FAB-T on its own (AutoAttack's third attack): with APGD and Square run elsewhere on the
    same images, a study composes AutoAttack per example without running APGD twice."""
    model, x, y = trained
    doc = evaluate_model(model, x, y, EvalSettings(**{**FAST, "attacks": ("fab",), "apgd_iterations": 20}), progress=False)
    fab = doc["attacks"]["fab"]
    assert [c["name"] for c in fab["components"]] == ["fab-t"]
    assert fab["components"][0]["attacked"] == round(doc["accuracy"]["clean"] * len(y))
    assert doc["accuracy"]["fab"] <= doc["accuracy"]["clean"] and fab["max_perturbation"] <= EPS + 1e-5
    assert doc["per_example"]["robust"] == "".join(
        str(int(c == f == "1")) for c, f in zip(doc["per_example"]["clean"], doc["per_example"]["fab"]))


def test_the_attacks_can_follow_the_other_straight_through_gradient(trained):
    """--gate-grad chosen: the white-box attacks follow the reference code's gradient through the
    route; the model answers the same (clean accuracy), and keeps its own setting afterwards."""
    model, x, y = trained
    settings = {**FAST, "attacks": ("pgd",), "pgd_steps": (10,)}
    own = evaluate_model(model, x, y, EvalSettings(**settings), progress=False)
    chosen = evaluate_model(model, x, y, EvalSettings(**settings, gate_grad="chosen"), progress=False)
    assert model.cfg.gate_grad == "softmax" and all(m.gate_grad == "softmax" for m in model.moe_layers)
    assert chosen["settings"]["gate_grad"] == "chosen" and own["settings"]["gate_grad"] is None
    assert chosen["per_example"]["clean"] == own["per_example"]["clean"]
    assert chosen["per_example"]["pgd-10"] != own["per_example"]["pgd-10"]  # another gradient, other examples found
    assert "followed the `chosen` straight-through gradient" in summary(chosen) and "straight-through" not in summary(own)
    with pytest.raises(advmoe.ConfigError, match="unknown gate-grad 'nowhere'"):
        evaluate_model(model, x, y, EvalSettings(**settings, gate_grad="nowhere"), progress=False)


def test_the_worst_case_is_taken_per_example(full):
    bits = full["per_example"]
    names = [k for k in bits if k not in ("label", "robust")]
    assert {"clean", "pgd-10", "pgd-20", "autoattack", "square", "route-fixed", "router"} <= set(names)
    expected = "".join("1" if all(bits[k][i] == "1" for k in names) else "0" for i in range(full["examples"]))
    assert bits["robust"] == expected
    assert full["robust_accuracy"] == pytest.approx(expected.count("1") / full["examples"])
    assert full["robust_accuracy"] <= min(full["accuracy"][k] for k in names)


def test_worst_case_combines_examples_not_accuracies():
    clean = torch.ones(4, dtype=torch.bool)
    first, second = torch.tensor([False, False, True, True]), torch.tensor([True, True, False, False])
    # each attack alone leaves 50 %; together they fool every example
    assert worst_case({"clean": clean, "a": first, "b": second}).sum() == 0
    assert worst_case({"clean": clean, "a": first}).tolist() == first.tolist()


def plain_argmax_route(logits, top_k=1, grad="softmax"):
    """The gate without the straight-through estimator: hard one-hot, no gradient to the router."""
    experts = logits.topk(top_k, dim=1).indices
    scores = logits.softmax(dim=1)
    return Route(experts=experts, weights=torch.zeros_like(scores).scatter(1, experts, 1.0), scores=scores,
                 logits=logits)


def test_a_plain_argmax_router_is_flagged_as_gradient_masking(trained, full, monkeypatch):
    model, x, y = trained
    monkeypatch.setattr(model_base, "route", plain_argmax_route)
    masking = evaluate_model(model, x, y, EvalSettings(**{**FAST, "attacks": ("pgd",)}), progress=False)
    honest = full  # the same model with its straight-through gate
    assert masking["accuracy"]["clean"] == honest["accuracy"]["clean"]  # the same forward pass

    def router_check(doc):
        return next(c["passed"] for c in doc["sanity"]["checks"] if c["name"] == ROUTER_CHECK)

    assert router_check(honest) is True and not honest["sanity"]["possible_gradient_masking"]
    assert router_check(masking) is False and masking["sanity"]["possible_gradient_masking"]
    assert "possible gradient masking" in summary(masking) and "possible gradient masking" not in summary(honest)


def test_dense_models_skip_the_route_attacks_and_say_so(trained):
    _, x, y = trained
    torch.manual_seed(0)
    model = small_model("resnet18", in_channels=1, image_size=28, num_classes=4, width=0.0625)
    calibrate_batchnorm(model, x)
    doc = evaluate_model(model, x[:8], y[:8], EvalSettings(eps=EPS, attacks=("pgd", "route-fixed", "router"),
                                                           pgd_steps=(2, 4), sweep_examples=8), progress=False)
    assert set(doc["skipped"]) == {"route-fixed", "router"} and "dense model" in doc["skipped"]["router"]
    assert doc["experts"] is None and set(doc["accuracy"]) == {"clean", "pgd-2", "pgd-4", "robust"}
    assert "route-fixed skipped: dense model" in summary(doc)
    assert ROUTER_CHECK not in {c["name"] for c in doc["sanity"]["checks"]}


# -- the command ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fmnist_moe_checkpoint(tmp_path_factory.mktemp("eval"))


@pytest.mark.parametrize("args, message", [
    (["--dataset", "cifar10"], "is a fashion_mnist model, not cifar10"),
    (["--attacks", "pgd", "fgsm"], "unknown attack 'fgsm'"),
    (["--eps", "8"], "did you mean 8/255"),
    (["--eps", "8/x"], "not a number"),
    (["--n-examples", "0"], "n-examples must be >= 1"),
    (["--device", "nonsense"], "--device 'nonsense'"),
    (["--split", "val"], "does not record the validation split its training held out"),
])
def test_bad_input_gets_one_line_and_exit_code_2(checkpoint, fashion_dir, args, message, capsys):
    assert cli(["eval", str(checkpoint), "--data-dir", str(fashion_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("advmoe eval: error:") and err.count("\n") == 1 and message in err, err
    assert not (checkpoint / "eval.json").exists()


def test_a_missing_checkpoint_gets_exit_code_2(tmp_path, capsys):
    assert cli(["eval", str(tmp_path / "nothing")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err


def test_eval_writes_eval_json_and_its_summary_next_to_the_checkpoint(checkpoint, fashion_dir, capsys):
    assert cli(["eval", str(checkpoint), "--data-dir", str(fashion_dir), "--attacks", "pgd", "router",
                "--n-examples", "8", "--pgd-steps", "2", "--route-steps", "2", "--sweep-examples", "8"]) == 0
    doc = json.loads((checkpoint / "eval.json").read_text())
    assert (doc["dataset"], doc["examples"], doc["eps"], doc["eps_source"]) == (
        "fashion_mnist", 8, 0.1, "the checkpoint's training eps")
    assert doc["checkpoint_sha256"] == hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert doc["attacks_run"] == ["pgd", "router"] and "router" in doc["accuracy"]
    assert (checkpoint / "eval.md").read_text() in capsys.readouterr().out
    assert not [p for p in checkpoint.iterdir() if p.name.startswith(".")]  # no temporary files left
    advmoe.load_checkpoint(checkpoint)  # still a checkpoint


def test_the_val_split_is_the_validation_images_the_checkpoints_own_training_held_out(checkpoint, fashion_dir,
                                                                                     tmp_path, capsys):
    """--split val evaluates on the images its training run held out (its val_size and seed), so
    that checkpoints can be compared without the test set; an evaluation of one split never
    stands in for the other."""
    held_out = advmoe.save_checkpoint(advmoe.load_checkpoint(checkpoint), tmp_path / "best", config={
        "dataset": "fashion_mnist", "training": {"eps": 0.1, "val_size": 50, "seed": 3}})
    args = ["eval", str(held_out), "--data-dir", str(fashion_dir), "--attacks", "pgd", "--n-examples", "30",
            "--pgd-steps", "2"]
    assert cli([*args, "--split", "val", "--out", str(tmp_path / "val")]) == 0
    assert "validation images its training held out" in capsys.readouterr().out
    assert cli([*args, "--out", str(tmp_path / "test")]) == 0
    val, test = (json.loads((tmp_path / name / "eval.json").read_text()) for name in ("val", "test"))
    expected = [advmoe.load_dataset("fashion_mnist", "val", fashion_dir, 50, 3)[i][1] for i in range(30)]
    assert val["split"] == "val" and val["per_example"]["label"] == expected
    other_seed = [advmoe.load_dataset("fashion_mnist", "val", fashion_dir, 50, 0)[i][1] for i in range(30)]
    assert other_seed != expected  # the seed picks the images: the checkpoint's own seed was used
    assert test["split"] == "test" and test["per_example"]["label"] != val["per_example"]["label"]
    settings = {"attacks": ["pgd"], "pgd_steps": [2]}
    assert evaluated_with(val, held_out, 30, settings, split="val")
    assert not evaluated_with(val, held_out, 30, settings) and evaluated_with(test, held_out, 30, settings)
    assert not evaluated_with(test, held_out, 30, settings, split="val")


def test_two_ranks_give_the_per_example_results_of_one_process(checkpoint, fashion_dir, tmp_path):
    """torchrun with 2 gloo processes: the units (batches) are dealt out to the ranks, rank 0
    gathers them, and eval.json holds what one process computes, example for example."""
    args = ["eval", str(checkpoint), "--data-dir", str(fashion_dir), "--n-examples", "20", "--batch-size", "6",
            "--attacks", "pgd", "autoattack", "route-fixed", "router", "--pgd-steps", "2", "--route-steps", "2",
            "--square-queries", "20", "--sweep-examples", "6", "--gradient-examples", "6", "--threads", "1"]
    assert cli([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "cli", *args, "--out", str(tmp_path / "two")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / name / "eval.json").read_text()) for name in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["per_example"] == one["per_example"]
    assert two["accuracy"] == one["accuracy"] and two["experts"] == one["experts"]
    assert two["attacks"]["autoattack"]["components"][0]["attacked"] == one["attacks"]["autoattack"]["components"][0]["attacked"]
    assert two["sanity"]["checks"] == one["sanity"]["checks"]
    assert result.stdout.count("wrote ") == 1  # rank 0 alone writes and reports


def test_evaluate_in_processes_starts_the_ranks_itself(checkpoint, fashion_dir, tmp_path):
    """What the study calls: the same sharding as torchrun, from Python, one thread per rank."""
    kwargs = dict(data_dir=str(fashion_dir), n_examples=12, batch_size=6, attacks=["pgd", "route-fixed"],
                  pgd_steps=(2,), route_steps=2, sweep_examples=6, gradient_examples=6, progress=False)
    one = evaluate_checkpoint(checkpoint, out=tmp_path / "one", **kwargs)
    two = evaluate_in_processes(2, checkpoint, threads=1, out=tmp_path / "two", **kwargs)
    assert two == json.loads((tmp_path / "two" / "eval.json").read_text())
    assert (one["processes"], two["processes"], two["threads"]) == (1, 2, 1)
    assert two["per_example"] == one["per_example"] and two["accuracy"] == one["accuracy"]
    with pytest.raises(ConfigError, match="processes must be >= 1"):
        evaluate_in_processes(0, checkpoint, **kwargs)
    with pytest.raises(ConfigError, match="split must be test or val"):  # a rank's error, in one line
        evaluate_in_processes(2, checkpoint, threads=1, **{**kwargs, "split": "train"})


def test_a_kept_evaluation_is_reused_only_when_it_is_whole_and_accepted(tmp_path):
    path = tmp_path / "eval.json"
    assert kept_evaluation(path, lambda doc: True) is None  # missing
    path.write_text('{"settings": {"attacks": ["pgd"]')  # cut off mid-write (by something other than us)
    assert kept_evaluation(path, lambda doc: True) is None
    path.write_text("[1, 2]")  # JSON, but no eval.json: the check's KeyError/TypeError means "no"
    assert kept_evaluation(path, lambda doc: doc["settings"]["attacks"] == ["pgd"]) is None
    path.write_text('{"settings": {"attacks": ["pgd"]}}')
    assert kept_evaluation(path, lambda doc: doc["settings"]["attacks"] == ["apgd"]) is None
    assert kept_evaluation(path, lambda doc: doc["settings"]["attacks"] == ["pgd"]) == {"settings": {"attacks": ["pgd"]}}


def test_images_drawn_at_random_with_a_seed_are_the_same_each_run_and_evaluate_in_parts(checkpoint, fashion_dir, tmp_path):
    """--draw-seed orders the split at random (RobustBench's practice), the same order every run and
    across processes; --start evaluates a part of it; the document says which images, and a kept
    evaluation of the first N never stands in for it."""
    kwargs = dict(data_dir=str(fashion_dir), batch_size=6, attacks=["pgd"], pgd_steps=(2,),
                  sweep_examples=6, gradient_examples=6, progress=False)
    first = evaluate_checkpoint(checkpoint, out=tmp_path / "first", n_examples=12, **kwargs)
    drawn = evaluate_checkpoint(checkpoint, out=tmp_path / "drawn", n_examples=12, draw_seed=3, **kwargs)
    again = evaluate_in_processes(2, checkpoint, threads=1, out=tmp_path / "again", n_examples=12, draw_seed=3, **kwargs)
    parts = [evaluate_checkpoint(checkpoint, out=tmp_path / f"part{start}", n_examples=6, draw_seed=3, start=start,
                                 **kwargs) for start in (0, 6)]
    assert drawn["images"] == {"order": "drawn", "draw_seed": 3, "start": 0, "count": 12} and "first_examples" not in drawn
    assert again["per_example"] == drawn["per_example"]
    assert drawn["per_example"]["label"] != first["per_example"]["label"]  # other images
    for key in ("label", "clean", "robust"):  # the parts are the whole, in order
        assert parts[0]["per_example"][key] + parts[1]["per_example"][key] == drawn["per_example"][key]
    assert parts[1]["images"]["start"] == 6
    assert not evaluated_with(drawn, Path(checkpoint), 12, {"attacks": ["pgd"]})
    with pytest.raises(ConfigError, match="has only 100 images"):
        evaluate_checkpoint(checkpoint, n_examples=6, start=100, **kwargs)
