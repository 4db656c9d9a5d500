"""Robust learning rate (Ozdayi et al. 2021) against a hand computation; theta from the malicious share; refusals;
settings validated; it runs in FedAvg."""

import pytest
import torch
from conftest import seeded

from lightning_fed.errors import AggregationRefused
from lightning_fed.models import MNIST1DCNN
from lightning_fed.strategies import FedAvg, RobustLR
from lightning_fed.strategies.robust_lr import sign_agreement

ROWS = [[1.0, 2.0, -1.0, 0.0], [2.0, -4.0, -2.0, 0.0], [3.0, 1.0, 6.0, 5.0]]


def run(agg, rows, weights=None):
    flats = [torch.tensor(r) for r in rows]
    weights = weights or [1 / len(flats)] * len(flats)
    out = torch.full_like(flats[0], float("nan"))
    assert agg(out, flats, weights) is out
    return out


def test_sign_agreement_by_hand():
    # signs per coordinate: (+,+,+) -> 3; (+,-,+) -> 1; (-,-,+) -> 1; (0,0,+) -> 1
    assert sign_agreement(torch.tensor(ROWS)).tolist() == [3.0, 1.0, 1.0, 1.0]


def test_negate_and_zero_by_hand():
    # mean: [2, -1/3, 1, 5/3]; theta = 3: only the first coordinate is agreed on
    neg = RobustLR(theta=3)
    assert run(neg, ROWS).tolist() == pytest.approx([2.0, 1 / 3, -1.0, -5 / 3])
    assert neg.last.scores == [0.75]
    assert neg.report()["agg_disputed"] == 0.75
    zero = RobustLR(theta=3, mode="zero")
    assert run(zero, ROWS).tolist() == pytest.approx([2.0, 0.0, 0.0, 0.0])


def test_agreed_coordinates_are_the_weighted_mean():
    out = run(RobustLR(theta=1), ROWS, weights=[0.5, 0.25, 0.25])  # every coordinate has |sum| >= 1
    assert out.tolist() == pytest.approx([1.75, 0.25, 0.5, 1.25])


def test_theta_follows_the_malicious_share():
    agg = RobustLR(malicious=0.2)
    assert [agg.threshold(n) for n in (3, 5, 10, 11)] == [1, 2, 3, 3]
    # 5 replies, theta 2: a coordinate with 3 against 2 (|sum| = 1) is negated, 4 against 1 (|sum| = 3) is not
    rows = [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0]]
    assert run(agg, rows).tolist() == pytest.approx([-0.2, 0.6])


def test_too_few_replies_for_theta_are_refused():
    with pytest.raises(AggregationRefused, match="needs at least 4 replies, got 3"):
        run(RobustLR(theta=4), ROWS)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"theta": 0}, "theta=0 is not allowed"),
        ({"theta": 2.5}, "theta=2.5 is not allowed"),
        ({"malicious": 0.5}, "malicious=0.5 is not allowed.*\\[0, 0.5\\)"),
        ({"mode": "flip"}, "mode='flip' is not allowed.*negate"),
    ],
)
def test_invalid_settings_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        RobustLR(**kw)


def test_runs_in_fedavg_and_reports(make_loop, small_dm):
    loop = make_loop(num_clients=6, clients_per_round=5, rounds=2, strategy=FedAvg(aggregator=RobustLR()))
    result = loop.fit(seeded(MNIST1DCNN, channels=8), small_dm)
    assert [h["skipped"] for h in result.history] == [0, 0]
    assert all(0.0 <= h["agg_disputed"] <= 1.0 for h in result.history)
