"""Decentralized distillation: graphs, neighbour-only relay, soft-label payloads, malformed replies."""

from __future__ import annotations

import pytest
import torch
from _distill_common import Corrupt, Spy, cnn, fit_rejected, tiny_dm, tiny_loop, tiny_public

from lightning_fed.protocol import Reply
from lightning_fed.strategies import DecentralizedDistillation, ModelTiers
from lightning_fed.strategies.ddist import random_regular_graph, ring_graph


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
    res = tiny_loop(tmp_path, s, rounds=3, callbacks=[spy]).fit(cnn(4), tiny_dm())
    assert all(p == {"soft": ((40, 10), torch.float32)} for _, p in spy.replies)
    assert spy.instructions[0][1] == set()  # nobody has sent soft labels before round 1
    assert any(keys == {"neighbor_soft"} for _, keys in spy.instructions)
    assert res.history[-1]["rejected"] == 0 and "clients/test_acc" in res.history[-1]


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
