"""SCAFFOLD (option II): the variates over two rounds of FedLoop against a hand computation (a linear model, full-batch
SGD, fixed data), the variates' bytes on the wire, the strategy's state, and its refusals; the plain-mean
aggregator it uses by default."""

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from _linear_fed import CLIENTS, EPOCHS, LR, PER_ROUND, ROUNDS, W0, FixedData, Linear, make_loop
from torch import nn

from lightning_fed.codecs import Cast
from lightning_fed.protocol import Instruction, Reply
from lightning_fed.strategies import FedAvg, Scaffold, ScaffoldClient, UniformMean, WeightedMean
from lightning_fed.strategies.scaffold import STATE_KEY, VARIATE, VARIATE_DELTA


def _hand(dm: FixedData, shards: list[torch.Tensor], sampled: list[list[int]], momentum: float = 0.0):
    """Algorithm 1 of Karimireddy et al. (option II) in float64, one step per local epoch; with ``momentum`` the
    clients run heavy-ball SGD (torch's: the buffer starts at the first gradient) and ``K * lr`` becomes the sum of
    the steps' weights under a unit gradient, ``sum_k lr * (1 + m + ... + m^(k-1))``."""
    x64, y64 = dm.x.double(), dm.y.double()
    xg, c = torch.tensor(W0, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    ci = {i: torch.zeros(2, dtype=torch.float64) for i in range(CLIENTS)}
    for clients in sampled:
        dys, dcs = [], []
        for i in clients:
            xs, ys = x64[shards[i]], y64[shards[i]]
            y, buf, unit, denom = xg.clone(), None, 0.0, 0.0
            for _ in range(EPOCHS):
                g = 2 / len(ys) * xs.T @ (xs @ y - ys) - ci[i] + c  # corrected gradient of the mean squared error
                buf = g if buf is None else momentum * buf + g
                unit = momentum * unit + 1.0
                y = y - LR * buf
                denom += LR * unit
            new = ci[i] - c + (xg - y) / denom
            dys.append(y - xg)
            dcs.append(new - ci[i])
            ci[i] = new
        xg = xg + sum(dys) / len(dys)  # the plain mean (the paper's)
        c = c + len(clients) / CLIENTS * (sum(dcs) / len(dcs))
    return xg, c, ci




def test_two_rounds_match_the_hand_computation(tmp_path):
    strategy = Scaffold()
    loop = make_loop(tmp_path, strategy)
    dm = FixedData()
    res = loop.fit(Linear(), dm)
    sampled = [loop.sample_clients(r) for r in range(ROUNDS)]
    assert set(sampled[0]) & set(sampled[1])  # a client trains twice: round 1 uses its c_i from round 0
    xg, c, ci = _hand(dm, loop.shards, sampled)
    assert strategy.num_clients == CLIENTS
    assert strategy.global_flat.double() == pytest.approx(xg, abs=1e-5)
    assert strategy.variate.double() == pytest.approx(c, abs=1e-5)
    assert float(c.abs().max()) > 0.1  # the variates are not trivially zero
    for i in range(CLIENTS):
        stored = loop.store.load(i)
        if i in sampled[0] + sampled[1]:
            assert stored[STATE_KEY]["lin.weight"].reshape(-1).double() == pytest.approx(ci[i], abs=1e-5)
        else:
            assert STATE_KEY not in stored
    assert strategy.client.steps == EPOCHS  # K = optimizer steps actually taken
    assert res.history[-1]["variate_norm"] == pytest.approx(float(c.norm()), abs=1e-5)


class WithMomentum(Linear):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


def test_two_rounds_with_client_momentum_match_the_hand_computation(tmp_path):
    """With momentum 0.9 the denominator is sum_k lr (1 - 0.9^k) / 0.1, not K * lr: the hand computation with that
    denominator matches, the one with K * lr does not."""
    strategy = Scaffold()
    loop = make_loop(tmp_path, strategy)
    dm = FixedData()
    loop.fit(WithMomentum(), dm)
    sampled = [loop.sample_clients(r) for r in range(ROUNDS)]
    xg, c, _ = _hand(dm, loop.shards, sampled, momentum=0.9)
    assert strategy.global_flat.double() == pytest.approx(xg, abs=1e-5)
    assert strategy.variate.double() == pytest.approx(c, abs=1e-5)
    assert float(c.abs().max()) > 0.1
    _, plain_c, _ = _hand(dm, loop.shards, sampled, momentum=0.0)
    assert strategy.variate.double() != pytest.approx(plain_c, abs=1e-2)


class ConstantGradient(L.LightningModule):
    """``loss = w . a`` whatever the batch: every gradient is ``a``."""

    def __init__(self, **sgd) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.sgd = sgd

    def training_step(self, batch, batch_idx):
        return self.w @ torch.tensor([3.0, -2.0]) + 0 * batch[0].sum()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), **self.sgd)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


@pytest.mark.parametrize("sgd", [{"lr": 0.1}, {"lr": 0.1, "momentum": 0.9},
                                 {"lr": 0.05, "momentum": 0.5, "dampening": 0.3},
                                 {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.0}])
def test_the_variate_is_the_mean_gradient_for_every_sgd_setting(tmp_path, sgd):
    """Under a constant gradient ``a`` the first round's ``c_i+`` is ``a`` exactly (every step's gradient), for
    plain SGD, momentum, dampening and Nesterov, with a decaying learning rate (halved every epoch)."""
    loop = make_loop(tmp_path, Scaffold(), rounds=1)
    loop.fit(ConstantGradient(**sgd), FixedData())
    for i in loop.sample_clients(0):
        assert loop.store.load(i)[STATE_KEY]["w"].tolist() == pytest.approx([3.0, -2.0], rel=1e-5)


def test_without_variates_it_is_unweighted_fedavg(tmp_path):
    """Round 0 has c = c_i = 0: no correction, so its global weights are FedAvg's with the plain mean; with
    aggregator=WeightedMean() they are FedAvg's own."""
    runs = {}
    for name, strategy in [("scaffold", Scaffold()), ("uniform", FedAvg(aggregator=UniformMean())),
                           ("scaffold_weighted", Scaffold(aggregator=WeightedMean())), ("fedavg", FedAvg())]:
        loop = make_loop(tmp_path / name, strategy, rounds=1)
        loop.fit(Linear(), FixedData())
        runs[name] = strategy.global_flat
    assert torch.equal(runs["scaffold"], runs["uniform"])
    assert torch.equal(runs["scaffold_weighted"], runs["fedavg"])
    assert not torch.equal(runs["scaffold"], runs["fedavg"])  # the shards differ in size


def test_both_variates_travel_and_are_counted(tmp_path):
    loop = make_loop(tmp_path, Scaffold(), rounds=1)
    res = loop.fit(Linear(), FixedData())
    h = res.history[0]
    # per client: the 2 weights and c down, the 2 weight deltas and dc up, float32
    assert h["raw_bytes_down"] == PER_ROUND * (2 + 2) * 4
    assert h["raw_bytes_up"] == PER_ROUND * (2 + 2) * 4
    assert h["bytes_up"] >= h["raw_bytes_up"] and h["bytes_down"] >= h["raw_bytes_down"]


def _strategy() -> Scaffold:
    s = Scaffold()
    s.setup(Linear())
    return s


def test_payloads_and_specs():
    s = _strategy()
    (instr,) = s.configure_round(0, [1])
    assert set(instr.payload) == {"lin.weight", VARIATE + "lin.weight"}
    spec = s.reply_spec(instr)
    assert set(spec) == {"lin.weight", VARIATE_DELTA + "lin.weight"}
    assert spec[VARIATE_DELTA + "lin.weight"].shape == (1, 2)


def test_aggregate_by_hand_and_state_round_trip():
    s = _strategy()
    s.num_clients = 4
    replies = [Reply(0, {"lin.weight": torch.tensor([[1.0, 0.0]]), "dc/lin.weight": torch.tensor([[2.0, -4.0]])}, 1),
               Reply(1, {"lin.weight": torch.tensor([[0.0, 1.0]]), "dc/lin.weight": torch.tensor([[6.0, 0.0]])}, 3)]
    s.aggregate(0, replies)
    # x += plain mean of the deltas (the example counts 1 and 3 do not weigh); c += |S|/N * plain mean of dc
    assert s.global_flat.tolist() == pytest.approx([0.5 + 0.5, -1.0 + 0.5])
    assert s.variate.tolist() == pytest.approx([2.0, -1.0])
    t = _strategy()
    t.load_state_dict(s.state_dict())
    assert torch.equal(t.variate, s.variate) and torch.equal(t.global_flat, s.global_flat)
    bad = s.state_dict()
    bad["variate_names"] = ["other"]
    with pytest.raises(ValueError, match="control variate does not match"):
        t.load_state_dict(bad)


def test_refusals():
    s = _strategy()
    with pytest.raises(RuntimeError, match="Scaffold.num_clients is not set"):
        s.aggregate(0, [])
    with pytest.raises(RuntimeError, match=r"Scaffold.setup\(model\) must be called"):
        Scaffold().configure_round(0, [0])

    class Clash(nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("c/x", nn.Linear(1, 1))

    with pytest.raises(ValueError, match="Scaffold: the model's state entries"):
        Scaffold().setup(Clash())
    with pytest.raises(ValueError, match="server_lr=-1"):
        Scaffold(server_lr=-1)


def test_client_callback_is_inert_without_variates():
    cb = ScaffoldClient()

    class View:
        lightning_module = Linear()

    cb.on_client_start(View(), View.lightning_module, Instruction(0, {"lin.weight": torch.zeros(1, 2)}))
    p = View.lightning_module.lin.weight
    p.grad = torch.ones_like(p)
    cb.on_before_optimizer_step(View(), View.lightning_module, torch.optim.SGD([p], lr=0.1))
    assert torch.equal(p.grad, torch.ones_like(p)) and cb.steps == 0


def test_doc_example_runs(tmp_path):
    doc = (Path(__file__).parents[1] / "docs" / "strategies.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL) if "Scaffold()" in c)
    scope: dict = {}
    exec(compile(code.replace('"runs/scaffold"', f'"{tmp_path}"'), "docs/strategies.md", "exec"), scope)  # noqa: S102
    assert scope["result"].history[-1]["variate_norm"] > 0


def test_the_uplink_codec_encodes_the_variate_deltas(tmp_path):
    """Cast to fp16 on the uplink: the reply (weight deltas and dc) costs fewer bytes than uncompressed, and the
    server's c is built from what was decoded (fp16-rounded dc), not from the clients' exact values."""
    exact, cast = Scaffold(), Scaffold()
    a = make_loop(tmp_path / "a", exact, rounds=1).fit(Linear(), FixedData())
    b = make_loop(tmp_path / "b", cast, rounds=1, codec=Cast(dtype="fp16")).fit(Linear(), FixedData())
    assert b.history[0]["raw_bytes_up"] == a.history[0]["raw_bytes_up"] == PER_ROUND * 16
    assert b.history[0]["bytes_up"] < a.history[0]["bytes_up"]
    assert not torch.equal(cast.variate, exact.variate)
    assert torch.allclose(cast.variate, exact.variate, rtol=1e-2, atol=1e-3)


def test_uniform_mean_by_hand():
    out = torch.full((2,), float("nan"))
    res = UniformMean()(out, iter([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]), [0.9, 0.1])
    assert res is out and out.tolist() == [2.0, 4.0]  # the weights are ignored
    with pytest.raises(ValueError, match="got 1 buffers for 2 weights"):
        UniformMean()(out, [torch.zeros(2)], [0.5, 0.5])


def test_only_a_non_sgd_client_optimizer_is_warned_about(tmp_path, caplog):
    class WithAdam(Linear):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=LR)

    with caplog.at_level("WARNING", logger="lightning_fed"):
        make_loop(tmp_path / "m", Scaffold(), rounds=1).fit(WithMomentum(), FixedData())
    assert not [r for r in caplog.records if "SCAFFOLD" in r.message]  # momentum SGD is exact
    with caplog.at_level("WARNING", logger="lightning_fed"):
        make_loop(tmp_path / "a", Scaffold(), rounds=1).fit(WithAdam(), FixedData())
    assert sum("exact for torch.optim.SGD" in r.message for r in caplog.records) == 1  # once, not per step
