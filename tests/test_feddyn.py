"""FedDyn: two rounds of FedLoop against a hand computation of Algorithm 1 of Acar et al. (a linear model, full-batch
SGD, fixed data), the server update on two tiny replies, buffers left to FedAvg's mean, the state, the bytes on the
wire, the client callback outside FedLoop, the refusals and the docs' example."""

import re
from pathlib import Path

import pytest
import torch
from _linear_fed import CLIENTS, EPOCHS, LR, PER_ROUND, ROUNDS, W0, FixedData, Linear, make_loop
from torch import nn

from lightning_fed.protocol import Instruction, Reply
from lightning_fed.strategies import FedAvg, FedDyn, FedDynClient, UniformMean
from lightning_fed.strategies.feddyn import STATE_KEY

ALPHA = 0.5


def _hand(dm: FixedData, shards: list[torch.Tensor], sampled: list[list[int]]):
    """Algorithm 1 of Acar et al. in float64, one gradient step per local epoch on
    ``L_k(w) - <h_k, w> + α/2 ||w - θ||²``."""
    x64, y64 = dm.x.double(), dm.y.double()
    theta, h = torch.tensor(W0, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    hk = {i: torch.zeros(2, dtype=torch.float64) for i in range(CLIENTS)}
    for clients in sampled:
        deltas = []
        for i in clients:
            xs, ys = x64[shards[i]], y64[shards[i]]
            w = theta.clone()
            for _ in range(EPOCHS):
                g = 2 / len(ys) * xs.T @ (xs @ w - ys) - hk[i] + ALPHA * (w - theta)
                w = w - LR * g
            hk[i] = hk[i] - ALPHA * (w - theta)
            deltas.append(w - theta)
        h = h - ALPHA / CLIENTS * sum(deltas)
        theta = theta + sum(deltas) / len(deltas) - h / ALPHA
    return theta, h, hk




def test_two_rounds_match_the_hand_computation(tmp_path):
    strategy = FedDyn(alpha=ALPHA)
    loop = make_loop(tmp_path, strategy)
    dm = FixedData()
    res = loop.fit(Linear(), dm)
    sampled = [loop.sample_clients(r) for r in range(ROUNDS)]
    assert set(sampled[0]) & set(sampled[1])  # a client trains twice: round 1 uses its h_k from round 0
    theta, h, hk = _hand(dm, loop.shards, sampled)
    assert strategy.num_clients == CLIENTS
    assert strategy.global_flat.double() == pytest.approx(theta, abs=1e-5)
    assert strategy.h.double() == pytest.approx(h, abs=1e-5)
    assert float(h.abs().max()) > 0.1  # the server state is not trivially zero
    for i in range(CLIENTS):
        stored = loop.store.load(i)
        if i in sampled[0] + sampled[1]:
            assert stored[STATE_KEY]["lin.weight"].reshape(-1).double() == pytest.approx(hk[i], abs=1e-5)
        else:
            assert STATE_KEY not in stored
    assert res.history[-1]["h_norm"] == pytest.approx(float(h.norm()), abs=1e-5)
    fedavg = FedAvg(aggregator=UniformMean())  # the same clients without the regularizer end elsewhere
    make_loop(tmp_path / "fedavg", fedavg).fit(Linear(), FixedData())
    assert not torch.allclose(fedavg.global_flat, strategy.global_flat, atol=1e-2)


def test_messages_are_fedavgs(tmp_path):
    """The global weights down and the weight delta up: FedAvg's bytes, no extra state on the wire."""
    a = make_loop(tmp_path / "dyn", FedDyn(alpha=ALPHA), rounds=1).fit(Linear(), FixedData()).history[0]
    b = make_loop(tmp_path / "avg", FedAvg(), rounds=1).fit(Linear(), FixedData()).history[0]
    assert a["raw_bytes_up"] == b["raw_bytes_up"] == PER_ROUND * 2 * 4
    assert a["raw_bytes_down"] == b["raw_bytes_down"] == PER_ROUND * 2 * 4


def _strategy(alpha: float = 0.1, model: nn.Module | None = None) -> FedDyn:
    s = FedDyn(alpha=alpha)
    s.setup(model if model is not None else Linear())
    s.num_clients = 4
    return s


def test_server_update_by_hand_and_state_round_trip():
    s = _strategy(alpha=0.1)
    (instr,) = s.configure_round(0, [1])
    assert set(instr.payload) == {"lin.weight"} and set(s.reply_spec(instr)) == {"lin.weight"}
    replies = [
        Reply(0, {"lin.weight": torch.tensor([[1.0, 0.0]])}, 1),
        Reply(1, {"lin.weight": torch.tensor([[0.0, 3.0]])}, 3),
    ]
    metrics = s.aggregate(0, replies)
    # h = 0 - (0.1 / 4) * ([1, 0] + [0, 3]) = [-0.025, -0.075]; the example counts 1 and 3 do not weigh
    assert s.h.tolist() == pytest.approx([-0.025, -0.075])
    # θ = [0.5, -1] + mean([1, 0], [0, 3]) - h / 0.1 = [0.5 + 0.5 + 0.25, -1 + 1.5 + 0.75]
    assert s.global_flat.tolist() == pytest.approx([1.25, 1.25])
    assert metrics["h_norm"] == pytest.approx(float(torch.tensor([0.025, 0.075]).norm()))
    s.aggregate(1, [Reply(2, {"lin.weight": torch.tensor([[2.0, 2.0]])}, 5)])
    # h = [-0.025, -0.075] - 0.025 * [2, 2]; θ = [1.25, 1.25] + [2, 2] - h / 0.1
    assert s.h.tolist() == pytest.approx([-0.075, -0.125])
    assert s.global_flat.tolist() == pytest.approx([1.25 + 2 + 0.75, 1.25 + 2 + 1.25])
    t = _strategy(alpha=0.1)
    t.load_state_dict(s.state_dict())
    assert torch.equal(t.h, s.h) and torch.equal(t.global_flat, s.global_flat)
    bad = s.state_dict()
    bad["h"] = torch.zeros(3)
    with pytest.raises(ValueError, match="server state h does not match"):
        t.load_state_dict(bad)


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1, bias=False)
        self.register_buffer("scale", torch.ones(2))


def test_buffers_take_the_plain_mean_and_no_state():
    s = _strategy(alpha=0.1, model=WithBuffer())
    assert set(s.spec.names) == {"lin.weight", "scale"}
    before = {k: v.clone() for k, v in s.spec.unflatten(s.global_flat).items()}
    d = {"lin.weight": torch.tensor([[1.0, 1.0]]), "scale": torch.tensor([2.0, 4.0])}
    s.aggregate(0, [Reply(0, d, 1), Reply(1, {k: -v / 2 for k, v in d.items()}, 1)])
    # mean delta: weight [0.25, 0.25], scale [0.5, 1.0]; h on the weight only: -(0.1 / 4) * 2 * [0.25, 0.25]
    h = s.spec.unflatten(s.h)
    assert h["lin.weight"].reshape(-1).tolist() == pytest.approx([-0.0125, -0.0125])
    assert h["scale"].tolist() == [0.0, 0.0]
    after = s.spec.unflatten(s.global_flat)
    assert (after["lin.weight"] - before["lin.weight"]).reshape(-1).tolist() == pytest.approx([0.375, 0.375])
    assert (after["scale"] - before["scale"]).tolist() == pytest.approx([0.5, 1.0])


def test_client_callback_outside_fedloop_changes_nothing():
    cb = FedDynClient(alpha=0.5)

    class View:  # a trainer without ``fed``: a plain lightning.Trainer
        lightning_module = Linear()

    cb.on_client_start(View(), View.lightning_module, Instruction(0, {"lin.weight": torch.zeros(1, 2)}))
    p = View.lightning_module.lin.weight
    p.grad = torch.ones_like(p)
    cb.on_before_optimizer_step(View(), View.lightning_module, torch.optim.SGD([p], lr=0.1))
    assert torch.equal(p.grad, torch.ones_like(p))


@pytest.mark.parametrize("alpha", [0, -0.1, True, "0.1", None])
def test_refusals(alpha):
    with pytest.raises(ValueError, match=r"FedDyn: alpha=.* is not allowed; alpha must be a number( > 0|$)"):
        FedDyn(alpha=alpha)
    with pytest.raises(ValueError, match=r"FedDynClient: alpha=.* is not allowed"):
        FedDynClient(alpha=alpha)


def test_needs_the_number_of_clients_and_setup():
    s = FedDyn()
    with pytest.raises(RuntimeError, match=r"FedAvg.setup\(model\) must be called"):
        s.configure_round(0, [0])
    s.setup(Linear())
    with pytest.raises(RuntimeError, match="FedDyn.num_clients is not set"):
        s.aggregate(0, [Reply(0, {"lin.weight": torch.zeros(1, 2)}, 1)])


def test_doc_example_runs(tmp_path):
    doc = (Path(__file__).parents[1] / "docs" / "strategies.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL) if "FedDyn(" in c)
    scope: dict = {}
    exec(compile(code.replace('"runs/feddyn"', f'"{tmp_path}"'), "docs/strategies.md", "exec"), scope)  # noqa: S102
    assert scope["result"].history[-1]["h_norm"] > 0


def test_evaluate_mean_loads_the_mean_of_the_client_models():
    """``evaluate_mean``: the model evaluated is θ + h / α, the plain mean of the round's client models; the clients
    still get θ."""
    s = FedDyn(alpha=0.1, evaluate_mean=True)
    s.setup(Linear())
    s.num_clients = 4
    s.aggregate(
        0,
        [
            Reply(0, {"lin.weight": torch.tensor([[1.0, 0.0]])}, 1),
            Reply(1, {"lin.weight": torch.tensor([[0.0, 3.0]])}, 3),
        ],
    )
    model = Linear()
    s.load_global(model)
    # the clients' models: [0.5, -1] + [1, 0] and [0.5, -1] + [0, 3]; their mean [1.0, 0.5]
    assert model.lin.weight.reshape(-1).tolist() == pytest.approx([1.0, 0.5])
    (instr,) = s.configure_round(1, [0])
    assert instr.payload["lin.weight"].reshape(-1).tolist() == pytest.approx([1.25, 1.25])  # θ
    s.evaluate_mean = False
    s.load_global(model)
    assert model.lin.weight.reshape(-1).tolist() == pytest.approx([1.25, 1.25])
    with pytest.raises(
        ValueError, match="FedDyn: evaluate_mean=1 is not allowed; evaluate_mean must be True or False"
    ):
        FedDyn(evaluate_mean=1)
