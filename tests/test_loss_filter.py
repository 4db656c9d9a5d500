"""LossFilter: each reply's score (the clean-loss decrease of its step) against a hand computation on a two-weight
model and one clean record; a reply that raises the loss is dropped unless its client's mean score is positive; the
length test; a fixed step; refused rounds change nothing; the records are checkpointed and a restored strategy
continues identically; settings validated; Detection reads it in a run against flips at the update's own length."""

import math

import pytest
import torch
from conftest import seeded
from torch import nn

from lightning_fed.callbacks import Detection, SignFlip
from lightning_fed.data import PublicData
from lightning_fed.errors import AggregationRefused
from lightning_fed.models import MNIST1DCNN
from lightning_fed.protocol import Reply
from lightning_fed.strategies import LossFilter


class Tiny(nn.Module):
    """Two logits from one input: with the input 1 and the label 0, the loss is ``log(1 + exp(w1 - w0))``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(1, 2, bias=False)
        nn.init.zeros_(self.w.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(x)


CLEAN = PublicData.from_tensors(torch.ones(1, 1), torch.zeros(1, dtype=torch.long))


def reply(cid: int, v: list[float], n: int = 10) -> Reply:
    return Reply(cid, {"w.weight": torch.tensor(v).reshape(2, 1)}, n)


def make(**kw) -> LossFilter:
    strategy = LossFilter(CLEAN, **kw)
    strategy.setup(Tiny())
    return strategy


def loss(w0: float, w1: float) -> float:
    return math.log1p(math.exp(w1 - w0))


def test_scores_by_hand_and_the_kept_mean():
    strategy = make(record=False)
    # shares 0.5, 0.25, 0.25; at w = 0 the loss is log 2; the step gamma * [a, b] gives log(1 + exp(gamma (b - a)))
    replies = [reply(0, [1.0, 0.0], 20), reply(1, [0.0, 2.0], 10), reply(2, [2.0, 1.0], 10)]
    metrics = strategy.aggregate(0, replies)
    want = [math.log(2) - loss(0.5, 0.0), math.log(2) - loss(0.0, 0.5), math.log(2) - loss(0.5, 0.25)]
    assert strategy.last.scores == pytest.approx(want, rel=1e-12)
    assert strategy.last.dropped == [1] and metrics["loss_dropped"] == 1.0 and metrics["loss_kept_by_record"] == 0.0
    # the kept replies' example-weighted mean: (20 [1, 0] + 10 [2, 1]) / 30
    assert strategy.global_flat.tolist() == pytest.approx([4 / 3, 1 / 3])


def test_a_positive_record_keeps_a_failing_reply():
    strategy = make(max_norm_ratio=100.0)  # no length test here
    strategy.aggregate(0, [reply(0, [2.0, 0.0]), reply(1, [1.0, 0.0]), reply(2, [0.0, 1.0])])
    # round 0: client 2 raises the loss and has no other record: dropped; its record is its score, < 0
    assert strategy.last.dropped == [2]
    s0 = strategy.last.scores
    assert strategy.records[0] == (pytest.approx(s0[0]), 1) and strategy.mean_score(2) == pytest.approx(s0[2])
    assert math.isnan(strategy.mean_score(99))
    before = strategy.global_flat.clone()
    # round 1 (global [1.5, 0]): client 0 sends a small step up the loss; its mean score (round 0's large gain
    # and this small loss) stays positive: kept for its record. Client 2 gains now, but little: kept (its score is
    # positive, whatever its record)
    metrics = strategy.aggregate(1, [reply(0, [0.0, 0.2]), reply(1, [1.0, 0.0]), reply(2, [0.1, 0.0])])
    s1 = strategy.last.scores
    assert s1[0] < 0 < s1[2] and s0[0] + s1[0] > 0
    assert strategy.last.dropped == [] and metrics["loss_kept_by_record"] == 1.0
    assert (strategy.global_flat - before).tolist() == pytest.approx([1.1 / 3, 0.2 / 3])
    # round 2: client 2's step up the loss; its mean score over three rounds is negative: dropped
    strategy.aggregate(2, [reply(1, [1.0, 0.0]), reply(2, [-3.0, 0.0])])
    assert strategy.last.dropped == [1] and strategy.mean_score(2) < 0


def test_the_length_test_and_a_fixed_step():
    strategy = make(record=False, step=0.1, max_norm_ratio=2.0)
    # norms 1, 1, 10: the median 1, the bound 2: client 2 is dropped although its step lowers the loss
    strategy.aggregate(0, [reply(0, [1.0, 0.0]), reply(1, [0.0, -1.0]), reply(2, [10.0, 0.0])])
    assert strategy.last.dropped == [2] and strategy.last.bound == pytest.approx(2.0)
    # every reply scored at 0.1 x its update, whatever its share
    assert strategy.last.scores == pytest.approx(
        [math.log(2) - loss(0.1, 0.0), math.log(2) - loss(0.0, -0.1), math.log(2) - loss(1.0, 0.0)], rel=1e-6  # float32 weights
    )


def test_a_step_to_a_non_finite_loss_scores_minus_infinity_and_stays_in_the_record():
    strategy = make(max_norm_ratio=1e30)
    strategy.aggregate(0, [reply(0, [1.0, 0.0]), reply(1, [0.0, float("inf")]), reply(2, [float("nan"), 0.0])])
    assert strategy.last.scores[1:] == [-math.inf, -math.inf] and strategy.last.dropped == [1, 2]
    assert strategy.global_flat.tolist() == [1.0, 0.0]
    # a later gain does not forgive the record, but the reply is kept for its own score
    strategy.aggregate(1, [reply(0, [1.0, 0.0]), reply(1, [1.0, 0.0])])
    assert strategy.last.dropped == [] and strategy.mean_score(1) == -math.inf


def test_refused_rounds_change_nothing():
    strategy = make()
    strategy.aggregate(0, [reply(0, [1.0, 0.0])])
    before, records = strategy.global_flat.clone(), dict(strategy.records)
    with pytest.raises(AggregationRefused, match="none of the 2 replies lowers the clean loss"):
        strategy.aggregate(1, [reply(1, [0.0, 1.0]), reply(2, [-1.0, 0.0])])
    assert strategy.records == records and torch.equal(strategy.global_flat, before)


def test_state_dict_round_trip_continues_identically():
    a = make()
    a.aggregate(0, [reply(0, [1.0, 0.0]), reply(1, [0.0, 1.0]), reply(2, [0.5, 0.0])])
    state = a.state_dict()
    assert state["loss_records"]["clients"].tolist() == [0, 1, 2]
    assert state["loss_records"]["counts"].tolist() == [1, 1, 1]
    b = make()
    b.load_state_dict(state)
    assert b.records == a.records and torch.equal(a.global_flat, b.global_flat)
    nxt = [reply(0, [0.0, 0.1]), reply(1, [0.0, 0.1]), reply(3, [0.2, 0.0])]
    a.aggregate(1, nxt)
    b.aggregate(1, nxt)
    assert torch.equal(a.global_flat, b.global_flat) and a.last.dropped == b.last.dropped == [1]
    assert a.records == b.records
    assert make().state_dict()["loss_records"]["sums"].shape == (0,)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if k != "loss_records"})  # an older checkpoint
    assert b.records == {}


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"clean": PublicData(num_samples=10, seed=7)}, "clean=.* is not allowed; clean must be a labelled"),
        ({"step": 0}, "step=0 is not allowed; step must be a finite number > 0, or None"),
        ({"step": float("inf")}, "step=inf is not allowed"),
        ({"min_gain": float("nan")}, "min_gain=nan is not allowed; min_gain must be a finite number"),
        ({"record": 1}, "record=1 is not allowed; record must be True or False"),
        ({"max_norm_ratio": 1.0}, "max_norm_ratio=1.0 is not allowed; max_norm_ratio must be a finite number > 1"),
        ({"server_lr": 0}, "server_lr=0 is not allowed"),
    ],
)
def test_invalid_settings_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        LossFilter(**{"clean": CLEAN, **kw})


def test_flips_at_their_own_length_are_dropped_in_a_run(make_loop, small_dm):
    # 3 of 10 clients send their update times -1 (no length test catches it): the loss filter drops every one, and
    # their records are negative; early in training (3 rounds) some honest steps raise the clean loss too
    attack = SignFlip(fraction=0.3, scale=1.0, seed=1)
    strategy = LossFilter(PublicData(num_samples=200, seed=7, labeled=True))
    det = Detection(attack, strategy)
    loop = make_loop(
        num_clients=10, clients_per_round=10, rounds=3, strategy=strategy, callbacks=[attack, det]
    )
    result = loop.fit(seeded(MNIST1DCNN, channels=8), small_dm)
    totals = det.totals()
    assert totals["recall"] == 1.0 and totals["tp"] == 9.0, totals
    assert totals["fp"] <= 3, totals
    bad = set(attack.malicious(0, 10))
    assert all(strategy.mean_score(c) < 0 for c in bad), strategy.records
    assert sum(strategy.mean_score(c) > 0 for c in range(10) if c not in bad) >= 5, strategy.records
    assert all("loss_s" in h for h in result.history)
