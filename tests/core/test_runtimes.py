"""advmoe.runtimes: the choices of how a model runs, and the one onnxruntime session."""
import subprocess
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from advmoe.runtimes import RUNTIMES, onnx_session, runtime_choices


def identity_model(path):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_the_session_runs_on_the_cpu_without_spinning_threads(tmp_path):
    session = onnx_session(identity_model(tmp_path / "m.onnx"), threads=3)
    options = session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.run(None, {"x": [[1.0, 2.0]]})[0].tolist() == [[1.0, 2.0]]


def test_a_setting_takes_some_runtimes_in_its_own_order():
    assert list(runtime_choices(("pt2", "torch"))) == ["pt2", "torch"]
    assert runtime_choices(("torch",))["torch"] == RUNTIMES["torch"].help


def test_the_choices_import_without_torch():
    probe = "import sys, advmoe.runtimes, advmoe.usage, advmoe.settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).parents[2], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
