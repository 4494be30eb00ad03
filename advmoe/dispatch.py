"""Sparse dispatch: run each sample through its chosen experts only.

Used twice: by `MoEConv2d` per layer (per-layer routers, top-k), and by the model for the
shared top-1 router, where the batch is grouped once and each group runs a whole sub-network.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor


def dispatch(
    x: Tensor,
    experts: Tensor,
    num_experts: int,
    expert_fn: Callable[[Tensor, int], Tensor],
    weights: Tensor | None = None,
) -> Tensor:
    """Group the rows of `x` by expert, call `expert_fn(rows_of_x, e)` once per non-empty
    group, and put the results back in batch order.

    experts: LongTensor [B, k] of chosen experts. weights: None for top-1 (the output is the
    chosen expert's), else [B, num_experts] gate weights for a weighted sum over the k chosen.
    """
    if torch.compiler.is_exporting():
        return _traceable_dispatch(x, experts, num_experts, expert_fn, weights)
    batch = x.shape[0]
    out = None
    for e in range(num_experts):
        rows = group_rows(experts, e)
        n = rows.numel()
        if n == 0:
            continue  # eager fast path: an expert nobody chose costs nothing
        y = expert_fn(x if n == batch else _rows(x, rows), e)
        if weights is None and n == batch:
            return y  # the whole batch took one expert (always so at batch 1): no copies
        out = place(out, rows, y, batch, e, weights)
    return expert_fn(x, 0) if out is None else out  # out is None only for an empty batch


# group_rows and place are TorchScript-compatible: the TorchScript export's grouping
# (export/torchscript.py) calls them too, so both compute the same thing the same way.
def group_rows(experts: Tensor, expert: int) -> Tensor:
    """The batch rows that chose `expert` (experts: [B, k])."""
    return (experts == expert).any(1).nonzero().squeeze(1)


def place(out: Optional[Tensor], rows: Tensor, y: Tensor, batch: int, expert: int,
          weights: Optional[Tensor]) -> Tensor:
    """Put expert `expert`'s output `y` for `rows` into the batch-sized `out`, created on first
    use in y's memory format: a copy for top-1, the gate-weighted sum for top-k."""
    if weights is not None:
        y = y * weights.index_select(0, rows)[:, expert].view([-1] + [1] * (y.dim() - 1))
    if out is None:
        # Top-1 writes every row exactly once, so the output needs no zeroing.
        out = torch.empty([batch] + list(y.shape[1:]), dtype=y.dtype, device=y.device,
                          memory_format=torch.channels_last if is_channels_last(y) else torch.contiguous_format)
        if weights is not None:
            out.zero_()
    if weights is None:
        out.index_copy_(0, rows, y)
    else:
        out.index_add_(0, rows, y)
    return out


def _traceable_dispatch(x, experts, num_experts, expert_fn, weights):
    """The same dispatch without data-dependent Python branches, for torch.export / ONNX:
    every expert runs on its (possibly empty) group, nonzero -> index_select -> expert ->
    index_copy, which ONNX expresses as NonZero, Gather and ScatterND."""
    batch = x.shape[0]
    out = None
    for e in range(num_experts):
        rows = group_rows(experts, e)
        torch._check(rows.shape[0] <= batch)  # tells the tracer the group size is a batch slice
        y = expert_fn(x.index_select(0, rows), e)
        if weights is not None:
            y = y * weights.index_select(0, rows)[:, e].reshape(-1, *[1] * (y.dim() - 1))
        if out is None:
            out = torch.zeros((batch, *y.shape[1:]), dtype=y.dtype, device=y.device)
        out = out.index_add(0, rows, y) if weights is not None else out.index_copy(0, rows, y)
    return out


def capacity_dispatch(
    x: Tensor,
    experts: Tensor,
    num_experts: int,
    expert_fn: Callable[[Tensor, int], Tensor],
    weights: Tensor | None = None,
    capacity: int | None = None,
    buckets: tuple[int, ...] = (),
) -> Tensor:
    """`dispatch` with static shapes: expert e runs on exactly `capacity` rows, its group padded
    (with copies of a row whose result is never read). The default capacity is the batch, which no
    group can exceed, so nothing is read back to the host: every shape follows from x's, the GPU
    can replay the whole forward as a CUDA graph, and the exported graph needs no NonZero or
    ScatterND. A smaller capacity must hold the largest group: given none, the smallest of `buckets`
    that does (`capacity_for`).

    The groups come from one sort of (expert, position) keys; each (sample, choice) pair finds its
    result at expert * capacity + its rank within its expert's group, a gather."""
    batch, k = experts.shape
    if batch == 0 and not torch.compiler.is_exporting():
        return expert_fn(x, 0)  # an empty batch: nothing to group
    pairs = batch * k
    if capacity is None:
        capacity = capacity_for(experts, num_experts, buckets) if buckets else batch
    chosen = experts.reshape(-1)  # pair p = (sample p // k, choice p % k)
    onehot = (chosen[:, None] == torch.arange(num_experts, device=x.device)[None, :]).long()  # [pairs, N]
    counts = onehot.sum(0)
    rank = ((onehot.cumsum(0) - 1) * onehot).sum(1)  # each pair's place in its expert's group
    order = torch.argsort(chosen * pairs + torch.arange(pairs, device=x.device))  # grouped by expert, then pair
    starts = counts.cumsum(0) - counts
    slots = starts[:, None] + torch.arange(capacity, device=x.device)[None, :]  # [N, capacity]
    rows = order.index_select(0, slots.clamp(max=pairs - 1).reshape(-1)).reshape(num_experts, capacity) // k
    outputs = torch.cat([expert_fn(_rows(x, rows[e]), e) for e in range(num_experts)])  # [N * capacity, ...]
    y = _rows(outputs, chosen * capacity + rank)  # [pairs, ...], channels_last kept
    if weights is None:  # top-1: the chosen expert's output
        return y
    gains = weights.gather(1, experts).reshape(-1, *[1] * (y.dim() - 1))
    return (y * gains).unflatten(0, (batch, k)).sum(1)


def capacity_for(experts: Tensor, num_experts: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds the largest group (the batch when none does): the one read of
    the group sizes per batch that a smaller capacity costs."""
    largest = int(torch.bincount(experts.reshape(-1), minlength=num_experts).max())  # the host reads it here
    return next((b for b in sorted(buckets) if b >= largest), experts.shape[0])


def is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def memory_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def _rows(x: Tensor, rows: Tensor) -> Tensor:
    if memory_format(x) == torch.channels_last:
        # index_select returns a contiguous result: select in NHWC order so that the rows come
        # back channels_last in one copy instead of two.
        return x.permute(0, 2, 3, 1).index_select(0, rows).permute(0, 3, 1, 2)
    return x.index_select(0, rows)
