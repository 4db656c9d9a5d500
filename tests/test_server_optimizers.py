"""FedAvgM, FedAdagrad, FedAdam, FedYogi server optimizers: each against the paper's formulas computed by hand on two
tiny replies over two rounds, against ``torch.optim`` run by hand where torch computes the same update, their state
through checkpoints, and their misconfigurations."""

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_fed.protocol import Reply
from lightning_fed.strategies import (
    FedAvg,
    ServerAdagrad,
    ServerAdam,
    ServerMomentum,
    ServerOptimizer,
    ServerSGD,
    ServerYogi,
    TorchServerOptimizer,
)
from lightning_fed.strategies.tiers import TierAverage, tier_optimizers

X0 = [1.0, -2.0, 0.5]  # Linear(2, 1): weight (1, 2) then bias (1,), flattened in that order
# two rounds of two replies each: (delta, num_examples); the weighted means are the updates Δ_t
ROUNDS = [[([0.2, -0.4, 0.1], 1), ([0.6, 0.0, -0.3], 3)],   # Δ_0 = [0.5, -0.1, -0.2]
          [([-0.4, 0.8, 0.0], 1), ([0.0, 0.4, 0.2], 1)]]    # Δ_1 = [-0.2, 0.6, 0.1]
DELTAS = [[0.5, -0.1, -0.2], [-0.2, 0.6, 0.1]]


def _model() -> nn.Module:
    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([X0[:2]]))
        m.bias.copy_(torch.tensor(X0[2:]))
    return m


def _reply(cid: int, delta: list[float], n: int) -> Reply:
    return Reply(cid, {"weight": torch.tensor([delta[:2]]), "bias": torch.tensor(delta[2:])}, n)


def _run(opt: ServerOptimizer) -> list[float]:
    """The global weights after each of the two rounds of FedAvg(server_optimizer=opt), one after the other."""
    strategy = FedAvg(server_optimizer=opt)
    strategy.setup(_model())
    out = []
    for r, replies in enumerate(ROUNDS):
        strategy.aggregate(r, [_reply(i, d, n) for i, (d, n) in enumerate(replies)])
        out += strategy.global_flat.tolist()
    return out


def _hand(rule: str, lr: float, beta1: float, beta2: float, tau: float) -> list[float]:
    """Reddi et al. 2021, Algorithm 2, one coordinate at a time in float64."""
    x, m, v = list(X0), [0.0] * 3, [tau**2] * 3
    out = []
    for delta in DELTAS:
        for i, d in enumerate(delta):
            m[i] = beta1 * m[i] + (1 - beta1) * d
            if rule == "adagrad":
                v[i] = v[i] + d * d
            elif rule == "adam":
                v[i] = beta2 * v[i] + (1 - beta2) * d * d
            else:  # yogi
                v[i] = v[i] - (1 - beta2) * d * d * math.copysign(1.0, v[i] - d * d)
            x[i] = x[i] + lr * m[i] / (math.sqrt(v[i]) + tau)
        out += x
    return out


def test_the_updates_are_the_weighted_means():
    got = _run(ServerSGD())
    x1 = [x + d for x, d in zip(X0, DELTAS[0])]
    assert got == pytest.approx(x1 + [x + d for x, d in zip(x1, DELTAS[1])], abs=1e-6)


def test_momentum_by_hand():
    # v_0 = Δ_0, x_1 = x_0 + lr v_0; v_1 = 0.9 v_0 + Δ_1, x_2 = x_1 + lr v_1 (lr = 0.5)
    v0 = DELTAS[0]
    x1 = [x + 0.5 * v for x, v in zip(X0, v0)]
    v1 = [0.9 * a + b for a, b in zip(v0, DELTAS[1])]
    x2 = [x + 0.5 * v for x, v in zip(x1, v1)]
    assert _run(ServerMomentum(lr=0.5, momentum=0.9)) == pytest.approx(x1 + x2, abs=1e-6)
    # with momentum 0 it is the plain step
    assert _run(ServerMomentum(lr=1.0, momentum=0.0)) == _run(ServerSGD())


@pytest.mark.parametrize("rule, cls, kwargs", [
    ("adagrad", ServerAdagrad, {"lr": 0.1, "beta1": 0.9, "tau": 1e-3}),
    ("adagrad", ServerAdagrad, {"lr": 0.3, "beta1": 0.0, "tau": 0.5}),
    ("adam", ServerAdam, {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
    ("adam", ServerAdam, {"lr": 0.2, "beta1": 0.5, "beta2": 0.3, "tau": 0.1}),
    ("yogi", ServerYogi, {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
    ("yogi", ServerYogi, {"lr": 0.2, "beta1": 0.5, "beta2": 0.3, "tau": 0.3}),  # v above and below Δ**2: both signs
])
def test_adaptive_rules_by_hand(rule, cls, kwargs):
    hand = _hand(rule, kwargs["lr"], kwargs["beta1"], kwargs.get("beta2", 0.0), kwargs["tau"])
    assert _run(cls(**kwargs)) == pytest.approx(hand, rel=1e-5, abs=1e-6)


def _torch_by_hand(make) -> list[float]:
    """A torch optimizer stepped by hand on one tensor with the pseudo-gradient -Δ_t."""
    p = torch.tensor(X0)
    opt = make([p])
    out = []
    for d in DELTAS:
        p.grad = -torch.tensor(d)
        opt.step()
        out += p.tolist()
    return out


def test_momentum_is_torch_sgd():
    ours = _run(ServerMomentum(lr=0.7, momentum=0.9))
    assert ours == _torch_by_hand(lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9))


def test_nesterov_momentum_is_fedacg_lookahead_by_hand():
    """FedACG (lambda 0.85): the server sends theta + lambda m, keeps m = lambda m + Δ and theta = theta + m; the
    points sent are ServerMomentum(lr 1, nesterov)'s iterates."""
    lam = 0.85
    theta, m = list(X0), [0.0] * len(X0)
    sent = [t + lam * v for t, v in zip(theta, m)]
    hand = []
    for d in DELTAS:  # each Δ is measured from the point sent
        m = [lam * v + g for v, g in zip(m, d)]
        theta = [t + v for t, v in zip(theta, m)]
        sent = [t + lam * v for t, v in zip(theta, m)]
        hand += sent
    assert _run(ServerMomentum(lr=1.0, momentum=lam, nesterov=True)) == pytest.approx(hand, abs=1e-6)
    assert _run(ServerMomentum(lr=0.7, momentum=0.9, nesterov=True)) == _torch_by_hand(
        lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True)
    )


def test_adagrad_without_momentum_is_torch_adagrad():
    ours = _run(ServerAdagrad(lr=0.3, beta1=0.0, tau=0.5))
    ref = _torch_by_hand(lambda ps: torch.optim.Adagrad(ps, lr=0.3, eps=0.5, initial_accumulator_value=0.25))
    assert ours == ref  # bit for bit


def test_adam_is_not_torch_adam():
    """Torch's Adam bias-corrects and starts v at 0 (documented in server_adaptive.py): different steps."""
    ours = _run(ServerAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3))
    ref = _torch_by_hand(lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.9, 0.99), eps=1e-3))
    assert ours != pytest.approx(ref, abs=1e-3)
    # torch's first step moves every coordinate by about lr; the paper's by lr * (1 - beta1) * |Δ| / (|Δ| + tau)...
    assert abs(ref[0] - X0[0]) == pytest.approx(0.1, rel=1e-2)
    assert abs(ours[0] - X0[0]) < 0.1


@pytest.mark.parametrize("make", [lambda: ServerMomentum(lr=0.5), lambda: ServerAdagrad(), lambda: ServerAdam(),
                                  lambda: ServerYogi()])
def test_state_round_trips_through_the_strategy(make):
    a = FedAvg(server_optimizer=make())
    a.setup(_model())
    a.aggregate(0, [_reply(i, d, n) for i, (d, n) in enumerate(ROUNDS[0])])
    state = copy.deepcopy(a.state_dict())
    assert state["server_optimizer"]  # something to checkpoint
    b = FedAvg(server_optimizer=make())
    b.setup(_model())
    b.load_state_dict(state)
    for s in (a, b):
        s.aggregate(1, [_reply(i, d, n) for i, (d, n) in enumerate(ROUNDS[1])])
    assert torch.equal(a.global_flat, b.global_flat)
    # the loaded state is a copy: stepping b changed none of the saved tensors
    assert all(torch.equal(x, y) for x, y in zip(_tensors(state), _tensors(copy.deepcopy(state))))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_setup_again_drops_the_state():
    opt = ServerYogi()
    _run(opt)
    flat = torch.zeros(5)
    opt.setup(flat)  # a pruned model: a smaller buffer, fresh state
    assert opt.state_dict()["m"].shape == (5,) and opt.steps == 0
    mom = ServerMomentum()
    mom.setup(flat)
    with pytest.raises(RuntimeError, match="set up for another buffer"):
        mom.step(torch.zeros(5), torch.ones(5))


def test_torch_server_optimizer_is_a_plug_point():
    class ServerRMSprop(TorchServerOptimizer):
        def make(self, params):
            return torch.optim.RMSprop(params, lr=0.01)

    got = _run(ServerRMSprop())
    assert got == _torch_by_hand(lambda ps: torch.optim.RMSprop(ps, lr=0.01))


@pytest.mark.parametrize("make, match", [
    (lambda: ServerMomentum(lr=-1.0), r"ServerMomentum: lr=-1.0 is not allowed; lr must be a number > 0"),
    (lambda: ServerMomentum(lr=0), r"ServerMomentum: lr=0 is not allowed"),
    (lambda: ServerMomentum(momentum=1.0), r"ServerMomentum: momentum=1.0 is not allowed; momentum must be a number in \[0, 1\)"),
    (lambda: ServerMomentum(momentum=-0.1), r"momentum=-0.1"),
    (lambda: ServerMomentum(momentum=0.0, nesterov=True), r"ServerMomentum: nesterov=True is not allowed"),
    (lambda: ServerMomentum(nesterov=1), r"ServerMomentum: nesterov=1 is not allowed"),
    (lambda: ServerAdam(lr=-0.01), r"ServerAdam: lr=-0.01 is not allowed"),
    (lambda: ServerAdam(beta1=1.0), r"ServerAdam: beta1=1.0 is not allowed; beta1 must be a number in \[0, 1\)"),
    (lambda: ServerAdam(beta2=1.5), r"ServerAdam: beta2=1.5"),
    (lambda: ServerAdam(tau=0.0), r"ServerAdam: tau=0.0 is not allowed; tau must be a finite number > 0"),
    (lambda: ServerYogi(tau=-1e-3), r"ServerYogi: tau=-0.001"),
    (lambda: ServerYogi(beta2=-0.5), r"ServerYogi: beta2=-0.5"),
    (lambda: ServerAdagrad(lr=True), r"ServerAdagrad: lr=True"),
    (lambda: ServerAdagrad(tau=float("inf")), r"ServerAdagrad: tau=inf"),
    (lambda: FedAvg(server_lr=0.5, server_optimizer=ServerAdam()), r"server_lr=0.5 together with server_optimizer"),
])
def test_misconfigurations_name_the_key(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_used_before_setup_says_so():
    with pytest.raises(RuntimeError, match=r"ServerAdam.setup\(global_flat\) must be called"):
        ServerAdam().step(torch.zeros(2), torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"ServerMomentum.setup\(global_flat\) must be called"):
        ServerMomentum().state_dict()


def test_repr_names_the_settings():
    assert repr(ServerAdam()) == "ServerAdam(lr=0.01, beta1=0.9, beta2=0.99, tau=0.001)"
    assert repr(ServerAdagrad()) == "ServerAdagrad(lr=0.1, beta1=0.9, tau=0.001)"
    assert repr(ServerMomentum()) == "ServerMomentum(lr=1.0, momentum=0.9)"


def test_doc_example_runs(tmp_path):
    doc = (Path(__file__).parents[1] / "docs" / "strategies.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL) if "ServerAdam(" in c)
    scope: dict = {}
    exec(compile(code.replace('"runs/fedadam"', f'"{tmp_path}"'), "docs/strategies.md", "exec"), scope)  # noqa: S102
    assert scope["strategy"].server_optimizer.steps == 2
    assert 0 <= scope["result"].final_metrics["test_acc"] <= 1


MAKERS = [lambda: ServerMomentum(lr=0.5), lambda: ServerAdagrad(), lambda: ServerAdam(), lambda: ServerYogi()]


@pytest.mark.parametrize("make", MAKERS)
def test_checkpoint_loads_with_weights_only(make, tmp_path):
    """As lightning_fed.checkpoint loads it: torch.load(weights_only=True), then one more round on both."""
    a = FedAvg(server_optimizer=make())
    a.setup(_model())
    a.aggregate(0, [_reply(i, d, n) for i, (d, n) in enumerate(ROUNDS[0])])
    torch.save(a.state_dict(), tmp_path / "state.pt")
    b = FedAvg(server_optimizer=make())
    b.setup(_model())
    b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for s in (a, b):
        s.aggregate(1, [_reply(i, d, n) for i, (d, n) in enumerate(ROUNDS[1])])
    assert torch.equal(a.global_flat, b.global_flat)


@pytest.mark.parametrize("make", MAKERS)
def test_tiers_get_independent_copies(make):
    """FedDF and FedGen average through TierAverage; FedDF deep-copies the optimizer once per tier."""
    opts = tier_optimizers(make(), 2)
    tiers = [TierAverage(_model(), None, opt) for opt in opts]
    tiers[0].average([{"weight": torch.ones(1, 2), "bias": torch.ones(1)}], [1])
    assert not torch.equal(tiers[0].flat, tiers[1].flat)
    assert torch.equal(tiers[1].flat, torch.tensor(X0))  # the other tier's optimizer did not step it
    tiers[1].average([{"weight": torch.ones(1, 2), "bias": torch.ones(1)}], [1])
    assert torch.equal(tiers[0].flat, tiers[1].flat)


@pytest.mark.parametrize("make", MAKERS)
def test_fedmoe_steps_its_flat_buffer_with_them(make):
    from test_aggregators import _moe, _moe_replies  # the MoE model and replies of the plug-point tests

    from lightning_fed.strategies import FedMoE

    s = FedMoE(server_optimizer=make())
    s.setup(_moe())
    before = s.global_flat.clone()
    s.aggregate(0, _moe_replies(s))
    assert not torch.equal(s.global_flat, before) and torch.isfinite(s.global_flat).all()
    assert s.state_dict()["server_optimizer"]
