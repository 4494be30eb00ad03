"""Each method's step, on a fixed batch: it lowers its own loss, and AdvMoE's two steps touch
only their own parameter group."""
import pytest
import torch
import torch.nn.functional as F

from advmoe.calibrate import routers
from advmoe.routers import ROUTERS
from helpers import small_model
from training.config import resolve
from training.methods import ALTERNATING, METHODS, Step, advmoe_attack, reference_router_step, route_aware_attack
from training.trainer import make_optimizers

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, many small steps


def make_step(method, router="shared", router_loss="model", lr=0.05, expert_loss="trades"):
    cfg = resolve(method=method, model="moe_resnet18", dataset="fashion_mnist", eps=0.1, attack_step=0.05,
                  router_loss=router_loss, lr=lr, expert_loss=expert_loss)
    torch.manual_seed(0)
    model = small_model("moe_resnet18", router, in_channels=1, image_size=28, width=0.125, router_blocks=1, router_width=8)
    model.train()
    optimizers = make_optimizers(cfg, model)
    return Step(model, cfg, optimizers)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)


@pytest.mark.parametrize("method", METHODS)
def test_steps_on_one_batch_lower_the_methods_own_loss(method):
    """A few steps, not one: the attack adapts to the updated model, and AdvMoE measures its router
    loss after its expert step, so one step's change is within the numerics of the CPU it runs on
    (AdvMoE's router loss rose by 0.001 after one step on one machine, and fell by 0.25 over four)."""
    step, (x, y) = make_step(method), batch()
    history = []
    for _ in range(5):
        torch.manual_seed(2)  # the same attack noise each step: the same loss, at the updated parameters
        history.append(METHODS[method].step(step, x, y))
    before, after = history[0], history[-1]
    losses = [key for key in before if key.endswith("loss")]
    assert losses
    for key in losses:
        assert after[key] < before[key] - 0.02, (key, [h[key] for h in history])


@pytest.mark.parametrize("method,router_loss,router", [
    *[(m, loss, r) for m, loss in (("advmoe", "model"), ("advmoe", "reference"), ("router-only", "model"))
      for r in tuple(ROUTERS)],
    ("route-aware", "reference", "per_layer"),  # its shared router step is AdvMoE's
])
def test_router_step_moves_only_router_parameters_and_expert_step_only_experts(method, router_loss, router):
    step = make_step(method, router, router_loss)
    model = step.model
    router_ids = {id(p) for p in model.router_parameters()}
    changed_by = {}
    update = step.update

    def recording_update(group, loss, **kwargs):
        before = {id(p): p.detach().clone() for p in model.parameters()}
        value = update(group, loss, **kwargs)
        changed_by[group] = {i for i, p in ((id(p), p) for p in model.parameters()) if not torch.equal(before[i], p)}
        return value

    step.update = recording_update
    METHODS[method].step(step, *batch())
    assert changed_by["router"] and changed_by["router"] <= router_ids
    assert changed_by["experts"] and not changed_by["experts"] & router_ids


def backbone_statistics(model):
    in_router = {id(m) for r in routers(model) for m in r.modules()}
    return {name: b.clone() for name, m in model.named_modules() if id(m) not in in_router
            for b_name, b in m.named_buffers(recurse=False) if "running" in b_name}


@pytest.mark.parametrize("router", list(ROUTERS))
def test_the_reference_router_step_leaves_the_backbone_statistics_and_runs_only_the_shared_router(router):
    step, (x, y) = make_step("advmoe", router, "reference"), batch()
    model = step.model
    before = backbone_statistics(model)
    calls = []
    handle = model.stem.register_forward_hook(lambda *args: calls.append(1))
    router_before = [p.clone() for p in model.router_parameters()]
    reference_router_step(step, x, (x + 0.05 * torch.randn_like(x)).clamp(0, 1), y)
    handle.remove()
    after = backbone_statistics(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert len(calls) == (0 if router == "shared" else 2)  # the backbone runs only to reach per-layer gates
    assert any(not torch.equal(a, b) for a, b in zip(router_before, model.router_parameters()))


@pytest.mark.parametrize("expert_loss", ["trades", "ce"])
def test_the_route_aware_attack_keeps_per_example_the_worse_candidate(expert_loss):
    step, (x, y) = make_step("route-aware", "shared", "reference", expert_loss=expert_loss), batch()
    torch.manual_seed(3)
    chosen, stats = route_aware_attack(step, x, y)
    torch.manual_seed(3)
    through, _ = advmoe_attack(step, x, y)  # the same noise: the first candidate again
    assert (chosen - x).abs().max() <= step.cfg.eps + 1e-6 and chosen.min() >= 0 and chosen.max() <= 1
    assert 0 <= stats["route_fixed_share"] <= 1
    p, _ = step.clean_targets(x, with_router=False)
    model = step.model.eval()
    with torch.no_grad():  # worse by the term the expert step minimises
        chosen_loss, through_loss = (step.expert_loss_per_example(model(c), y, p) for c in (chosen, through))
    assert (chosen_loss >= through_loss - 1e-6).all()


@pytest.mark.parametrize("method", ALTERNATING)
def test_the_ce_expert_loss_is_madrys_its_attack_raises_it_and_a_step_lowers_it(method):
    step, (x, y) = make_step(method, "shared", "reference", expert_loss="ce"), batch()
    model = step.model
    x_adv, _ = advmoe_attack(step, x, y)
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    model.train()
    with torch.no_grad():  # CE(f(x'), y) alone: no clean term, unlike TRADES
        assert torch.allclose(step.expert_loss(x, x_adv, y), F.cross_entropy(model(x_adv), y))
    torch.manual_seed(2)
    before = METHODS[method].step(step, x, y)
    torch.manual_seed(2)
    assert METHODS[method].step(step, x, y)["loss"] < before["loss"]
