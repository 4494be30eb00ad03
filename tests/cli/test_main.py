import subprocess
import sys

from cli.main import main


def test_models_lists_parameters_and_macs(capsys):
    assert main(["models", "moe_resnet*"]) == 0
    out = capsys.readouterr().out
    assert "| moe_resnet18 | small | 5.83 | 0.192 |" in out
    assert main(["models", "*resnet*", "--image-size", "224"]) == 0
    out = capsys.readouterr().out
    assert "| moe_resnet18 | imagenet | 5.84 | 0.730 |" in out and "| resnet18 | imagenet | 11.18 | 1.814 |" in out


def test_errors_are_one_line_with_exit_code_2(capsys):
    assert main(["models", "nothing*"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("advmoe models: error: no registered model matches") and err.count("\n") == 1


def test_console_script_runs_a_benchmark():
    result = subprocess.run(
        [sys.executable, "-m", "cli", "bench", "sparse", "--archs", "resnet18", "--routers", "shared",
         "--batch-sizes", "1", "--width", "0.125", "--rounds", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "| moe_resnet18 | shared | 1 |" in result.stdout
