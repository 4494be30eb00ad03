"""advmoe.usage: an expert's share, one definition for a routing tensor and for served counts."""
import torch

from advmoe.gate import expert_share
from advmoe.usage import share_of_counts


def test_a_routing_tensor_and_its_counts_give_the_same_shares():
    routing = torch.tensor([[0, 1], [1, 1], [1, 0], [1, 1]])  # 8 decisions: 2 to expert 0, 6 to expert 1
    assert expert_share(routing, 2) == share_of_counts([2, 6]) == share_of_counts({"1": 6, "0": 2}) == [0.25, 0.75]


def test_every_expert_has_an_entry_even_an_unused_one():
    assert expert_share(torch.zeros(3, 2, dtype=torch.long), 3) == [1.0, 0.0, 0.0]
    assert share_of_counts({2: 1}) == [0.0, 0.0, 1.0] and share_of_counts({0: 1}, num_experts=2) == [1.0, 0.0]


def test_nothing_routed_has_no_shares():
    assert share_of_counts({}) == share_of_counts([0, 0], num_experts=2) == expert_share(torch.zeros(0, 2, dtype=torch.long), 2) == []
