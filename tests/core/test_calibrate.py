import pytest
import torch

import advmoe
from advmoe.calibrate import untrained
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
