"""TorchScript (model.pt) and the AOTInductor package (model.aoti.pt2): the sparse dispatch in
both, under the same parity gate as ONNX. Small 1x28x28 models: AOTInductor's C++ compile
dominates these tests, one per model."""
import pytest
import torch

import advmoe
from advmoe.calibrate import balance_routing, calibrate_batchnorm
from cli.main import main as cli
from advmoe.models.resnet import ResNet, ResNetConfig
from helpers import small_model
from export import export_checkpoint
from export.graph import eager_runner, module_runner
from export.parity import check_parity, parity_batches
from export.torchscript import TorchScriptError, quiet_jit, script_module

# (model, router, config, torch threads while exporting). One compile, as it costs 35-55 s on
# 2 cores: the shared router the shipped model has; a DenseNet, whose BatchNorm runs on groups
# of run-time size; one thread, with which the conv backend choice reaches NNPACK's batch-size
# check that export/aoti.py must keep out of the package. Per-layer routers' dispatch is the
# same MoEConv2d code; ONNX's parity tests and the TorchScript tests below run them.
VARIANTS = [("moe_densenet40", "shared", {"depth": 10}, 1)]


def calibrated(name, router, **config):
    torch.manual_seed(0)
    model = small_model(name, router, in_channels=1, image_size=28, **config)
    x = torch.rand(64, 1, 28, 28)
    calibrate_batchnorm(model, x)
    if router is not None:
        balance_routing(model, x)
    return model


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
def exported(request, tmp_path_factory):
    name, router, config, threads = request.param
    root = tmp_path_factory.mktemp(f"{name}-{router}")
    checkpoint = advmoe.save_checkpoint(calibrated(name, router, **config), root / "ck")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return checkpoint, export_checkpoint(checkpoint, root / "out", ["torchscript", "aoti"], log=lambda *a: None)
    finally:
        torch.set_num_threads(before)


def test_both_formats_pass_the_parity_gate_and_keep_the_dispatch(exported):
    _, result = exported
    assert {p.name for p in result.files} == {"model.pt", "model.aoti.pt2"}
    assert set(result.parity) == {"torchscript", "aotinductor"}
    for runtime in result.parity.values():
        assert len(runtime) == 4 and max(runtime.values()) <= 1e-4
        assert any("only expert" in label for label in runtime)
    with quiet_jit():
        graph = str(torch.jit.load(result.out / "model.pt").inlined_graph)
    assert all(op in graph for op in ("aten::nonzero", "aten::index_select"))  # groups, not masks


@pytest.mark.parametrize("kind", ["torchscript", "aoti"])
def test_each_file_matches_eager_sparse_on_batches_the_gate_never_saw(exported, kind, assert_matches_eager):
    checkpoint, result = exported
    assert_matches_eager(checkpoint, result.out, kind)


def test_cli_says_once_that_torchscript_is_deprecated(tmp_path, capfd):
    checkpoint = advmoe.save_checkpoint(calibrated("moe_densenet40", "per_layer", depth=10), tmp_path / "ck")
    assert cli(["export", str(checkpoint), "--out", str(tmp_path / "out"), "--format", "torchscript"]) == 0
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if "TorchScript" in line] == [err.strip()]
    assert "deprecated in torch" in err and "aoti" in err and "Warning" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "card.json", "config.json", "export.json", "metrics.json", "model.pt", "model.safetensors"]


def test_the_dense_twin_scripts_to_logits_only():
    model = advmoe.set_execution(calibrated("densenet40", None, depth=10), "sparse", channels_last=False)
    module = script_module(model)
    report = check_parity("torchscript", eager_runner(model), module_runner(module), parity_batches(model))
    assert len(report) == 3 and max(report.values()) <= 1e-4
    assert isinstance(module(torch.rand(2, 1, 28, 28)), torch.Tensor)


class _DataDependentResNet(ResNet):
    def forward_backbone(self, x, route):
        if x.mean() > 0:  # a Python branch on the data: a trace would freeze it
            x = x + 1
        return super().forward_backbone(x, route)


def test_a_model_the_trace_would_freeze_fails_in_one_line_that_names_it():
    model = _DataDependentResNet(ResNetConfig(in_channels=1, image_size=28, width=0.125, num_experts=2,
                                              expert_ratio=0.5))
    model.model_name = "moe_branchy"
    advmoe.set_execution(model.eval(), "sparse", channels_last=False)
    with pytest.raises(TorchScriptError) as error:
        script_module(model)
    message = str(error.value)
    assert "\n" not in message and message.startswith("moe_branchy cannot be exported to TorchScript (the trace would "
                                                      "freeze a value of the example batch: Converting a tensor to a "
                                                      "Python boolean")
    assert message.endswith("the onnx, pt2 and aoti formats export it")
