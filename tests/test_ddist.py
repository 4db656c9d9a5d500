"""Decentralized distillation: graphs, neighbour-only relay, soft-label payloads, malformed replies."""

from __future__ import annotations

import pytest
import torch
from _distill_common import Corrupt, Spy, cnn, fit_rejected, tiny_dm, tiny_loop, tiny_public

from lightning_fed import FedCallback
from lightning_fed.callbacks.kd_losses import soft_targets
from lightning_fed.protocol import Reply
from lightning_fed.strategies import DecentralizedDistillation, ModelTiers
from lightning_fed.strategies.ddist import random_regular_graph, ring_graph
from lightning_fed.strategies.tiers import predict_logits
from lightning_fed.weights import load_into


def test_ring_graph():
    assert ring_graph(5, 2) == [[1, 4], [0, 2], [1, 3], [2, 4], [0, 3]]
    assert all(len(n) == 4 for n in ring_graph(10, 4))


@pytest.mark.parametrize(("n", "k"), [(10, 3), (20, 4), (7, 2)])
def test_random_regular_graph(n, k):
    g = random_regular_graph(n, k, seed=1)
    assert all(len(nb) == k and i not in nb for i, nb in enumerate(g))
    assert all(i in g[j] for i, nb in enumerate(g) for j in nb)  # symmetric
    assert g == random_regular_graph(n, k, seed=1)


def test_relay_sends_only_neighbours_mean():
    s = DecentralizedDistillation(num_clients=5, graph="ring", degree=2, public=tiny_public(20), reference_size=4)
    s.setup(cnn(2))
    soft = {c: torch.softmax(torch.randn(4, 10), -1) for c in range(5)}
    m = s.aggregate(0, [Reply(c, {"soft": soft[c]}, 10) for c in (1, 3, 4)])
    assert m["soft_rejected"] == 0
    instr = {i.client_id: i for i in s.configure_round(1, [0, 2, 3])}
    assert torch.allclose(instr[0].payload["neighbor_soft"], (soft[1] + soft[4]) / 2)  # neighbours of 0: 1, 4
    assert torch.allclose(instr[2].payload["neighbor_soft"], (soft[1] + soft[3]) / 2)
    assert torch.allclose(instr[3].payload["neighbor_soft"], soft[4])  # neighbour 2 has sent nothing yet
    assert instr[3].config["neighbors"] == 1


def test_non_probability_soft_labels_rejected():
    s = DecentralizedDistillation(num_clients=4, degree=2, public=tiny_public(20), reference_size=4)
    s.setup(cnn(2))
    m = s.aggregate(0, [Reply(0, {"soft": torch.randn(4, 10)}, 5), Reply(1, {"soft": torch.full((4, 10), 0.1)}, 5)])
    assert m["soft_rejected"] == 1 and set(s.soft) == {1}


def test_ddist_heterogeneous_run(tmp_path):
    torch.manual_seed(0)
    spy = Spy()
    s = DecentralizedDistillation(num_clients=4, graph="random_regular", degree=3, public=tiny_public(60),
                                  reference_size=40, tiers=ModelTiers(models=[cnn(6)]), eval_clients=2)
    relay = Relay(s)
    loop, dm, default = tiny_loop(tmp_path, s, rounds=3, callbacks=[spy, relay]), tiny_dm(), cnn(4)
    res = loop.fit(default, dm)
    assert all(p == {"soft": ((40, 10), torch.float32)} for _, p in spy.replies)
    assert spy.instructions[0][1] == set()  # nobody has sent soft labels before round 1
    assert any(keys == {"neighbor_soft"} for _, keys in spy.instructions)
    last = res.history[-1]
    assert last["rejected"] == 0 and "clients/test_acc" in last
    # every relayed target is the mean of the soft labels the client's graph neighbours had sent by then
    assert all(h["failed"] == 0 and h["good"] == 2 for h in res.history)
    assert len(relay.seen) == 6 and all(ok for _, _, ok in relay.seen) and any(n for _, n, _ in relay.seen)
    # the server keeps, for every client that trained, its stored model's soft labels on the reference set
    x, y = dm.test_set.tensors
    accs: dict[int, list[float]] = {0: [], 1: []}
    assert set(s.soft) == set(loop.store.ids())
    for cid in sorted(loop.store.ids()):
        tier = s.tiers.tier_of(cid)
        m = s.tiers.module(tier, default)
        load_into(m, loop.store.load(cid)["model"])
        assert not torch.equal(m.state_dict()["head.weight"], s._initial(tier)["head.weight"])  # it trained
        assert torch.allclose(s.soft[cid], soft_targets(predict_logits(m, s.reference), s.temperature), atol=1e-6)
        with torch.no_grad():
            accs[tier].append((m.eval()(x).argmax(1) == y).float().mean().item())
    # tier<t>/test_acc and clients/test_acc are the mean test accuracies of the stored client models (<= 2 per tier)
    assert accs[0] and accs[1]
    for t, vals in accs.items():
        assert last[f"tier{t}/test_acc"] == pytest.approx(sum(vals) / len(vals), abs=1e-6)
    every = accs[0] + accs[1]
    assert last["clients/test_acc"] == pytest.approx(sum(every) / len(every), abs=1e-6)
    # only soft labels cross the uplink: 2 clients x 40 x 10 float32 (+ the safetensors header)
    assert last["raw_bytes_up"] == 2 * 40 * 10 * 4
    assert 2 * 40 * 10 * 4 <= last["bytes_up"] < 2 * 40 * 10 * 4 + 400


class Relay(FedCallback):
    """Records, for each instruction, whether its ``neighbor_soft`` is the mean of the strategy's stored soft labels
    of the client's neighbours (the server does not change them while the round's clients train)."""

    def __init__(self, strategy: DecentralizedDistillation) -> None:
        self.s, self.seen = strategy, []

    def on_client_start(self, trainer, pl_module, instruction):
        have = [self.s.soft[j] for j in self.s.neighbors[instruction.client_id] if j in self.s.soft]
        got = instruction.payload.get("neighbor_soft")
        ok = got is None if not have else got is not None and torch.allclose(got, torch.stack(have).mean(0), atol=1e-7)
        self.seen.append((instruction.client_id, len(have), ok))


def test_ddist_loop_rejects_malformed_soft_labels(tmp_path):
    s = DecentralizedDistillation(num_clients=4, degree=2, public=tiny_public(30), reference_size=30)
    history = fit_rejected(tiny_loop(tmp_path, s, callbacks=[Corrupt("soft", lambda t: t[:, :5])]), cnn(4),
                           tiny_dm())
    assert [h["rejected"] for h in history] == [2, 2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 4, "graph": "star"}, "graph='star'"),
        ({"num_clients": 4, "degree": 3}, "must be even"),
        ({"num_clients": 5, "graph": "random_regular", "degree": 3}, "must be even for a regular graph"),
        ({"num_clients": 4, "degree": 4}, "degree=4"),
        ({"num_clients": 1}, "num_clients=1"),
    ],
)
def test_ddist_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecentralizedDistillation(**kwargs)
