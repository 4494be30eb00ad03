"""Trace a model's sparse execution into ONNX (dynamo exporter) and torch.export (.pt2).

The graph keeps the data-dependent dispatch: the router's ArgMax/TopK picks experts, NonZero
groups the batch, Gather takes each group's rows, the expert's convs run on them, ScatterND
puts the results back. Nothing multiplies dense outputs by a mask.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from advmoe import MoENet
from advmoe.runtimes import onnx_session

INPUT = "input"
LOGITS, ROUTING = "logits", "routing"
OPSET = 18
MAX_BATCH = 4096


class WithRouting(nn.Module):
    """What the exported graph computes: logits, and for a MoE model the routing too."""

    def __init__(self, model: MoENet):
        super().__init__()
        self.model = model

    def forward(self, input: torch.Tensor):
        logits, routing = self.model.forward_with_routing(input)
        return (logits, routing) if self.model.cfg.is_moe else logits


def output_names(model: MoENet) -> list[str]:
    return [LOGITS, ROUTING] if model.cfg.is_moe else [LOGITS]


def example_input(model: MoENet, batch: int = 2) -> torch.Tensor:
    cfg = model.cfg
    return torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))


def prepared_model(model: MoENet) -> MoENet:
    """Export traces the model as it is set (sparse or masked); run it once eagerly first so
    sparse execution folds its inference weights, which the trace then reads."""
    model.eval()
    with torch.no_grad():
        model(example_input(model))
    return model


def _prepared(model: MoENet) -> WithRouting:
    return WithRouting(prepared_model(model)).eval()


def _dynamic_batch() -> dict:
    return {INPUT: {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}


def export_onnx(model: MoENet, path: str | Path, opset: int = OPSET) -> Path:
    """One self-contained .onnx file, dynamic batch axis, input `input` float32 [B, C, H, W]
    in [0, 1], outputs `logits` [B, classes] and (MoE) `routing` int64 [B, n_moe_layers]."""
    if opset < 18:
        raise ValueError(f"opset {opset}: the dynamo exporter needs opset 18 or newer")
    wrapper = _prepared(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's chatter about its own internals
        program = torch.onnx.export(
            wrapper, (example_input(model),), dynamo=True, opset_version=opset,
            input_names=[INPUT], output_names=output_names(model),
            dynamic_shapes=_dynamic_batch(), external_data=False, verbose=False,
        )
    program.save(str(path), external_data=False)
    return Path(path)


def exported_program(model: MoENet) -> torch.export.ExportedProgram:
    """The torch.export program of the model as it is set, dynamic batch axis."""
    wrapper = _prepared(model)
    with torch.no_grad():
        return torch.export.export(wrapper, (example_input(model),), dynamic_shapes={"input": _dynamic_batch()[INPUT]})


def export_program(model: MoENet, path: str | Path) -> Path:
    """torch.export ExportedProgram (.pt2): the same graph for PyTorch runtimes."""
    torch.export.save(exported_program(model), str(path))
    return Path(path)


def onnx_runner(path: str | Path, threads: int = 2):
    """A callable x -> (logits, routing or None) over an onnxruntime session."""
    session = onnx_session(path, threads)

    def run(x: torch.Tensor):
        outputs = session.run(None, {INPUT: x.numpy().astype(np.float32)})
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)

    return run


def module_runner(module):
    """A callable x -> (logits, routing or None) over a module that returns logits, or logits
    and routing (as a tuple or, from an AOTInductor package, a list)."""

    def run(x: torch.Tensor):
        with torch.no_grad():
            out = module(x)
        out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return out[0].numpy(), (out[1].numpy() if len(out) > 1 else None)

    return run


def program_runner(path: str | Path):
    return module_runner(torch.export.load(str(path)).module())


def eager_runner(model: MoENet):
    def run(x: torch.Tensor):
        with torch.no_grad():
            logits, routing = model.forward_with_routing(x)
        return logits.numpy(), (routing.numpy() if model.cfg.is_moe else None)

    return run
