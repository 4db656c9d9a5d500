"""Robust aggregators against hand-computed examples; refusals; weak DP's noise scale; FLAME drops an outlier
cluster; every rule works in FedAvg and per tier."""

import math

import pytest
import torch
from torch import nn

from lightning_fed.errors import AggregationRefused
from lightning_fed.protocol import Reply
from lightning_fed.strategies import (
    FLAME,
    CoordinateMedian,
    FedAvg,
    Krum,
    NormBound,
    ReferenceFilter,
    RobustAggregator,
    TrimmedMean,
    WeakDP,
)
from lightning_fed.strategies.robust import krum_scores
from lightning_fed.strategies.tiers import TierAverage


def vecs(*rows):
    return [torch.tensor(r, dtype=torch.float32) for r in rows]


def run(agg, rows, weights=None):
    flats = vecs(*rows)
    weights = weights or [1 / len(flats)] * len(flats)
    out = torch.full_like(flats[0], float("nan"))
    result = agg(out, flats, weights)
    assert result is out
    return out


def test_median_odd_with_ties():
    assert run(CoordinateMedian(), [[1, 2], [1, 5], [3, 2]]).tolist() == [1, 2]


def test_median_even_count_is_mean_of_the_two_middle_values():
    # sorted per coordinate: [1, 2, 3, 10] -> 2.5; [1, 1, 5, 5] -> 3; [0, 2, 2, 2] -> 2 (ties)
    out = run(CoordinateMedian(), [[1, 5, 2], [3, 5, 2], [2, 1, 2], [10, 1, 0]])
    assert out.tolist() == [2.5, 3.0, 2.0]


def test_median_ignores_weights():
    out = run(CoordinateMedian(), [[0], [1], [100]], weights=[0.98, 0.01, 0.01])
    assert out.tolist() == [1.0]


def test_trimmed_mean_even_count_and_ties():
    # n=4, trim=0.25 -> k=1 per end: (2+3)/2, (1+5)/2, (2+2)/2
    out = run(TrimmedMean(trim=0.25), [[1, 5, 2], [3, 5, 2], [2, 1, 2], [10, 1, 0]])
    assert out.tolist() == [2.5, 3.0, 2.0]


def test_trimmed_mean_odd_count_and_rounding_down():
    rows = [[0], [1], [1], [2], [100]]
    assert run(TrimmedMean(trim=0.2), rows).item() == pytest.approx(4 / 3)  # k = 1: mean(1, 1, 2)
    assert run(TrimmedMean(trim=0.19), rows).item() == pytest.approx(104 / 5)  # k = floor(0.95) = 0: plain mean
    assert run(TrimmedMean(trim=0.0), rows).item() == pytest.approx(104 / 5)


def test_krum_scores_by_hand():
    # points 0, 1, 2, 3, 100 with f=1: each score sums the squared distances to the n - f - 2 = 2 nearest others
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]])
    assert krum_scores(x, 1).tolist() == [5.0, 2.0, 2.0, 5.0, 97.0**2 + 98.0**2]


def test_multi_krum_keeps_n_minus_f_and_krum_keeps_one():
    rows = [[0], [1], [2], [3], [100]]
    multi = Krum(byzantine=1)
    assert run(multi, rows).item() == pytest.approx(1.5)  # mean of 0, 1, 2, 3
    assert multi.last.dropped == [4]
    assert multi.last.scores[:4] == [5.0, 2.0, 2.0, 5.0]
    single = Krum(byzantine=1, select=1)
    assert run(single, rows).item() == 1.0  # lowest score, first of the tie
    assert single.last.dropped == [0, 2, 3, 4]
    assert single.report()["agg_dropped"] == 4.0


def test_multi_krum_uses_renormalised_weights():
    out = run(Krum(byzantine=1, select=2), [[0], [1], [2], [3], [100]], weights=[0.1, 0.3, 0.1, 0.1, 0.4])
    assert out.item() == pytest.approx((0.3 * 1 + 0.1 * 2) / 0.4)  # keeps positions 1 and 2


def test_krum_refuses_too_few_replies():
    with pytest.raises(AggregationRefused, match=r"Krum\(byzantine=1, select=None\) needs at least 5 replies, got 4"):
        run(Krum(byzantine=1), [[0], [1], [2], [3]])


def test_norm_bound_fixed_and_median():
    agg = NormBound(max_norm=1.0)
    out = run(agg, [[3, 4], [0.6, 0.8]])  # norm 5 is clipped to 1; norm 1 is left alone
    assert out.tolist() == pytest.approx([0.6, 0.8])
    assert agg.last.clipped == [0]
    med = NormBound()  # the round's median norm: norms 1, 5, 10 -> 5
    out = run(med, [[0.6, 0.8], [3, 4], [6, 8]])
    assert med.last.bound == pytest.approx(5.0)
    assert med.last.clipped == [2]
    assert out.tolist() == pytest.approx([(0.6 + 3 + 3) / 3, (0.8 + 4 + 4) / 3])


def test_weak_dp_noise_scale_and_determinism():
    n, d = 4, 200_000
    flats = [torch.zeros(d) for _ in range(n)]
    flats[0][0] = 10.0  # clipped to norm 1
    agg = WeakDP(max_norm=1.0, noise_std=0.01, seed=3)
    out = agg(torch.empty(d), flats, [0.25] * n)
    noise = out.clone()
    noise[0] -= 0.25
    assert noise.std().item() == pytest.approx(0.01, rel=0.02)
    assert abs(noise.mean().item()) < 1e-4
    assert agg.last.clipped == [0]
    again = agg(torch.empty(d), flats, [0.25] * n)
    assert torch.equal(out, again)  # seeded by (seed, inputs): a resumed round draws the same noise
    other = WeakDP(max_norm=1.0, noise_std=0.01, seed=4)(torch.empty(d), flats, [0.25] * n)
    assert not torch.equal(out, other)
    flats[1][1] = 1e-3  # other inputs, other noise
    assert not torch.equal(out, agg(torch.empty(d), flats, [0.25] * n))
    exact = WeakDP(max_norm=1.0, noise_std=0.0)(torch.empty(d), flats, [0.25] * n)
    assert exact[0].item() == pytest.approx(0.25) and exact[1].item() == pytest.approx(0.25e-3)


def test_flame_drops_an_obvious_outlier_cluster():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=g)
    good = [base + 0.1 * torch.randn(64, generator=g) for _ in range(7)]
    bad = [-3 * base + 0.1 * torch.randn(64, generator=g) for _ in range(3)]
    agg = FLAME(noise_level=0.0)
    out = agg(torch.empty(64), good + bad, [0.1] * 10)
    # HDBSCAN in single-cluster mode keeps only the points that persist longest, so FLAME may also drop a
    # benign update (as the paper's does); the whole outlier cluster goes, a majority stays
    assert {7, 8, 9} <= set(agg.last.dropped)
    kept = [i for i in range(10) if i not in agg.last.dropped]
    assert len(kept) >= 6
    norms = torch.stack([torch.linalg.vector_norm(good[i]) for i in kept])
    assert agg.last.bound == pytest.approx(float(norms.median()))
    clipped = torch.stack([good[i] * min(1.0, agg.last.bound / float(torch.linalg.vector_norm(good[i])))
                           for i in kept])
    assert torch.allclose(out, clipped.mean(0), atol=1e-5)
    assert set(agg.last.clipped) <= set(kept)
    assert math.isclose(agg.report()["agg_dropped"], len(agg.last.dropped))


def test_flame_noise_scales_with_the_bound():
    d = 100_000
    flats = [torch.ones(d) for _ in range(4)]  # one cluster, norm sqrt(d)
    agg = FLAME(noise_level=0.01, seed=1)
    out = agg(torch.empty(d), flats, [0.25] * 4)
    assert agg.last.dropped == []
    assert (out - 1).std().item() == pytest.approx(0.01 * math.sqrt(d), rel=0.03)


def test_flame_refuses_two_replies():
    with pytest.raises(AggregationRefused, match="needs at least 3"):
        run(FLAME(), [[1.0], [2.0]])


@pytest.mark.parametrize("build, match", [
    (lambda: TrimmedMean(trim=0.5), r"TrimmedMean: trim=0.5 is not allowed; trim must be in \[0, 0.5\)"),
    (lambda: TrimmedMean(trim=-0.1), r"trim=-0.1 is not allowed"),
    (lambda: Krum(byzantine=-1), r"Krum: byzantine=-1 is not allowed"),
    (lambda: Krum(select=0), r"Krum: select=0 is not allowed"),
    (lambda: NormBound(max_norm=-1.0), r"NormBound: max_norm=-1.0 is not allowed; max_norm must be > 0"),
    (lambda: WeakDP(max_norm=0.0), r"WeakDP: max_norm=0.0 is not allowed"),
    (lambda: WeakDP(noise_std=-0.1), r"WeakDP: noise_std=-0.1 is not allowed; noise_std must be >= 0"),
    (lambda: FLAME(noise_level=-1.0), r"FLAME: noise_level=-1.0 is not allowed"),
])
def test_invalid_settings_name_the_key(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("agg", [CoordinateMedian(), TrimmedMean(0.2), Krum(byzantine=1), NormBound(5.0),
                                 WeakDP(5.0, 0.0), FLAME(noise_level=0.0), ReferenceFilter()], ids=repr)
def test_fedavg_and_tiers_use_the_rule(agg):
    model = nn.Linear(3, 2)
    strategy = FedAvg(aggregator=agg)
    strategy.setup(model)
    before = strategy.global_flat.clone()
    replies = [Reply(c, {k: torch.full_like(v, float(c)) for k, v in model.state_dict().items()}, 10)
               for c in range(5)]
    metrics = strategy.aggregate(0, replies)
    assert isinstance(agg, RobustAggregator)
    assert {"update_norm", "agg_dropped", "agg_clipped", "agg_s"} <= metrics.keys()
    assert not torch.equal(strategy.global_flat, before)
    tier = TierAverage(model, aggregator=agg)
    start = tier.flat.clone()
    tier.average([r.payload for r in replies], [10] * 5)
    assert torch.allclose(tier.flat - start, strategy.global_flat - before)


def test_refused_round_leaves_the_global_weights_unchanged():
    model = nn.Linear(3, 2)
    strategy = FedAvg(aggregator=Krum(byzantine=2))
    strategy.setup(model)
    before = strategy.global_flat.clone()
    replies = [Reply(c, {k: torch.ones_like(v) for k, v in model.state_dict().items()}, 10) for c in range(6)]
    with pytest.raises(AggregationRefused, match="needs at least 7 replies, got 6"):
        strategy.aggregate(0, replies)
    assert torch.equal(strategy.global_flat, before)


def test_a_refused_round_is_skipped_by_the_loop_and_named(make_loop, small_dm):
    """In FedLoop a refusal skips the round (logged, weights unchanged); consecutive refusals stop the run with
    the rule's reason."""
    from lightning_fed.errors import RoundsFailed
    from lightning_fed.models import MNIST1DCNN

    loop = make_loop(num_clients=6, clients_per_round=4, rounds=3, max_failed_rounds=2,
                     strategy=FedAvg(aggregator=Krum(byzantine=2)))
    with pytest.raises(RoundsFailed, match=r"(?s)2 consecutive rounds could not aggregate.*round 1: aggregation "
                                           r"refused: Krum\(byzantine=2, select=None\) needs at least 7 replies, got 4"):
        loop.fit(MNIST1DCNN(), small_dm)
    loop = make_loop(num_clients=6, clients_per_round=5, rounds=2, strategy=FedAvg(aggregator=Krum(byzantine=1)))
    result = loop.fit(MNIST1DCNN(), small_dm)  # 5 replies are enough for f = 1
    assert [h["skipped"] for h in result.history] == [0, 0]
