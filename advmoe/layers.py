"""Convolution units shared by every architecture: a dense conv (+ BatchNorm) and the MoE conv.

Both take `(x, route)` so that blocks are written once for the dense model and its MoE twin.
For inference (`set_execution(model, "sparse")`) each unit folds its BatchNorm into detached
per-expert weights, and the MoE conv computes only the chosen experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import capacity_dispatch, dispatch
from .gate import Route, SortedRoute, route as make_route

# A Route, a SortedRoute (the masked path on a batch sorted by expert), a fixed expert (the
# shared-router sparse path), or nothing.
RouteArg = Route | SortedRoute | int | None


class Normalize(nn.Module):
    """Per-channel (x - mean) / std. The first layer of every model, so attacks, export and
    serving all work on raw pixels in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def fold_batchnorm(weight: Tensor, norm: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor | None]:
    """Fold an eval-mode BatchNorm into the conv weight before it. `weight` may hold several
    experts stacked on dim 0 that share the norm (weight.shape[0] = N * norm channels)."""
    weight = weight.detach()
    if norm is None:
        return weight, None
    scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
    bias = norm.bias.detach() - norm.running_mean * scale
    repeats = weight.shape[0] // scale.shape[0]
    return weight * scale.repeat(repeats).view(-1, 1, 1, 1), bias


class _ConvUnit(nn.Module):
    """What dense and MoE convs share: geometry, the optional norm, the inference fold."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, norm: bool):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, kernel_size // 2
        self.norm = nn.BatchNorm2d(out_channels) if norm else None
        # Set by set_execution("sparse"): per-expert (weight, bias) with BatchNorm folded in.
        self.folded: list[tuple[Tensor, Tensor | None]] | None = None

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding)

    def fold(self, channels_last: bool = True) -> None:
        weight, bias = fold_batchnorm(self.full_weight, self.norm)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        # One tensor per expert (clones, not views of one weight), in the chosen memory format.
        self.folded = [(w.clone(memory_format=fmt), bias) for w in weight.split(self.out_channels)]

    def unfold(self) -> None:
        self.folded = None

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        k, s, p = self.kernel_size, self.stride, self.padding
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    def macs(self, h: int, w: int) -> tuple[int, int, int]:
        """MACs per image of what sparse execution runs, and the output size."""
        ho, wo = self.output_size(h, w)
        return ho * wo * self.out_channels * self.in_channels * self.kernel_size**2, ho, wo

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


class ConvNorm2d(_ConvUnit):
    """A dense conv (no bias), optionally followed by BatchNorm. Ignores the route."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, norm: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, norm)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, self.padding, bias=False)

    @property
    def full_weight(self) -> Tensor:
        return self.conv.weight

    def forward(self, x: Tensor, route: RouteArg = None) -> Tensor:
        if self.folded is not None:
            return self._conv(x, *self.folded[0])
        x = self.conv(x)
        return x if self.norm is None else self.norm(x)


class LayerGate(nn.Module):
    """The paper's per-layer gating network: global average pool, then a linear map to experts."""

    def __init__(self, in_channels: int, num_experts: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean((2, 3)))


class MoEConv2d(_ConvUnit):
    """N experts of `out_channels` each, stored as one weight of N * out_channels filters;
    expert e is the slice [e * out_channels, (e + 1) * out_channels). The output is the chosen
    expert's channels only (top-1), or the gate-weighted sum of the top-k experts. The optional
    BatchNorm after it is shared by the experts.

    route: a `Route` from the shared router, or None when the layer has its own `gate`
    (per-layer routing), or an int: run that one expert (the shared-router sparse path, which
    groups the batch by expert once and runs a whole sub-network per group).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        norm: bool = True,
        num_experts: int = 2,
        top_k: int = 1,
        gate: bool = False,
        gate_grad: str = "softmax",
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, norm)
        self.num_experts, self.top_k, self.gate_grad = num_experts, top_k, gate_grad
        self.weight = nn.Parameter(torch.empty(num_experts * out_channels, in_channels, kernel_size, kernel_size))
        self.gate = LayerGate(in_channels, num_experts) if gate else None
        self.last_route: Route | None = None
        self.capacity_buckets: tuple[int, ...] | None = None  # not None: static execution (set_execution)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Kaiming per expert, as if each expert were its own conv of out_channels filters.
        for expert in self.weight.data.split(self.out_channels):
            nn.init.kaiming_normal_(expert, mode="fan_out", nonlinearity="relu")

    @property
    def full_weight(self) -> Tensor:
        return self.weight

    def forward(self, x: Tensor, route: RouteArg = None) -> Tensor:
        if isinstance(route, int):
            if self.folded is None:
                raise RuntimeError("a fixed expert needs sparse execution (set_execution(model, 'sparse'))")
            return self._conv(x, *self.folded[route])
        if isinstance(route, SortedRoute):
            return self._sorted(x, route)
        if self.gate is not None:
            route = make_route(self.gate(x), self.top_k, self.gate_grad)
        if route is None:
            raise ValueError("MoEConv2d needs a route: pass one or build the layer with gate=True")
        self.last_route = route
        return self._dispatch(x, route) if self.folded is not None else self._masked(x, route)

    def _masked(self, x: Tensor, route: Route) -> Tensor:
        """Training path (the reference code's): compute every expert, keep the chosen ones
        through the straight-through gate weights, so experts and router get gradients."""
        y = F.conv2d(x, self.weight, None, self.stride, self.padding)
        y = y.unflatten(1, (self.num_experts, self.out_channels))
        y = (y * route.weights[:, :, None, None, None]).sum(1)
        return y if self.norm is None else self.norm(y)

    def _sorted(self, x: Tensor, route: SortedRoute) -> Tensor:
        """The masked path when no unchosen expert's output is needed: the batch comes sorted
        by expert, each expert convolves its own slice of rows (1/N of the masked path's conv
        work), and the chosen gate weight scales the result as in `_masked`."""
        parts, start = [], 0
        for expert, rows in enumerate(route.counts):
            if rows:
                weight = self.weight[expert * self.out_channels:(expert + 1) * self.out_channels]
                parts.append(self._conv(x[start:start + rows], weight))
                start += rows
        y = (parts[0] if len(parts) == 1 else torch.cat(parts)) * route.gain[:, :, None, None]
        return y if self.norm is None else self.norm(y)

    def _dispatch(self, x: Tensor, route: Route) -> Tensor:
        """Inference path: run each sample through its chosen experts' weights only."""
        weights = route.weights if self.top_k > 1 else None
        expert = lambda rows, e: self._conv(rows, *self.folded[e])  # noqa: E731
        if self.capacity_buckets is None:
            return dispatch(x, route.experts, self.num_experts, expert, weights)
        return capacity_dispatch(x, route.experts, self.num_experts, expert, weights, buckets=self.capacity_buckets)

    def macs(self, h: int, w: int) -> tuple[int, int, int]:
        macs, ho, wo = super().macs(h, w)
        gate = self.in_channels * self.num_experts if self.gate is not None else 0
        return macs * self.top_k + gate, ho, wo

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_experts={self.num_experts}, top_k={self.top_k}"



def pooled(pool: nn.MaxPool2d, size: int) -> int:
    """A max-pool's output size along one side (it has no MACs; the layers after it see this size)."""
    return (size + 2 * pool.padding - pool.kernel_size) // pool.stride + 1
