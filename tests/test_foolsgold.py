"""FoolsGold (Fung et al. 2020) against a hand computation on constructed histories; histories accumulate and are
checkpointed; one reply falls back to the plain mean; an all-twins round is refused and changes nothing; settings
validated; colluding clients get weight 0 in a FedLoop run and Detection counts them."""

import logging
import math

import pytest
import torch
from conftest import seeded
from torch import nn

from lightning_fed.callbacks import Detection, LittleIsEnough
from lightning_fed.errors import AggregationRefused
from lightning_fed.models import MNIST1DCNN
from lightning_fed.protocol import Reply
from lightning_fed.strategies import FedAvg, FoolsGold
from lightning_fed.strategies.foolsgold import foolsgold_weights

# two twins, one client half like them, one unlike anyone
HISTORIES = [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_weights_by_hand():
    # cs: rows 0/1 = 1; rows 0,1 vs 2 = 1/sqrt(2); row 3 = 0 with all. v = [1, 1, 0.7071, 0].
    # pardoning row 2 (v_0 = v_1 = 1 > v_2): cs_20 = cs_21 = 0.7071 * 0.7071 / 1 = 0.5.
    # alpha = 1 - max_j cs = [0, 0, 0.5, 1]; rescaled by 1; capped: [0, 0, 0.5, 0.99].
    # logit + 0.5: [-inf, -inf, 0.5, ln(99) + 0.5 = 5.09] -> clipped to [0, 1]
    h = torch.tensor(HISTORIES)
    assert foolsgold_weights(h, kappa=1.0).tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0])
    assert foolsgold_weights(h, kappa=0.5).tolist() == pytest.approx([0.0, 0.0, 0.25, 1.0])
    assert foolsgold_weights(h, kappa=2.0).tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])
    # without pardoning row 2 would be 1 - 0.7071 = 0.2929 -> logit -0.38 -> 0: pardoning is what keeps it
    assert foolsgold_weights(h * torch.tensor([[2.0], [3.0], [0.5], [7.0]])).tolist() == pytest.approx(
        [0.0, 0.0, 0.5, 1.0]
    )  # cosines only: the histories' lengths do not matter


def test_rescaling_and_negative_similarity_by_hand():
    # opposite histories: cosine -1 counts as no similarity; a zero history has cosine 0 with everyone
    assert foolsgold_weights(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])).tolist() == [1.0, 1.0, 1.0]
    # cs_01 = 0.8 (v = 0.8 for both, no pardon), cs_2* = 0: alpha = [0.2, 0.2, 1] -> rescaled the same ->
    # logit(0.2) + 0.5 = -0.886 -> 0; the third client 1
    h = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
    assert foolsgold_weights(h).tolist() == pytest.approx([0.0, 0.0, 1.0])
    # every client with a perfect twin: every weight 0
    assert foolsgold_weights(torch.tensor([[1.0, 2.0], [2.0, 4.0]])).tolist() == [0.0, 0.0]
    h = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # cs_01 = 0.6, cs_02 = 0, cs_12 = 0.8; v = [0.6, 0.8, 0.8]; pardon row 0: cs_01 *= 0.6 / 0.8 -> 0.45,
    # cs_02 stays 0 (0 * ...); alpha = [0.55, 0.2, 0.2] -> / 0.55 = [1, 0.3636, 0.3636] -> cap 0.99
    # -> logit + 0.5 = [5.09, -0.06, -0.06] -> [1, 0, 0]
    assert foolsgold_weights(h).tolist() == pytest.approx([1.0, 0.0, 0.0])
    w = foolsgold_weights(h, kappa=0.1)  # 0.1 * (ln(0.99/0.01) + 0.5) = 0.5095
    assert w[0].item() == pytest.approx(0.1 * (math.log(99) + 0.5))


class Tiny(nn.Module):
    """One body weight and a 3-value head: the head is the default indicative layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(1, 1, bias=False)
        self.head = nn.Linear(1, 3, bias=False)


def reply(cid: int, body: float, head: list[float], n: int = 10) -> Reply:
    return Reply(
        cid, {"body.weight": torch.tensor([[body]]), "head.weight": torch.tensor(head).reshape(3, 1)}, n
    )


def setup_strategy(**kw) -> tuple[FoolsGold, torch.Tensor]:
    strategy = FoolsGold(**kw)
    strategy.setup(Tiny())
    return strategy, strategy.global_flat.clone()


def test_aggregate_by_hand_and_history():
    strategy, start = setup_strategy()
    assert strategy.features == ["head.weight"]
    replies = [reply(i, float(i + 1), h) for i, h in enumerate(HISTORIES)]
    metrics = strategy.aggregate(0, replies)
    # weights [0, 0, 0.5, 1], equal example counts: shares [0, 0, 1/3, 2/3]
    expected = [
        1 / 3 * 3.0 + 2 / 3 * 4.0,
        *(1 / 3 * torch.tensor(HISTORIES[2]) + 2 / 3 * torch.tensor(HISTORIES[3])).tolist(),
    ]
    assert (strategy.global_flat - start).tolist() == pytest.approx(expected)
    assert strategy.last.dropped == [0, 1] and strategy.last.clipped == [2]
    assert strategy.last.scores == pytest.approx([0.0, 0.0, 0.5, 1.0])
    assert metrics["fg_zeroed"] == 2.0 and metrics["fg_weight"] == pytest.approx(0.375)
    # clients 0 and 3 would become twins ([1, 0, 1] both): refused, and nothing changes
    before = strategy.global_flat.clone()
    with pytest.raises(AggregationRefused):
        strategy.aggregate(1, [reply(0, 1.0, [0.0, 0.0, 1.0]), reply(3, 2.0, [1.0, 0.0, 0.0])])
    assert torch.equal(strategy.global_flat, before) and strategy.history[0].tolist() == [1.0, 0.0, 0.0]
    # the histories are sums of the head's updates: [1, 1, 0] and [1, 1, 5], cosine 0.27 -> both weight 1
    strategy.aggregate(2, [reply(0, 1.0, [0.0, 1.0, 0.0], n=30), reply(2, 5.0, [0.0, 0.0, 5.0], n=10)])
    assert strategy.history[0].tolist() == [1.0, 1.0, 0.0] and strategy.history[2].tolist() == [1.0, 1.0, 5.0]
    assert strategy.history[1].tolist() == [1.0, 0.0, 0.0]  # not sampled: unchanged
    assert (strategy.global_flat - before).tolist() == pytest.approx([0.75 + 1.25, 0.0, 0.75, 1.25])


def test_round_weights_use_example_counts():
    strategy, start = setup_strategy()
    # client 0 and 1 unlike each other (cosine 0): both weight 1; shares 3/4 and 1/4
    strategy.aggregate(0, [reply(0, 4.0, [1.0, 0.0, 0.0], n=30), reply(1, 8.0, [0.0, 1.0, 0.0], n=10)])
    assert (strategy.global_flat - start).tolist() == pytest.approx([5.0, 0.75, 0.25, 0.0])


def test_twins_are_refused_and_change_nothing():
    strategy, start = setup_strategy()
    with pytest.raises(AggregationRefused, match="every one of the 2 replies has FoolsGold weight 0"):
        strategy.aggregate(0, [reply(0, 1.0, [1.0, 2.0, 3.0]), reply(1, 1.0, [2.0, 4.0, 6.0])])
    assert torch.equal(strategy.global_flat, start) and strategy.history == {}


def test_one_reply_is_the_plain_mean(caplog):
    strategy, start = setup_strategy()
    with caplog.at_level(logging.INFO, logger="lightning_fed"):
        strategy.aggregate(4, [reply(7, 2.0, [1.0, 2.0, 3.0])])
    assert (strategy.global_flat - start).tolist() == pytest.approx([2.0, 1.0, 2.0, 3.0])
    assert "round 5: FoolsGold has 1 reply, no similarity to measure: the plain mean" in caplog.text
    assert strategy.history[7].tolist() == [1.0, 2.0, 3.0]


def test_state_dict_round_trip_continues_identically():
    a, _ = setup_strategy(layers=["head", "body"])
    a.aggregate(0, [reply(i, float(i), h) for i, h in enumerate(HISTORIES)])
    b, _ = setup_strategy(layers=["head", "body"])
    b.load_state_dict(a.state_dict())
    assert sorted(b.history) == [0, 1, 2, 3] and all(
        torch.equal(a.history[c], b.history[c]) for c in a.history
    )
    nxt = [reply(2, 0.5, [0.0, 1.0, 1.0]), reply(3, -1.0, [1.0, 0.0, 2.0]), reply(5, 1.0, [3.0, 1.0, 0.0])]
    a.aggregate(1, nxt)
    b.aggregate(1, nxt)
    assert torch.equal(a.global_flat, b.global_flat) and a.last.scores == b.last.scores
    empty, _ = setup_strategy()
    assert empty.state_dict()["foolsgold"]["history"].shape == (0, 3)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"kappa": 0}, "kappa=0 is not allowed; kappa must be a finite number > 0"),
        ({"kappa": -1.0}, "kappa=-1.0 is not allowed"),
        ({"kappa": float("inf")}, "kappa=inf is not allowed"),
        ({"kappa": True}, "kappa=True is not allowed"),
        ({"layers": []}, "layers=\\[\\] is not allowed; layers must be a non-empty list"),
        ({"layers": "head"}, "layers='head' is not allowed"),
    ],
)
def test_invalid_settings_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        FoolsGold(**kw)


def test_unknown_layer_is_refused_naming_the_model_layers():
    strategy = FoolsGold(layers=["head", "fc"])
    with pytest.raises(
        ValueError, match=r"layers=\['head', 'fc'\] is not allowed.*\['fc'\] name none.*'conv1'"
    ):
        strategy.check_model(MNIST1DCNN(channels=4))
    FoolsGold(layers=["head"]).check_model(MNIST1DCNN(channels=4))
    with pytest.raises(ValueError, match="Detection: aggregator="):
        Detection(LittleIsEnough(), FedAvg())


def test_colluding_clients_get_weight_zero_in_a_run(make_loop, small_dm):
    # "a little is enough" with a large shift: the malicious updates share one direction round after round
    attack = LittleIsEnough(fraction=0.3, z=20.0, seed=1)
    strategy = FoolsGold()
    det = Detection(attack, strategy)
    loop = make_loop(
        num_clients=10, clients_per_round=10, rounds=2, strategy=strategy, callbacks=[attack, det]
    )
    result = loop.fit(seeded(MNIST1DCNN, channels=8), small_dm)
    # every colluding reply gets weight 0; with this malicious set two honest clients' replies get it too
    assert [h["fg_zeroed"] for h in result.history] == [5.0, 5.0]
    assert det.totals() == {"precision": 0.6, "recall": 1.0, "tp": 6.0, "fp": 4.0, "fn": 0.0}
    assert sorted(strategy.history) == list(range(10))
