"""The sub-commands' flags: generated from their settings dataclasses, with the dataclass's
defaults, and handed to the function each command wraps."""
import dataclasses
import sys
import types

import pytest

import cli.study
from cli.flags import default_of
from cli.main import COMMANDS, build_parser, main
from export.api import ExportSettings
from export.api import export_checkpoint as export_checkpoint_of_the_api
from serving.config import ServingConfig


def test_main_only_dispatches_to_one_module_per_command():
    assert set(COMMANDS) == {"models", "train", "eval", "export", "serve", "predict", "loadtest", "bench", "study"}
    assert all(callable(command.add_arguments) and callable(command.run) for command in COMMANDS.values())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_its_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: advmoe {command}")


def flags_of(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest for a in sub.choices[command]._actions}


def test_serve_has_a_flag_per_setting_but_the_token():
    fields = {f.name for f in dataclasses.fields(ServingConfig)}
    assert fields - flags_of("serve") == {"probe_token"}


def test_serve_hands_the_flags_given_to_the_server_as_its_variables(monkeypatch):
    calls = []
    monkeypatch.setattr("serving.launch.exec_serve", lambda env, host, port: calls.append((env, host, port)) or 0)
    assert main(["serve", "--runtime", "torch", "--execution", "masked", "--probe", "--workers", "2",
                 "--probe-max-eps", "8/255", "--port", "3100"]) == 0
    assert main(["serve"]) == 0
    (env, host, port), (bare, _, default_port) = calls
    assert env == {"ADVMOE_RUNTIME": "torch", "ADVMOE_EXECUTION": "masked", "ADVMOE_WORKERS": "2",
                   "ADVMOE_PROBE_ENABLED": "1", "ADVMOE_PROBE_MAX_EPS": str(8 / 255)}
    assert ServingConfig.from_env(env) == ServingConfig(runtime="torch", execution="masked", workers=2,
                                                        probe_enabled=True, probe_max_eps=8 / 255)
    assert (host, port, bare, default_port) == ("127.0.0.1", 3100, {}, 3000)  # unset flags keep the environment's


def test_a_bad_serving_setting_is_one_line_naming_the_choices(capsys):
    assert main(["serve", "--runtime", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensorrt" in err and all(r in err for r in ("onnxruntime", "torch", "pt2"))


def test_export_passes_the_flags_given_and_its_defaults_are_the_settings(monkeypatch, tmp_path):
    calls = []

    def export_checkpoint(checkpoint, out, force, **settings):
        calls.append((checkpoint, out, force, settings))
        return types.SimpleNamespace(out=out, files=[], bento_tag=None)

    assert {k: default_of(export_checkpoint_of_the_api, k) for k in ExportSettings.__dataclass_fields__} == \
        dataclasses.asdict(ExportSettings())
    monkeypatch.setattr("export.api.export_checkpoint", export_checkpoint)
    assert main(["export", "ckpt", "--out", str(tmp_path / "x"), "--format", "onnx", "triton", "--opset", "19"]) == 0
    assert calls == [("ckpt", str(tmp_path / "x"), False, {"formats": ("onnx", "triton"), "opset": 19})]


def test_an_unknown_export_format_is_refused_before_any_work(capsys, tmp_path):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--format", "onnx", "gguf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gguf" in err and "onnx" in err


@pytest.mark.parametrize("name, flag", [("frontier", "--plan"), ("gate-grad", "--grads"), ("per-class", "--names")])
def test_a_study_gets_its_arguments(name, flag, capsys):
    assert main(["study", name, "--help"]) == 0
    assert flag in capsys.readouterr().out


def test_the_study_help_lists_every_study(capsys):
    assert main(["study", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.study.STUDIES)


def test_an_unknown_study_is_one_line_naming_the_studies(capsys):
    assert main(["study", "nothing"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing" in err and all(name in err for name in cli.study.STUDIES)


def test_a_study_runs_with_the_arguments_passed_through_and_gives_its_exit_code(monkeypatch):
    seen = []
    fake = types.ModuleType("fake_study")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "fake_study", fake)
    monkeypatch.setitem(cli.study.STUDIES, "fake", "fake_study")
    assert main(["study", "fake", "--seeds", "2", "runs/x"]) == 3
    assert seen == [["--seeds", "2", "runs/x"]]


def test_a_study_missing_here_fails_in_one_line_and_the_others_still_run(monkeypatch, capsys):
    monkeypatch.setitem(cli.study.STUDIES, "absent", "studies.no_such_study")
    assert main(["study", "absent"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "studies.no_such_study" in err
    assert main(["study", "per-class", "--help"]) == 0
