"""Expert usage from counts: the one definition of an expert's share, for the routing tensor of
a model (`advmoe.gate.expert_share`) and for the counts a server's /metrics reports (the load
test). Standard library only: the clients import it without torch."""
from __future__ import annotations

from collections.abc import Mapping, Sequence


def share_of_counts(counts: Mapping[int | str, int] | Sequence[int], num_experts: int = 0) -> list[float]:
    """Share of the routing decisions each expert got, from its count ({expert: count} or a list
    indexed by expert): one entry per expert, at least `num_experts`; [] when nothing was routed."""
    by_expert = {int(e): c for e, c in (counts.items() if isinstance(counts, Mapping) else enumerate(counts))}
    total = sum(by_expert.values())
    if not total:
        return []
    experts = max(max(by_expert) + 1, num_experts)
    return [by_expert.get(e, 0) / total for e in range(experts)]
