"""MoE layer and conversion: capacity, auxiliary losses by hand, router gradients, upcycling, MAC counts."""

import math

import pytest
import torch
from torch import nn

from lightning_fed.models import MNIST1DFFN, MNIST1DMLP
from lightning_fed.moe import MoELayer, convert_to_moe, count_macs, make_experts


def _linear_experts(num: int, d: int = 6, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Linear(d, d) for _ in range(num)]


def test_capacity_is_respected_and_drops_are_counted():
    torch.manual_seed(0)
    layer = MoELayer(_linear_experts(4), 6, k=1, capacity_factor=1.0)
    with torch.no_grad():  # a router that sends almost everything to expert 0
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0
    x = torch.randn(40, 6).abs() + 0.1
    y = layer(x)
    cap = layer.capacity(40)
    assert cap == 10
    counts = layer.token_counts
    assert int(counts.max()) <= cap and int(counts[0]) == cap
    stats = layer.stats[-1]
    assert math.isclose(float(stats.dropped), 1 - counts.sum().item() / 40, abs_tol=1e-6)
    assert float(stats.dropped) > 0.5
    # dropped samples produce zero output; kept ones the expert's output times the gate
    kept = (y.abs().sum(-1) > 0).sum().item()
    assert kept == counts.sum().item()


def test_capacity_prefers_first_choices_over_second():
    torch.manual_seed(0)
    layer = MoELayer(_linear_experts(2), 6, k=2, capacity_factor=0.6)  # capacity = ceil(0.6*20*2/2) = 12
    x = torch.randn(20, 6)
    seen = {}
    for e, ex in enumerate(layer.experts):
        ex.register_forward_hook(lambda m, a, o, e=e: seen.__setitem__(e, a[0].detach().clone()))
    layer(x)
    assert layer.token_counts.tolist() == [12, 12]
    _, _, _, top_e = layer.route(x)
    for e in range(2):  # every token whose first choice is e got a place in e (<= 12 of them)
        first = x[top_e[:, 0] == e]
        assert len(first) <= 12
        got = seen[e]
        assert all(any(torch.equal(row, g) for g in got) for row in first)


def test_dropless_processes_everything():
    torch.manual_seed(0)
    layer = MoELayer(_linear_experts(3), 6, k=2, capacity_factor=None)
    layer(torch.randn(33, 6))
    assert int(layer.token_counts.sum()) == 66 and float(layer.stats[-1].dropped) == 0.0


def test_aux_losses_match_hand_computation():
    torch.manual_seed(0)
    layer = MoELayer(_linear_experts(4), 6, k=1, capacity_factor=None)
    x = torch.randn(16, 6)
    layer(x)
    stats = layer.stats[-1]
    with torch.no_grad():
        logits = x @ layer.router.weight.t()
    probs = torch.softmax(logits, -1)
    choice = probs.argmax(-1)
    f = torch.tensor([(choice == e).float().mean().item() for e in range(4)])
    p_mean = probs.mean(0)
    balance = 4 * float((f * p_mean).sum())
    z = float((torch.logsumexp(logits, -1) ** 2).mean())
    entropy = float(-(probs * probs.log()).sum(-1).mean())
    assert math.isclose(float(stats.balance_loss), balance, rel_tol=1e-5)
    assert math.isclose(float(stats.z_loss), z, rel_tol=1e-5)
    assert math.isclose(float(stats.entropy), entropy, rel_tol=1e-5)
    assert torch.allclose(stats.load, f, atol=1e-6)


def test_balance_loss_is_one_when_perfectly_balanced():
    layer = MoELayer(_linear_experts(2), 6, k=1, capacity_factor=None)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[1, 0] = 1.0, -1.0
    x = torch.zeros(4, 6)
    x[:, 0] = torch.tensor([1.0, 1.0, -1.0, -1.0])  # two tokens each way, symmetric probabilities
    layer(x)
    assert math.isclose(float(layer.stats[-1].balance_loss), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_gradients_reach_router_from_task_and_aux_loss(k):
    torch.manual_seed(0)
    layer = MoELayer(_linear_experts(4), 6, k=k, noisy_gating=True)
    y = layer(torch.randn(32, 6))
    y.pow(2).sum().backward()
    assert layer.router.weight.grad is not None and float(layer.router.weight.grad.abs().sum()) > 0
    assert float(layer.noise.weight.grad.abs().sum()) > 0
    layer.zero_grad()
    layer(torch.randn(32, 6))
    s = layer.stats[-1]
    (s.balance_loss + s.z_loss).backward()
    assert float(layer.router.weight.grad.abs().sum()) > 0


def test_experts_get_gradients_only_when_used():
    torch.manual_seed(0)
    layer = MoELayer(_linear_experts(4), 6, k=1, capacity_factor=None)
    layer(torch.randn(8, 6)).sum().backward()
    for e, ex in enumerate(layer.experts):
        used = int(layer.token_counts[e]) > 0
        assert (ex.weight.grad is not None and float(ex.weight.grad.abs().sum()) > 0) == used


def test_token_inputs_of_any_rank_and_eval_mode_does_not_count():
    torch.manual_seed(0)
    layer = MoELayer(_linear_experts(4), 6, k=2)
    y = layer(torch.randn(3, 5, 6))
    assert y.shape == (3, 5, 6) and int(layer.token_counts.sum()) <= 30
    layer.reset_counts()
    layer.eval()
    layer(torch.randn(3, 5, 6))
    assert int(layer.token_counts.sum()) == 0
    assert layer(torch.randn(0, 6)).shape == (0, 6)


@pytest.mark.parametrize("k", [1, 2])
def test_conversion_preserves_outputs_when_experts_are_copies(k):
    torch.manual_seed(0)
    model = MNIST1DFFN()
    x = torch.randn(64, 40)
    model.eval()
    ref = model(x)
    converted = convert_to_moe(model, ["ffn"], num_experts=4, k=k, capacity_factor=None)
    assert converted == ["ffn"] and isinstance(model.ffn, MoELayer)
    assert torch.allclose(model(x), ref, atol=1e-5)
    model.train()  # dropless training forward: also unchanged
    assert torch.allclose(model(x), ref, atol=1e-5)
    assert convert_to_moe(model, ["ffn"]) == []  # already converted: skipped


def test_conversion_by_name_in_sequential_and_reset_init():
    torch.manual_seed(0)
    mlp = MNIST1DMLP()
    x = torch.randn(16, 40)
    ref = mlp(x)
    convert_to_moe(mlp, ["net.2"], num_experts=3, capacity_factor=None)
    assert isinstance(mlp.net[2], MoELayer) and torch.allclose(mlp(x), ref, atol=1e-5)
    assert "net.2.experts.2.weight" in mlp.state_dict() and "net.2.router.weight" in mlp.state_dict()
    fresh = make_experts(nn.Linear(4, 4), 2, upcycle=False)
    assert not torch.equal(fresh[0].weight, fresh[1].weight)


def test_conversion_errors_name_the_problem():
    model = MNIST1DFFN()
    with pytest.raises(ValueError, match="names=\\[\\]"):
        convert_to_moe(model, [])
    with pytest.raises(ValueError, match="'nope' is not a submodule"):
        convert_to_moe(model, ["nope"])
    with pytest.raises(ValueError, match="no in_features"):
        convert_to_moe(model, ["conv1"])
    with pytest.raises(ValueError, match="num_experts=1"):
        convert_to_moe(model, ["ffn"], num_experts=1)
    with pytest.raises(ValueError, match="duplicates"):
        convert_to_moe(model, ["ffn", "ffn"])


def test_layer_config_errors():
    with pytest.raises(ValueError, match="k=3"):
        MoELayer(_linear_experts(2), 6, k=3)
    with pytest.raises(ValueError, match="capacity_factor=0"):
        MoELayer(_linear_experts(2), 6, capacity_factor=0)
    with pytest.raises(ValueError, match="at least 2 experts"):
        MoELayer(_linear_experts(1), 6)


def test_count_macs_counts_active_experts_only():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    assert count_macs(dense, torch.randn(10, 8)) == 8 * 16 + 16 * 8
    for k in (1, 2):
        layer = MoELayer(make_experts(dense, 4), 8, k=k, capacity_factor=None).eval()
        assert count_macs(layer, torch.randn(10, 8)) == 8 * 4 + k * (8 * 16 + 16 * 8)
