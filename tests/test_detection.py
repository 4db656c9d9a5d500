"""Detection precision and recall of a robust rule against the simulated attack's malicious clients: a hand-made
round, a refused round, a real FedLoop run where multi-Krum drops exactly the sign flippers, and bad settings."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from conftest import seeded

from lightning_fed.callbacks import Detection, SignFlip
from lightning_fed.callbacks.detection import precision_recall
from lightning_fed.context import FedContext
from lightning_fed.models import MNIST1DCNN
from lightning_fed.strategies import FedAvg, Krum, NormBound
from lightning_fed.strategies.robust import AggregationReport


def fake_trainer(tmp_path, round_: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        fed=FedContext(num_clients=10, num_rounds=3, eval_every=1, run_dir=tmp_path, round=round_)
    )


def test_precision_recall_by_hand():
    assert precision_recall({1, 2, 3}, {2, 3, 4, 5}) == (2 / 3, 2 / 4)
    p, r = precision_recall(set(), {1})
    assert math.isnan(p) and r == 0.0
    p, r = precision_recall({1}, set())
    assert p == 0.0 and math.isnan(r)


def test_a_round_by_hand_and_a_refused_round(tmp_path):
    attack = SignFlip(fraction=0.3, seed=0)
    bad = attack.malicious(0, 10)
    good = [c for c in range(10) if c not in bad]
    clients = [bad[0], good[0], bad[1], good[1], good[2]]  # bad[2] was not sampled
    krum = Krum(byzantine=1)
    det = Detection(attack, krum)
    trainer = fake_trainer(tmp_path)
    det.on_aggregate_start(trainer, None, [SimpleNamespace(client_id=c) for c in clients])
    krum.last = AggregationReport(count=5, dropped=[0, 1])  # one malicious, one honest
    metrics: dict[str, float] = {"skipped": 0}
    det.on_round_end(trainer, None, metrics)
    assert (metrics["det_tp"], metrics["det_fp"], metrics["det_fn"]) == (1.0, 1.0, 1.0)
    assert metrics["det_precision"] == 0.5 and metrics["det_recall"] == 0.5
    # next round: the aggregator refused (its report is the previous one): nothing is counted
    det.on_aggregate_start(trainer, None, [SimpleNamespace(client_id=c) for c in clients])
    refused: dict[str, float] = {"skipped": 1}
    det.on_round_end(trainer, None, refused)
    assert "det_tp" not in refused
    assert det.totals() == {"precision": 0.5, "recall": 0.5, "tp": 1.0, "fp": 1.0, "fn": 1.0}
    again = Detection(attack, krum)
    again.load_state_dict(det.state_dict())
    assert again.totals() == det.totals()


def test_clipped_replies_count_for_a_norm_bound(tmp_path):
    attack = SignFlip(fraction=0.3, seed=0)
    bad = attack.malicious(0, 10)
    bound = NormBound()
    det = Detection(attack, bound, flag="clipped")
    trainer = fake_trainer(tmp_path)
    det.on_aggregate_start(trainer, None, [SimpleNamespace(client_id=c) for c in range(10)])
    bound.last = AggregationReport(count=10, clipped=list(bad), dropped=[])
    metrics: dict[str, float] = {}
    det.on_round_end(trainer, None, metrics)
    assert metrics["det_precision"] == 1.0 and metrics["det_recall"] == 1.0


def test_multi_krum_drops_exactly_the_sign_flippers(make_loop, small_dm):
    attack = SignFlip(fraction=0.3, scale=10.0, seed=1)
    krum = Krum(byzantine=3)
    det = Detection(attack, krum)
    loop = make_loop(
        num_clients=10,
        clients_per_round=10,
        rounds=2,
        strategy=FedAvg(aggregator=krum),
        callbacks=[attack, det],
    )
    result = loop.fit(seeded(MNIST1DCNN, channels=8), small_dm)
    assert [h["det_tp"] for h in result.history] == [3.0, 3.0]
    assert [h["det_precision"] for h in result.history] == [1.0, 1.0]
    assert det.totals() == {"precision": 1.0, "recall": 1.0, "tp": 6.0, "fp": 0.0, "fn": 0.0}


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"attack": "x"}, "attack='x'"),
        ({"aggregator": None}, "aggregator=None"),
        ({"flag": "scored"}, "flag='scored'"),
    ],
)
def test_bad_settings_name_the_key(kw, match):
    args = {"attack": SignFlip(), "aggregator": Krum(), "flag": "dropped", **kw}
    with pytest.raises(ValueError, match=match):
        Detection(**args)
