"""Export keeps the sparse dispatch in the graph and checks parity before writing anything."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import advmoe
from advmoe.calibrate import balance_routing, calibrate_batchnorm
from advmoe.card import read_card
from advmoe.runtime_choice import RuntimeTiming, fastest_runtime, read_timing
from cli.main import main as cli
from helpers import calibrated_model
from export import ParityError, api, export_checkpoint, timing
from export.parity import check_parity
from export.torchscript import torchscript_runner

ROOT = Path(__file__).resolve().parents[2]


def make_checkpoint(path, name="moe_resnet18", router="shared"):
    model = calibrated_model(name, router)
    return advmoe.save_checkpoint(model, path, metrics={"clean_accuracy": 0.25},
                                  config={"dataset": "cifar10", "classes": [f"c{i}" for i in range(10)]})


def shipped_architecture_checkpoint(path):
    """The architecture of the shipped model (checkpoints/fmnist-moe), calibrated so that random
    inputs use both experts: the shipped weights send random noise to one expert only."""
    shipped = json.loads((ROOT / "checkpoints/fmnist-moe/config.json").read_text())
    torch.manual_seed(0)
    model = advmoe.create_model(shipped["architecture"], **shipped["model_args"])
    x = torch.rand(64, model.cfg.in_channels, model.cfg.image_size, model.cfg.image_size)
    calibrate_batchnorm(model, x)
    balance_routing(model, x)
    return advmoe.save_checkpoint(model, path, metrics={"clean_accuracy": 0.25},
                                  config={"dataset": shipped["dataset"], "classes": shipped["classes"]})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    checkpoint = shipped_architecture_checkpoint(root / "ck")
    # The runtimes timed as `advmoe export` does by default, in one round: what is recorded is checked, not speed.
    result = export_checkpoint(checkpoint, root / "out", ["all"], timing_rounds=1, log=lambda *a: None)
    return checkpoint, result


def test_all_formats_are_written_with_a_parity_report(exported):
    _, result = exported
    out = result.out
    assert sorted(p.name for p in out.iterdir()) == [
        "card.json", "config.json", "export.json", "metrics.json", "model.onnx", "model.pt", "model.pt2",
        "model.safetensors", "triton"]  # no AOTInductor package: `all` leaves its slow compile out
    parity = json.loads((out / "export.json").read_text())["parity"]
    assert set(parity) == {"onnxruntime", "torch.export", "torchscript"}
    for runtime in parity.values():
        assert len(runtime) == 4 and max(runtime.values()) <= 1e-4
        assert any("only expert" in label for label in runtime)


def test_onnx_graph_keeps_the_data_dependent_dispatch(exported):
    graph = onnx.load(exported[1].out / "model.onnx")
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    assert {"ArgMax", "NonZero", "Gather", "ScatterND"} <= ops
    assert [i.name for i in graph.graph.input] == ["input"]
    assert [o.name for o in graph.graph.output] == ["logits", "routing"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 18


@pytest.mark.parametrize("kind", ["onnx", "pt2", "torchscript"])
def test_each_exported_file_matches_eager_sparse_on_batches_the_gate_never_saw(exported, kind, assert_matches_eager):
    checkpoint, result = exported
    assert_matches_eager(checkpoint, result.out, kind)


def test_triton_config_parses_and_names_the_onnx_tensors(exported):
    out = exported[1].out
    config = text_format.Parse((out / "triton/advmoe/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    graph = onnx.load(out / "triton/advmoe/1/model.onnx").graph
    assert config.name == "advmoe" and config.backend == "onnxruntime" and config.max_batch_size == 64
    assert [i.name for i in config.input] == [i.name for i in graph.input]
    assert [o.name for o in config.output] == [o.name for o in graph.output]
    assert list(config.input[0].dims) == [1, 28, 28]
    assert list(config.output[0].dims) == [10] and list(config.output[1].dims) == [16]
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    # the class names, for Triton's classification extension (a client asks class_count=k)
    assert config.output[0].label_filename == "labels.txt" and not config.output[1].label_filename
    labels = (out / "triton/advmoe" / config.output[0].label_filename).read_text().splitlines()
    assert labels == json.loads((out / "card.json").read_text())["classes"]


def test_triton_libtorch_config_parses_and_names_the_torchscript_module_tensors(exported):
    out = exported[1].out
    assert sorted(p.name for p in (out / "triton").iterdir()) == ["advmoe", "advmoe_libtorch"]
    folder = out / "triton/advmoe_libtorch"
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "advmoe_libtorch" and config.platform == "pytorch_libtorch" and not config.backend
    assert config.max_batch_size == 64 and config.dynamic_batching.max_queue_delay_microseconds > 0
    assert (folder / "1/model.pt").read_bytes() == (out / "model.pt").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
        module = torch.jit.load(out / "model.pt")
        x = torch.rand(2, *config.input[0].dims)
        outputs = module(x)
    # The PyTorch backend binds the input by forward()'s argument name, the outputs by position.
    assert [i.name for i in config.input] == [a.name for a in module.forward.schema.arguments[1:]] == ["input"]
    assert [o.name for o in config.output] == ["logits", "routing"] and len(outputs) == 2
    for spec, tensor in zip(config.output, outputs):
        assert list(spec.dims) == list(tensor.shape[1:])
        assert spec.data_type == {torch.float32: model_config_pb2.TYPE_FP32, torch.int64: model_config_pb2.TYPE_INT64}[tensor.dtype]


def test_torchscript_model_runs_in_a_python_without_advmoe(exported, tmp_path):
    """LibTorch needs only model.pt: load it where advmoe and this repository cannot be imported."""
    checkpoint, result = exported
    x = torch.rand(5, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    probe = ("import sys, warnings\n"
             "for name in ('advmoe', 'export', 'serving', 'training', 'clients', 'benchmarks'):\n"
             "    sys.modules[name] = None  # any import of them fails\n"
             "warnings.simplefilter('ignore', FutureWarning)\n"
             "import torch\n"
             f"module = torch.jit.load({str(result.out / 'model.pt')!r})\n"
             f"with torch.no_grad():\n"
             f"    logits, routing = module(torch.load({str(tmp_path / 'x.pt')!r}))\n"
             f"torch.save((logits, routing), {str(tmp_path / 'y.pt')!r})\n"
             "print(sorted(m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in ('advmoe', 'export')))\n")
    done = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    logits, routing = torch.load(tmp_path / "y.pt")
    model = advmoe.set_execution(advmoe.load_checkpoint(checkpoint), "sparse")
    with torch.no_grad():
        expected, expected_routing = model.forward_with_routing(x)
    assert torch.equal(routing, expected_routing) and (logits - expected).abs().max() <= 1e-4


def test_bentoml_model_loads_back_by_tag_with_its_metadata(exported):
    import os

    import bentoml

    assert os.environ["BENTOML_HOME"] in str(bentoml.models.get(exported[1].bento_tag).path)

    tag = exported[1].bento_tag
    model = bentoml.models.get(tag)
    assert bentoml.models.get("advmoe:latest").tag == model.tag
    assert model.info.labels == {"architecture": "moe_resnet18", "dataset": "fashion_mnist", "router": "shared",
                                 "framework": "advmoe", "execution": "sparse"}
    meta = model.info.metadata
    assert meta["num_experts"] == 2 and meta["expert_ratio"] == 0.5 and meta["dataset"] == "fashion_mnist"
    assert meta["clean_accuracy"] == 0.25 and meta["macs_per_image"] > 0
    card = read_card(exported[0])
    timing = read_timing(exported[1].out)
    assert meta.pop("served_runtime") == timing.fastest  # the runtime the export measured fastest
    assert meta == {k: v for k, v in card.to_dict().items() if v is not None}  # the model card, less what is unknown
    assert read_card(model.path) == card == read_card(exported[1].out)
    assert {"model.onnx", "model.pt2", "model.safetensors", "config.json", "card.json", "export.json"} <= {
        p.name for p in Path(model.path).iterdir()}
    assert read_timing(model.path) == timing  # what the service reads its runtime from


def test_masked_export_is_the_reference_way_of_running_and_says_so(tmp_path):
    """A baseline for the serving benchmark: the same model, every expert computed, then selected."""
    checkpoint = make_checkpoint(tmp_path / "ck")
    result = export_checkpoint(checkpoint, tmp_path / "out", ["onnx"], execution="masked", log=lambda *a: None)
    assert max(result.parity["onnxruntime"].values()) <= 1e-4
    assert json.loads((result.out / "export.json").read_text())["execution"] == "masked"
    ops = {node.op_type for node in onnx.load(result.out / "model.onnx").graph.node}
    assert "NonZero" not in ops and "ScatterND" not in ops  # no dispatch: every expert runs
    with pytest.raises(ValueError, match="'dense'.*sparse.*masked"):
        export_checkpoint(checkpoint, tmp_path / "out2", ["onnx"], execution="dense", log=lambda *a: None)
    with pytest.raises(ValueError, match="torchscript writes sparse execution only"):
        export_checkpoint(checkpoint, tmp_path / "out2", ["torchscript"], execution="masked", log=lambda *a: None)
    assert not (tmp_path / "out2").exists()


def test_onnx_parity_for_per_layer_routers_and_another_architecture(tmp_path):
    # one export for both (each costs 7-16 s here): the module's fixture is a shared-router ResNet
    checkpoint = make_checkpoint(tmp_path / "ck", "moe_vgg16", "per_layer")
    result = export_checkpoint(checkpoint, tmp_path / "out", ["onnx"], log=lambda *a: None)
    assert max(result.parity["onnxruntime"].values()) <= 1e-4


def test_densenet_exports_with_batchnorm_on_groups_of_run_time_size(tmp_path):
    """DenseNet normalises before its convs, on expert groups whose size the tracer cannot know."""
    from advmoe.calibrate import balance_routing, calibrate_batchnorm
    from helpers import small_model

    model = small_model("moe_densenet40", "shared", depth=10)
    x = torch.rand(64, 3, 32, 32)
    calibrate_batchnorm(model, x)
    balance_routing(model, x)
    checkpoint = advmoe.save_checkpoint(model, tmp_path / "ck")
    result = export_checkpoint(checkpoint, tmp_path / "out", ["onnx", "pt2"], log=lambda *a: None)
    for runtime in ("onnxruntime", "torch.export"):
        assert max(result.parity[runtime].values()) <= 1e-4


def test_dense_twin_exports_logits_only(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ck", "resnet18", None)
    result = export_checkpoint(checkpoint, tmp_path / "out", ["onnx"], log=lambda *a: None)
    assert [o.name for o in onnx.load(result.out / "model.onnx").graph.output] == ["logits"]


def test_failed_parity_leaves_nothing_and_says_by_how_much(tmp_path, monkeypatch):
    """With TorchScript, the cheapest export here: the gate and the atomic directory are the
    same for every format."""
    checkpoint = make_checkpoint(tmp_path / "ck")

    def skewed(path):
        run = torchscript_runner(path)
        return lambda x: (lambda out: (out[0] + 0.01, out[1]))(run(x))

    monkeypatch.setattr(api, "torchscript_runner", skewed)
    with pytest.raises(ParityError, match=r"torchscript: logits differ from eager sparse by 1\.0\de-02"):
        export_checkpoint(checkpoint, tmp_path / "out", ["torchscript"], log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no output, no temporary


def test_one_flipped_route_with_equal_logits_fails_the_gate(tmp_path, monkeypatch):
    """One sample of the gate's batch of 3 sent to the other expert at one MoE layer past the
    first; the logits are left as eager's, so only the routing check can see it."""
    checkpoint = make_checkpoint(tmp_path / "ck")

    def one_route_flipped(path):
        run = torchscript_runner(path)

        def flipped(x):
            logits, routing = run(x)
            if len(x) == 3:
                routing = routing.copy()
                routing[1, 5] = 1 - routing[1, 5]
            return logits, routing

        return flipped

    monkeypatch.setattr(api, "torchscript_runner", one_route_flipped)
    with pytest.raises(ParityError, match=r"^torchscript: routing .* 1 of 3 samples on the batch of 3$"):
        export_checkpoint(checkpoint, tmp_path / "out", ["torchscript"], log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no output, no temporary


def test_an_exported_model_that_fails_to_run_fails_the_gate_in_one_line():
    batches = {"batch of 1": torch.rand(1, 3, 8, 8)}

    def refuses(x):
        raise RuntimeError("Expected u0 <= 15 but received 28\n(C++ stack)")

    with pytest.raises(ParityError, match=r"^aotinductor: the exported model fails on the batch of 1: "
                                          r"Expected u0 <= 15 but received 28$"):
        check_parity("aotinductor", lambda x: (x.numpy(), None), refuses, batches)


def test_cli_bad_input_exits_2_with_a_clear_error(tmp_path, capsys):
    assert cli(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    checkpoint = make_checkpoint(tmp_path / "ck")
    (checkpoint / "model.safetensors").write_bytes(b"\x00" * 10)
    assert cli(["export", str(checkpoint), "--out", str(tmp_path / "o")]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert cli(["export", str(checkpoint), "--out", str(tmp_path / "taken")]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert cli(["export", str(checkpoint), "--out", str(tmp_path / "o"), "--format", "tflite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("advmoe export: error:") and "'tflite'" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_force_replaces_an_earlier_export(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ck")
    export_checkpoint(checkpoint, tmp_path / "out", ["torchscript"], log=lambda *a: None)
    card = read_card(checkpoint)
    (checkpoint / "card.json").unlink()  # a checkpoint written before cards: the export still gets one
    result = export_checkpoint(checkpoint, tmp_path / "out", ["pt2"], force=True, log=lambda *a: None)
    assert read_card(result.out) == card
    assert {p.name for p in result.out.iterdir()} == {"model.pt2", "model.safetensors", "config.json", "metrics.json", "card.json",
                                                  "export.json"}


# -- the runtimes timed on the exported model, and the fastest recorded ----------------------------
def test_every_servable_runtime_written_is_timed_and_the_fastest_recorded(exported):
    recorded = json.loads((exported[1].out / "export.json").read_text())["runtime_timing"]
    assert recorded["batches"] == [1, 8, 64] and recorded["rounds"] == 1 and recorded["threads"] == 1
    assert set(recorded["ms"]) == {"onnxruntime", "torch", "pt2"}  # written; torchscript is not served
    assert all(len(ms) == 3 and min(ms) > 0 for ms in recorded["ms"].values())
    assert recorded["fastest"] == fastest_runtime(recorded["ms"])
    assert RuntimeTiming.from_dict(recorded) == read_timing(exported[1].out)


class PlantedClock:
    """time.perf_counter for export/timing.py that only the planted runtimes move: each call of a
    runtime advances it by that runtime's planted ms at the batch it was given."""

    def __init__(self, planted: dict[str, dict[int, float]]):
        self.now, self.planted = 0.0, planted

    def perf_counter(self) -> float:
        return self.now

    def runners(self, folder, execution, threads):
        return {name: (lambda x, name=name: self.advance(self.planted[name][len(x)])) for name in self.planted}

    def advance(self, ms: float) -> None:
        self.now += ms / 1e3


def test_a_planted_timing_makes_the_recorded_choice_follow_it(tmp_path, monkeypatch):
    """onnxruntime is fastest at batch 1, torch at 8 and 64 by more: the rule (geometric mean over
    the batches) picks torch, and export.json records the planted medians and that choice."""
    planted = {"onnxruntime": {1: 1.0, 8: 6.0, 64: 48.0}, "torch": {1: 1.5, 8: 3.0, 64: 24.0}}
    clock = PlantedClock(planted)
    monkeypatch.setattr(timing, "time", clock)
    monkeypatch.setattr(timing, "runners", clock.runners)
    checkpoint = make_checkpoint(tmp_path / "ck")
    result = export_checkpoint(checkpoint, tmp_path / "out", ["onnx"], timing_rounds=3, log=lambda *a: None)
    recorded = read_timing(result.out)
    assert recorded.ms == {name: [ms[b] for b in (1, 8, 64)] for name, ms in planted.items()}
    assert recorded.fastest == "torch" and recorded.rounds == 3
    planted["onnxruntime"][64] = 12.0  # now onnxruntime's product is the smaller
    result = export_checkpoint(checkpoint, tmp_path / "out", ["onnx"], force=True, timing_rounds=3, log=lambda *a: None)
    assert read_timing(result.out).fastest == "onnxruntime"


def test_the_timed_batches_follow_the_batchers_cap():
    assert timing.timed_batches(64) == [1, 8, 64] and timing.timed_batches(4) == [1, 4]
    assert timing.timed_batches(1) == [1]


def test_no_time_runtimes_records_no_timing_and_rounds_must_be_positive(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "ck")
    result = export_checkpoint(checkpoint, tmp_path / "out", ["onnx"], time_runtimes=False, log=lambda *a: None)
    assert read_timing(result.out) is None and "runtime_timing" not in json.loads((result.out / "export.json").read_text())
    assert cli(["export", str(checkpoint), "--out", str(tmp_path / "o"), "--timing-rounds", "0"]) == 2
    err = capsys.readouterr().err
    assert "--timing-rounds 0" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
