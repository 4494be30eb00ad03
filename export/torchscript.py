"""TorchScript export (model.pt) for LibTorch and Triton's PyTorch backend (pytorch_libtorch).

`torch.jit.script` of a small sparse inference module built from the model's folded per-expert
weights. Every data-dependent step is TorchScript code: the router's argmax, the grouping of the
batch by expert (nonzero, index_select, index_copy_) and, with per-layer gates, the same grouping
inside each MoE layer. What runs between these steps has no data-dependent branch once the
expert is fixed, so it is recorded by tracing the model's own `forward_backbone` with its convs
replaced by folded ones: there is no second implementation of the architectures to keep in
parity, and a trace that would freeze a value from the example batch is refused.

TorchScript is deprecated in torch (2.14 warns on every call); `export_torchscript` silences those
warnings, and `advmoe export` prints one line about it instead.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advmoe import ConvNorm2d, MoENet, MoEConv2d, Route, route
from advmoe.dispatch import group_rows, place

from .graph import example_input, module_runner, prepared_model

DEPRECATION = ("note: TorchScript (model.pt) is deprecated in torch and will be removed; it is written for "
               "LibTorch and Triton's pytorch_libtorch backend while they need it. Its successors are "
               "--format aoti (AOTInductor package), pt2 (torch.export) and onnx; see docs/export.md")
_JIT_WARNING = r"`torch\.jit\.\w+` is (deprecated|not supported)"


@contextmanager
def quiet_jit():
    """Silence torch's per-call TorchScript deprecation warnings (one line is printed instead)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_WARNING, category=FutureWarning)
        yield


class FoldedConv(nn.Module):
    """One expert's conv with BatchNorm folded in (what `_ConvUnit.fold` computes)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, stride: int, padding: int):
        super().__init__()
        self.register_buffer("weight", weight.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class ExpertGroup(nn.Module):
    """`advmoe.dispatch.dispatch` in TorchScript: group the rows of x by expert, run each
    non-empty group through its expert only, put the results back in batch order (weighted
    sum for top-k), with the core's own `group_rows` and `place`, in the same order, so the
    logits are the eager ones."""

    def __init__(self, experts: list[nn.Module]):
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(self, x: Tensor, experts: Tensor, weights: Optional[Tensor]) -> Tensor:
        batch = x.size(0)
        out: Optional[Tensor] = None
        e = 0
        for expert in self.experts:
            rows = group_rows(experts, e)
            n = rows.numel()
            if n > 0:
                y = expert(x if n == batch else x.index_select(0, rows))
                if weights is None and n == batch:
                    out = y  # top-1: the whole batch took this expert, no other group is non-empty
                else:
                    out = place(out, rows, y, batch, e, weights)
            e += 1
        if out is None:  # an empty batch
            out = self.experts[0](x)
        return out


class _Normalized(nn.Module):
    """Input check and normalization, as `MoENet.forward_with_routing` does them."""

    def __init__(self, model: MoENet):
        super().__init__()
        self.register_buffer("mean", model.normalize.mean.detach().clone())
        self.register_buffer("std", model.normalize.std.detach().clone())
        self.in_channels = model.cfg.in_channels

    def normalize(self, input: Tensor) -> Tensor:
        if input.dim() != 4 or input.size(1) != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}, H, W], got {input.shape}")
        return (input - self.mean) / self.std


class DenseModel(_Normalized):
    """The dense twin: logits only, as its ONNX graph."""

    def __init__(self, model: MoENet, backbone: nn.Module):
        super().__init__(model)
        self.backbone = backbone

    def forward(self, input: Tensor) -> Tensor:
        return self.backbone(self.normalize(input))


class SharedRouterModel(_Normalized):
    """Shared top-1 router: one decision for every MoE layer, the batch grouped once, each group
    run through its expert's whole sub-network."""

    def __init__(self, model: MoENet, router: nn.Module, experts: list[nn.Module]):
        super().__init__(model)
        self.router = router
        self.experts = ExpertGroup(experts)
        self.moe_layers = len(model.moe_layers)

    def forward(self, input: Tensor) -> tuple[Tensor, Tensor]:
        x = self.normalize(input)
        experts = self.router(x).argmax(1, keepdim=True)
        return self.experts(x, experts, None), experts.expand(-1, self.moe_layers)


class RoutedModel(_Normalized):
    """Per-layer gates, or a shared top-k router: the traced network calls the grouping of
    each MoE layer (an `ExpertGroup`, TorchScript) and returns (logits, routing)."""

    def __init__(self, model: MoENet, network: nn.Module):
        super().__init__(model)
        self.network = network

    def forward(self, input: Tensor) -> tuple[Tensor, Tensor]:
        return self.network(self.normalize(input))


# -- tracing the model's own code with folded convs --------------------------------------------
class _ConvLeaf(nn.Module):
    """Stands for a ConvNorm2d while tracing."""

    def __init__(self, unit: ConvNorm2d):
        super().__init__()
        self.conv = FoldedConv(*unit.folded[0], unit.stride, unit.padding)

    def forward(self, x: Tensor, route=None) -> Tensor:
        return self.conv(x)


class _MoELeaf(nn.Module):
    """Stands for a MoEConv2d while tracing: a fixed expert runs its folded conv (traced); a
    route goes to the scripted grouping, which keeps its data-dependent control flow."""

    def __init__(self, unit: MoEConv2d, grouped: bool):
        super().__init__()
        experts = [FoldedConv(w, b, unit.stride, unit.padding) for w, b in unit.folded]
        self.top_k = unit.top_k
        self.experts = nn.ModuleList(experts) if not grouped else None
        self.group = torch.jit.script(ExpertGroup(experts)) if grouped else None
        self.gate = unit.gate
        self.top1: Tensor | None = None

    def forward(self, x: Tensor, chosen=None) -> Tensor:
        if isinstance(chosen, int):
            return self.experts[chosen](x)
        if self.gate is not None:
            chosen = _route(self.gate(x), self.top_k)
        self.top1 = chosen.top1
        return self.group(x, chosen.experts, chosen.weights if self.top_k > 1 else None)


def _route(logits: Tensor, top_k: int) -> Route:
    """`advmoe.route` without the straight-through one-hot of top-1 (a Python autograd function
    that TorchScript cannot save, and whose weights top-1 dispatch does not read)."""
    if top_k > 1:
        return route(logits, top_k)
    experts = logits.topk(1, dim=1).indices  # the choice `route` makes
    return Route(experts=experts, weights=None, scores=None)


def _with_leaves(model: MoENet, grouped: bool) -> tuple[MoENet, list[_MoELeaf]]:
    """A copy of the model whose convs are folded leaves; the MoE leaves in module order."""
    copied = copy.deepcopy(model)
    moe_leaves = []
    for name, unit in list(copied.named_modules()):
        if isinstance(unit, (ConvNorm2d, MoEConv2d)):
            leaf = _MoELeaf(unit, grouped) if isinstance(unit, MoEConv2d) else _ConvLeaf(unit)
            parent, _, child = name.rpartition(".")
            setattr(copied.get_submodule(parent), child, leaf)
            if isinstance(leaf, _MoELeaf):
                moe_leaves.append(leaf)
    return copied, moe_leaves


class _Backbone(nn.Module):
    def __init__(self, model: MoENet, expert: int | None = None):
        super().__init__()
        self.model, self.expert = model, expert

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_backbone(x, self.expert)


class _Routed(nn.Module):
    """Per-layer gates or a shared top-k router: logits and the top-1 expert per MoE layer."""

    def __init__(self, model: MoENet, moe_leaves: list[_MoELeaf]):
        super().__init__()
        self.model, self.moe_leaves = model, moe_leaves

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.model.router is None:
            logits = self.model.forward_backbone(x, None)
            return logits, torch.stack([leaf.top1 for leaf in self.moe_leaves], 1)
        chosen = _route(self.model.router(x), self.model.cfg.top_k)
        return self.model.forward_backbone(x, chosen), chosen.top1[:, None].expand(-1, len(self.moe_leaves))


class TorchScriptError(RuntimeError):
    """A model that cannot be written as TorchScript: says which, and which formats work."""


class _FrozenTrace(Exception):
    pass


def _trace(module: nn.Module, x: Tensor) -> torch.jit.ScriptModule:
    # A TracerWarning means the trace froze a value of the example batch: refuse it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        traced = torch.jit.trace(module.eval(), (x,), check_trace=False)
    frozen = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if frozen:
        raise _FrozenTrace(f"the trace would freeze a value of the example batch: {str(frozen[0].message).split('. ')[0]}")
    return traced


def script_module(model: MoENet) -> torch.jit.ScriptModule:
    """The TorchScript module of a model's sparse execution: input [B, C, H, W] in [0, 1],
    output logits (dense) or (logits, routing) (MoE), as the ONNX graph."""
    name = getattr(model, "model_name", type(model).__name__)
    if model.execution != "sparse":
        raise ValueError(f"{name}: TorchScript export needs sparse execution (advmoe.set_execution(model, 'sparse'))")
    model = prepared_model(model)  # folds the inference weights
    cfg = model.cfg
    x = example_input(model)
    try:
        with quiet_jit(), torch.no_grad():
            if not cfg.is_moe:
                copied, _ = _with_leaves(model, grouped=False)
                module = DenseModel(model, _trace(_Backbone(copied), x))
            elif model.router is not None and cfg.top_k == 1:
                copied, _ = _with_leaves(model, grouped=False)
                router = _trace(copied.router, x)
                copied.router = None  # each expert's sub-network holds the backbone only
                experts = [_trace(_Backbone(copied, e), x) for e in range(cfg.num_experts)]
                module = SharedRouterModel(model, router, experts)
            else:
                copied, leaves = _with_leaves(model, grouped=True)
                module = RoutedModel(model, _trace(_Routed(copied, leaves), x))
            return torch.jit.script(module.eval())
    except Exception as e:  # one line instead of a traceback from inside torch.jit
        reason = str(e) if isinstance(e, _FrozenTrace) else f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        raise TorchScriptError(f"{name} cannot be exported to TorchScript ({reason}); "
                               "the onnx, pt2 and aoti formats export it") from e


def export_torchscript(model: MoENet, path: str | Path) -> Path:
    """model.pt: `torch.jit.load(path)` in LibTorch or any Python with torch, no advmoe needed."""
    module = script_module(model)
    with quiet_jit():
        module.save(str(path))
    return Path(path)


def torchscript_runner(path: str | Path):
    """A callable x -> (logits, routing or None) over the loaded model.pt."""
    with quiet_jit():
        return module_runner(torch.jit.load(str(path)))
