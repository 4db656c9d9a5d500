"""FLTrust (Cao et al. 2021) against a hand computation; all-zero trust and a missing server update refuse the round;
the server update is the root data's SGD from the round's global model; settings validated; a resumed run ends
bit-identical."""

import pytest
import torch
from conftest import seeded

from lightning_fed.callbacks import RoundLRDecay
from lightning_fed.callbacks.base import FedCallback
from lightning_fed.data import PublicData
from lightning_fed.errors import AggregationRefused, RoundsFailed
from lightning_fed.models import MNIST1DCNN
from lightning_fed.strategies import FedAvg, FLTrust
from lightning_fed.strategies.fltrust import root_update, trust_scores

ROOT = PublicData(num_samples=40, seed=7, labeled=True)
# server update [1, 0]; replies: same direction (norm 2), orthogonal, opposite, at cos 0.6 (norm 5)
ROWS = [[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [3.0, 4.0]]


def run(agg, rows, ref, weights=None):
    flats = [torch.tensor(r) for r in rows]
    agg.reference = torch.tensor(ref)
    out = torch.full_like(flats[0], float("nan"))
    assert agg(out, flats, weights or [1 / len(flats)] * len(flats)) is out
    return out


def test_trust_scores_by_hand():
    assert trust_scores(torch.tensor(ROWS), torch.tensor([1.0, 0.0])).tolist() == pytest.approx(
        [1, 0, 0, 0.6]
    )


def test_aggregate_by_hand():
    # rescaled to |g0| = 1: [1, 0] and [0.6, 0.8]; (1 * [1, 0] + 0.6 * [0.6, 0.8]) / 1.6 = [0.85, 0.3]
    agg = FLTrust(clean=ROOT)
    out = run(agg, ROWS, [1.0, 0.0], weights=[0.7, 0.1, 0.1, 0.1])  # example weights are ignored
    assert out.tolist() == pytest.approx([0.85, 0.3])
    assert agg.last.dropped == [1, 2]
    assert agg.last.scores == pytest.approx([1, 0, 0, 0.6])
    assert agg.last.bound == pytest.approx(1.0)
    # the server update's norm sets the aggregate's scale
    assert run(agg, ROWS, [3.0, 0.0]).tolist() == pytest.approx([2.55, 0.9])


def test_all_zero_trust_is_refused():
    with pytest.raises(AggregationRefused, match="every one of the 2 replies has trust score 0"):
        run(FLTrust(clean=ROOT), [[-1.0, 0.0], [0.0, 2.0]], [1.0, 0.0])


def test_the_server_update_serves_one_call():
    agg = FLTrust(clean=ROOT)
    run(agg, ROWS, [1.0, 0.0])
    with pytest.raises(AggregationRefused, match="has no server update"):
        agg(torch.empty(2), [torch.tensor(r) for r in ROWS], [0.25] * 4)


@pytest.mark.parametrize(
    "kw, match",
    [
        (
            {"clean": PublicData(num_samples=10)},
            "clean=.* is not allowed; clean must be a labelled PublicData",
        ),
        ({"epochs": 0}, "epochs=0 is not allowed"),
        ({"lr": 0}, "lr=0 is not allowed"),
        ({"momentum": 1.0}, "momentum=1.0 is not allowed"),
        ({"batch_size": 0}, "batch_size=0 is not allowed"),
        ({"lr_decay": 0.5}, "lr_decay=0.5 is not allowed; lr_decay must be a RoundLRDecay or None"),
    ],
)
def test_invalid_settings_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        FLTrust(**{"clean": ROOT, **kw})


class Seen(FedCallback):
    """Records, each round, the global weights at its start and the server update the aggregator is given."""

    def __init__(self, agg):
        self.agg, self.starts, self.refs = agg, [], []

    def on_round_start(self, trainer, pl_module, instructions):
        self.starts.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    def on_aggregate_start(self, trainer, pl_module, replies):
        self.refs.append({k: v.clone() for k, v in self.agg.reference.items()})


def fltrust(**kw):
    return FLTrust(clean=ROOT, epochs=1, lr=0.05, momentum=0.9, batch_size=16, seed=3, **kw)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_server_update_is_the_root_sgd_from_the_global_model(make_loop, small_dm):
    decay = RoundLRDecay(schedule="cosine", min_scale=0.1)
    agg = fltrust(lr_decay=decay)
    seen = Seen(agg)
    loop = make_loop(
        num_clients=6, clients_per_round=5, rounds=2, strategy=FedAvg(aggregator=agg), callbacks=[seen]
    )
    result = loop.fit(seeded(MNIST1DCNN, channels=8), small_dm)
    assert [h["skipped"] for h in result.history] == [0, 0]
    assert same(seen.starts[0], seeded(MNIST1DCNN, channels=8).state_dict())
    for r in (0, 1):  # recomputed by hand from the round's global weights, round 1 at the decayed rate
        model = seeded(MNIST1DCNN, channels=8)
        model.load_state_dict(seen.starts[r])
        assert same(seen.refs[r], root_update(agg, model, r, 2))
        assert any(v.abs().sum() > 0 for v in seen.refs[r].values())
    model.load_state_dict(seen.starts[1])
    assert not same(seen.refs[1], root_update(fltrust(), model, 1, 2))  # without the decay: another update


def test_no_server_update_refuses_the_round(make_loop, small_dm):
    agg = fltrust()
    agg.callbacks = list  # as under a strategy that does not install the aggregator's callbacks
    loop = make_loop(
        num_clients=6, clients_per_round=5, rounds=2, max_failed_rounds=5, strategy=FedAvg(aggregator=agg)
    )
    with pytest.raises(RoundsFailed, match="round 2: aggregation refused: FLTrust.*has no server update"):
        loop.fit(seeded(MNIST1DCNN, channels=8), small_dm)


def test_resumed_run_is_bit_identical(make_loop, small_dm, tmp_path):
    def fit(rounds, out, resume=None):
        model = seeded(MNIST1DCNN, channels=8)
        make_loop(
            num_clients=6,
            clients_per_round=5,
            rounds=rounds,
            checkpoint_every=1,
            output_dir=str(out),
            strategy=FedAvg(aggregator=fltrust()),
        ).fit(model, small_dm, resume=resume)
        return model.state_dict()

    full = fit(3, tmp_path / "full")
    fit(1, tmp_path / "part")
    resumed = fit(3, tmp_path / "part", resume="last")
    assert same(full, resumed)
