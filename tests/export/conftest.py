"""Parity of exported files with eager sparse execution, checked apart from the export's own gate:
the files are loaded with each runtime's own API (not export/'s runners) and run on batches the
gate never sees, each of which uses both experts."""
from __future__ import annotations

import warnings

import numpy as np
import onnxruntime
import pytest
import torch

import advmoe

ATOL = 1e-4  # max |logits - eager sparse|; routing must be equal
FILES = {"onnx": "model.onnx", "pt2": "model.pt2", "torchscript": "model.pt", "aoti": "model.aoti.pt2"}


def load_exported(path, kind: str):
    """x -> (logits, routing) as numpy arrays, from the exported file at `path`."""
    if kind == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: tuple(session.run(None, {"input": x.numpy()}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
        module = {"pt2": lambda p: torch.export.load(p).module(), "torchscript": torch.jit.load,
                  "aoti": torch._inductor.aoti_load_package}[kind](str(path))

    def run(x):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            logits, routing = module(x)
        return logits.numpy(), routing.numpy()

    return run


def fresh_batches(model, sizes=(5, 17, 40), seed=1234):
    """Random batches from another stream than the gate's (export/parity.py draws with seed 0)."""
    cfg = model.cfg
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=generator) for n in sizes]


@pytest.fixture
def assert_matches_eager():
    """check(checkpoint, out, kind): the exported file of `kind` in `out` gives eager sparse
    execution's routing exactly and its logits to ATOL, on fresh batches that use both experts."""

    def check(checkpoint, out, kind):
        model = advmoe.set_execution(advmoe.load_checkpoint(checkpoint), "sparse")
        run = load_exported(out / FILES[kind], kind)
        for x in fresh_batches(model):
            with torch.no_grad():
                expected, expected_routing = model.forward_with_routing(x)
            assert set(expected_routing[:, 0].tolist()) == {0, 1}, "the batch should use both experts"
            logits, routing = run(x)
            np.testing.assert_array_equal(routing, expected_routing.numpy())
            np.testing.assert_allclose(logits, expected.numpy(), rtol=0, atol=ATOL)

    return check
