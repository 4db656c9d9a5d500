"""ReputationFilter: the reference filter's verdicts accumulated into per-client beta reputations, against a hand
computation over three rounds; a flipped reply is dropped, honest replies kept; a client with a bad record is dropped
in a round it passes, one with a good record in a round it fails; the counts are checkpointed and a restored
strategy continues identically; refused rounds change nothing; settings validated; Detection reads it in a run."""

import pytest
import torch
from conftest import seeded
from torch import nn

from lightning_fed.callbacks import Detection, SignFlip
from lightning_fed.errors import AggregationRefused
from lightning_fed.models import MNIST1DCNN
from lightning_fed.protocol import Reply
from lightning_fed.strategies import ReputationFilter
from lightning_fed.strategies.reputation_filter import beta_reputation


class Tiny(nn.Module):
    """Two weights: a reply is a 2-vector."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(1, 2, bias=False)


def reply(cid: int, v: list[float], n: int = 10) -> Reply:
    return Reply(cid, {"w.weight": torch.tensor(v).reshape(2, 1)}, n)


def make(**kw) -> tuple[ReputationFilter, torch.Tensor]:
    strategy = ReputationFilter(**{"reference": "median", **kw})
    strategy.setup(Tiny())
    return strategy, strategy.global_flat.clone()


HONEST = [[1.0, 0.0], [1.0, 1.0], [2.0, 1.0], [0.0, 1.0]]


def test_beta_reputation_by_hand():
    assert beta_reputation(0, 0) == 0.5
    assert beta_reputation(1, 0) == pytest.approx(2 / 3)
    assert beta_reputation(0, 1) == pytest.approx(1 / 3)
    assert beta_reputation(1, 1) == 0.5
    assert beta_reputation(2, 1) == 0.6 and beta_reputation(3, 0) == 0.8


def test_three_rounds_by_hand():
    strategy, start = make()
    # round 0: client 4 flips (-4 x [1, 0.5]); the median of the five rows is [1, 1]: cosine of client 4 < 0 and
    # its norm 4.47 > 3 x the median norm 1.414: it fails; the others pass. Reputations 2/3 and 1/3.
    metrics = strategy.aggregate(0, [reply(i, v) for i, v in enumerate(HONEST)] + [reply(4, [-4.0, -2.0])])
    assert (strategy.global_flat - start).tolist() == pytest.approx([1.0, 0.75])  # the mean of the 4 honest
    assert strategy.last.dropped == [4] and metrics["rep_dropped"] == 1.0 and metrics["rep_vetoed"] == 0.0
    assert strategy.last.scores == pytest.approx([2 / 3] * 4 + [1 / 3])
    assert strategy.last.bound == pytest.approx(3 * 2**0.5)
    # round 1: client 4 sends [0.5, 0.5]: it passes the filter (median [1, 1], every norm under 3), but its
    # record is 1 pass, 1 fail: reputation 1/2, not above 1/2: dropped for its record
    before = strategy.global_flat.clone()
    metrics = strategy.aggregate(1, [reply(i, v) for i, v in enumerate(HONEST)] + [reply(4, [0.5, 0.5])])
    assert (strategy.global_flat - before).tolist() == pytest.approx([1.0, 0.75])
    assert strategy.last.dropped == [4] and metrics["rep_vetoed"] == 1.0
    assert strategy.counts == {0: (2, 0), 1: (2, 0), 2: (2, 0), 3: (2, 0), 4: (1, 1)}
    # round 2: client 4 passes again (2 passes, 1 fail: 3/5, kept); client 3 sends [-1, -1]: the median is
    # [1, 0.5], its cosine < 0: dropped this round whatever its record (2 passes, 1 fail)
    before = strategy.global_flat.clone()
    metrics = strategy.aggregate(
        2, [reply(i, v) for i, v in enumerate(HONEST[:3])] + [reply(3, [-1.0, -1.0]), reply(4, [0.5, 0.5])]
    )
    assert (strategy.global_flat - before).tolist() == pytest.approx([4.5 / 4, 2.5 / 4])
    assert strategy.last.dropped == [3] and metrics["rep_vetoed"] == 0.0
    assert strategy.last.scores == pytest.approx([0.8, 0.8, 0.8, 0.6, 0.6])
    assert strategy.reputation(3) == 0.6 and strategy.reputation(99) == 0.5  # never seen: the prior


@pytest.mark.parametrize("memory", [True, False])
def test_norm_memory_against_a_long_majority(memory):
    strategy, _ = make(norm_memory=memory)
    strategy.aggregate(0, [reply(i, v) for i, v in enumerate(HONEST)] + [reply(4, [-4.0, -2.0])])
    # the kept norms of round 0 are 1, 1.414, 2.236, 1: their (lower) median 1
    assert strategy.kept_norm == pytest.approx(1.0)
    # round 1: three new clients send long updates the honest way (norms 5.66, 5, 5): the round's median norm is 5
    # (bound 15: they pass); remembered, the bound is 3 x 1: they fail
    before = strategy.global_flat.clone()
    replies = [reply(0, [1.0, 0.0]), reply(1, [1.0, 1.0]), reply(5, [4.0, 4.0]), reply(6, [4.0, 3.0])]
    strategy.aggregate(1, [*replies, reply(7, [3.0, 4.0])])
    if memory:
        assert strategy.last.dropped == [2, 3, 4] and strategy.last.bound == pytest.approx(3.0)
        assert (strategy.global_flat - before).tolist() == pytest.approx([1.0, 0.5])
        assert strategy.counts[5] == (0, 1)
    else:
        assert strategy.last.dropped == [] and strategy.last.bound == pytest.approx(15.0)
        assert (strategy.global_flat - before).tolist() == pytest.approx([2.6, 2.4])


def test_example_weights_of_the_kept_replies():
    strategy, start = make()
    replies = [reply(0, [1.0, 0.0], n=30), reply(1, [1.0, 1.0], n=10), reply(2, [-3.0, -3.0], n=60)]
    # median [1, 0]: client 2 fails (cosine < 0); kept shares 3/4 and 1/4
    strategy.aggregate(0, replies)
    assert (strategy.global_flat - start).tolist() == pytest.approx([1.0, 0.25])


def test_refused_rounds_change_nothing():
    strategy, _ = make(reference="krum", byzantine=1)
    with pytest.raises(AggregationRefused, match="needs at least 5 replies, got 4"):
        strategy.aggregate(0, [reply(i, v) for i, v in enumerate(HONEST)])
    median, _ = make()
    median.aggregate(0, [reply(0, [1.0, 0.0]), reply(1, [0.0, 1.0]), reply(2, [1.0, 1.0])])
    before, counts = median.global_flat.clone(), dict(median.counts)
    # the same three pass again (median [1, 1]), but with min_reputation 0.99 no record (2 passes: 3/4) is enough
    strict = ReputationFilter(reference="median", min_reputation=0.99)
    strict.setup(Tiny())
    strict.load_state_dict(median.state_dict())
    with pytest.raises(AggregationRefused, match="none of the 3 replies passes the filter and the record"):
        strict.aggregate(1, [reply(0, [1.0, 0.0]), reply(1, [0.0, 1.0]), reply(2, [1.0, 1.0])])
    assert strict.counts == counts and torch.equal(strict.global_flat, before)


def test_state_dict_round_trip_continues_identically():
    a, _ = make()
    a.aggregate(0, [reply(i, v) for i, v in enumerate(HONEST)] + [reply(4, [-4.0, -2.0])])
    state = a.state_dict()
    assert state["reputation"]["clients"].tolist() == [0, 1, 2, 3, 4]
    assert state["reputation"]["counts"].tolist() == [[1, 0]] * 4 + [[0, 1]]
    b, _ = make()
    b.load_state_dict(state)
    assert b.counts == a.counts and torch.equal(a.global_flat, b.global_flat)
    assert state["reputation"]["kept_norm"].item() == pytest.approx(1.0) and b.kept_norm == a.kept_norm
    nxt = [reply(i, v) for i, v in enumerate(HONEST)] + [reply(4, [0.5, 0.5]), reply(7, [1.0, 0.5])]
    a.aggregate(1, nxt)
    b.aggregate(1, nxt)
    assert torch.equal(a.global_flat, b.global_flat) and a.last.dropped == b.last.dropped == [4]
    assert a.counts == b.counts and a.kept_norm == b.kept_norm
    empty, _ = make()
    assert empty.state_dict()["reputation"]["counts"].shape == (0, 2)
    assert empty.state_dict()["reputation"]["kept_norm"].isnan()
    old = {k: v for k, v in a.state_dict().items() if k != "reputation"}  # a checkpoint without counts
    b.load_state_dict(old)
    assert b.counts == {} and b.kept_norm is None


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"reference": "mean"}, "reference='mean' is not allowed; reference must be one of"),
        ({"byzantine": -1}, "byzantine=-1 is not allowed; byzantine must be an integer >= 0"),
        ({"byzantine": True}, "byzantine=True is not allowed"),
        ({"min_cosine": 1.0}, "min_cosine=1.0 is not allowed; min_cosine must be in \\[-1, 1\\)"),
        (
            {"max_norm_ratio": 1.0},
            "max_norm_ratio=1.0 is not allowed; max_norm_ratio must be a finite number > 1",
        ),
        ({"max_norm_ratio": float("inf")}, "max_norm_ratio=inf is not allowed"),
        ({"min_reputation": 1.0}, "min_reputation=1.0 is not allowed; min_reputation must be in \\[0, 1\\)"),
        ({"min_reputation": -0.1}, "min_reputation=-0.1 is not allowed"),
        ({"norm_memory": 1}, "norm_memory=1 is not allowed; norm_memory must be True or False"),
        ({"server_lr": 0}, "server_lr=0 is not allowed"),
    ],
)
def test_invalid_settings_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        ReputationFilter(**kw)


def test_flipped_clients_are_dropped_in_a_run(make_loop, small_dm):
    # 3 of 10 clients flip their update (x 4): every flipped reply is dropped, no honest one
    attack = SignFlip(fraction=0.3, scale=4.0, seed=1)
    strategy = ReputationFilter(reference="krum", byzantine=3)
    det = Detection(attack, strategy)
    loop = make_loop(
        num_clients=10, clients_per_round=10, rounds=2, strategy=strategy, callbacks=[attack, det]
    )
    result = loop.fit(seeded(MNIST1DCNN, channels=8), small_dm)
    assert [h["rep_dropped"] for h in result.history] == [3.0, 3.0]
    assert det.totals() == {"precision": 1.0, "recall": 1.0, "tp": 6.0, "fp": 0.0, "fn": 0.0}
    bad = set(attack.malicious(0, 10))
    assert all(strategy.counts[c] == ((0, 2) if c in bad else (2, 0)) for c in range(10))
