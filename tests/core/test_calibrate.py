import pytest
import torch

import advmoe
from advmoe.calibrate import balance_routing, untrained
from helpers import SMALL_WIDTH, model_variants, variant_id


@pytest.mark.parametrize("name,router", model_variants(), ids=variant_id)
def test_an_untrained_model_runs_as_a_trained_one_would(name, router):
    """BatchNorm calibrated on the images (eval-mode activations stay in range) and, for a MoE
    model, every router splitting them over its experts; the same seed gives the same weights."""
    torch.manual_seed(1)
    x = torch.rand(8, 3, 32, 32)
    kwargs = {"width": SMALL_WIDTH / 2} | ({"router": router} if router else {})
    model = untrained(name, x, **kwargs)
    assert not model.training
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in norms)
    with torch.no_grad():
        logits = model(x)
    assert logits.abs().max() < 1e3
    if router:
        routing = model.last_routing
        assert all(len(routing[:, layer].unique()) == 2 for layer in range(routing.shape[1]))
    again = untrained(name, x, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("router", ["shared", "per_layer"])
@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_balance_routing_sends_the_asked_share_to_expert_0(router, share):
    """The uneven loads a benchmark asks for: `share` of the batch to expert 0 at every routed layer."""
    torch.manual_seed(2)
    x = torch.rand(16, 3, 32, 32)
    model = untrained("moe_resnet18", x, width=SMALL_WIDTH / 2, router=router)
    balance_routing(model, x, share)
    with torch.no_grad():
        model(x)
    assert (model.last_routing == 0).float().mean(0).tolist() == [share] * model.last_routing.shape[1]


def test_balance_routing_refuses_what_it_cannot_do():
    x = torch.rand(4, 3, 32, 32)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        balance_routing(untrained("moe_resnet18", x, width=SMALL_WIDTH / 2), x, 1.5)
    with pytest.raises(ValueError, match="two experts"):
        balance_routing(untrained("moe_resnet18", x, width=SMALL_WIDTH / 2, num_experts=3), x, 0.75)
