"""The profile runs on a tiny checkpoint and prints both models' operators side by side; its
numbers are read in docs/sparse.md, never asserted on time here."""
import torch

from benchmarks import profile_sparse
from cli.main import main as cli
from helpers import fmnist_moe_checkpoint


def test_run_profiles_the_moe_model_and_its_dense_twin(tmp_path):
    checkpoint = fmnist_moe_checkpoint(tmp_path)
    found = profile_sparse.run(checkpoint, batch_sizes=(1, 4), calls=2, rounds=1)
    assert list(found) == [1, 4] and all(list(p) == ["sparse MoE", "dense twin"] for p in found.values())
    for profiles in found.values():
        for p in profiles.values():
            assert p.ms_per_forward > 0
            assert p.calls_per_forward == sum(calls for _, calls in p.operators.values())
            assert any(op.endswith("convolution") for op in p.operators)
        # the router and the grouping are operators the twin does not run
        assert profiles["sparse MoE"].calls_per_forward > profiles["dense twin"].calls_per_forward


def test_the_twin_is_the_same_architecture_dense_at_the_same_width(tmp_path):
    checkpoint = fmnist_moe_checkpoint(tmp_path)
    built = profile_sparse.models(checkpoint, torch.rand(8, 1, 28, 28))
    moe, twin = built["sparse MoE"], built["dense twin"]
    assert (twin.model_name, twin.cfg.is_moe) == ("resnet18", False)
    assert (twin.cfg.width, twin.cfg.in_channels, twin.cfg.image_size) == (moe.cfg.width, 1, 28)
    assert twin.execution == "sparse" and twin.channels_last  # prepared for inference as the project does


def test_advmoe_bench_profile_prints_the_operator_table_of_both_models(tmp_path, capsys):
    checkpoint = fmnist_moe_checkpoint(tmp_path)
    assert cli(["bench", "profile", "--checkpoint", str(checkpoint), "--batch-sizes", "2", "--calls", "1",
                "--rounds", "1", "--top", "5"]) == 0
    printed = capsys.readouterr().out
    assert "## batch 2 (per forward)" in printed
    assert "| operator | sparse MoE: self CPU ms | sparse MoE: calls | dense twin: self CPU ms | dense twin: calls |" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| `aten::")]
    assert len(rows) == 5 and all(len(row.split("|")) == 7 for row in rows)
    assert cli(["bench", "profile", "--checkpoint", str(tmp_path / "missing")]) == 2


def test_the_onnxruntime_profile_counts_the_kernels_of_each_export(tmp_path):
    """In onnxruntime both models run as `advmoe export` exports them: the MoE model's router and
    grouping are kernels the twin does not launch; by shape, each entry names its operator type."""
    checkpoint = fmnist_moe_checkpoint(tmp_path)
    found = profile_sparse.run(checkpoint, batch_sizes=(4,), calls=2, rounds=1, runtime="onnxruntime")
    moe, twin = found[4]["sparse MoE"], found[4]["dense twin"]
    for p in (moe, twin):
        assert p.ms_per_forward > 0 and p.calls_per_forward == sum(n for _, n in p.operators.values())
        assert "Conv" in p.operators
    assert {"NonZero", "ScatterND"} <= set(moe.operators) and not {"NonZero", "ScatterND"} & set(twin.operators)
    by_shape = profile_sparse.run(checkpoint, batch_sizes=(4,), calls=2, rounds=1, runtime="onnxruntime", by_shape=True)
    convs = [op for op in by_shape[4]["dense twin"].operators if op.startswith("Conv ")]
    assert convs and all(" -> " in op and op.split()[1].startswith("4x") for op in convs)
    assert sum(n for op, (_, n) in by_shape[4]["dense twin"].operators.items() if op.startswith("Conv")) == \
        twin.operators["Conv"][1]
