"""ReferenceFilter against hand computations (median and multi-Krum references, the direction and length tests, the
renormalised weights), its refusals and settings, and in FedLoop against sign flipping: it drops the flipped replies
and a resumed run ends identical."""

import lightning as L
import pytest
import torch

from lightning_fed import FedLoop
from lightning_fed.callbacks import Detection, SignFlip
from lightning_fed.data import IID, MNIST1DDataModule
from lightning_fed.errors import AggregationRefused
from lightning_fed.models import MNIST1DCNN
from lightning_fed.strategies import FedAvg, ReferenceFilter
from lightning_fed.strategies.reference_filter import filter_mask, reference_


def run(agg, rows, weights):
    flats = [torch.tensor(r, dtype=torch.float32) for r in rows]
    out = torch.full_like(flats[0], float("nan"))
    assert agg(out, flats, weights) is out
    return out


ROWS = [[1.0, 0.0], [1.0, 1.0], [2.0, 0.0], [-1.0, 0.0], [10.0, 0.0]]
WEIGHTS = [0.1, 0.2, 0.3, 0.2, 0.2]


def test_median_reference_by_hand():
    # median per coordinate: [-1, 1, 1, 2, 10] -> 1, [0, 0, 0, 0, 1] -> 0; reference [1, 0]
    # cosines 1, 1/sqrt(2), 1, -1, 1; norms 1, sqrt(2), 2, 1, 10: median sqrt(2), bound 3 sqrt(2) = 4.24
    # kept: rows 0, 1, 2 (row 3 points away, row 4 is too long); weights 0.1, 0.2, 0.3 renormalised by 0.6
    agg = ReferenceFilter()
    out = run(agg, ROWS, WEIGHTS)
    assert torch.allclose(out, torch.tensor([(0.1 + 0.2 + 0.6) / 0.6, 0.2 / 0.6]))
    assert agg.last.dropped == [3, 4]
    assert agg.last.bound == pytest.approx(3 * 2**0.5)
    assert agg.last.scores == pytest.approx([1.0, 2**-0.5, 1.0, -1.0, 1.0])


def test_thresholds_move_the_cut():
    # min_cosine 0.8 also drops row 1 (cosine 0.707); a ratio of 8 lets row 4 (norm 10 <= 8 * 1.414 = 11.3) in
    agg = ReferenceFilter(min_cosine=0.8, max_norm_ratio=8.0)
    out = run(agg, ROWS, WEIGHTS)
    assert agg.last.dropped == [1, 3]
    assert torch.allclose(out, torch.tensor([(0.1 * 1 + 0.3 * 2 + 0.2 * 10) / 0.6, 0.0]))


def test_krum_reference_by_hand():
    # f = 1 among 5: rows 0-3 near each other, row 4 far away; Krum's mean of the 4 best = [0.5, 0.25]
    rows = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [-20.0, -20.0]]
    x = torch.tensor(rows)
    ref = reference_(torch.empty(2), x, "krum", 1)
    assert torch.allclose(ref, torch.tensor([0.5, 0.25]))
    keep, _, bound = filter_mask(x, ref, 0.0, 3.0)
    # row 3 is zero (cosine 0: dropped), row 4 points away and is long; median norm 1, bound 3
    assert keep.tolist() == [True, True, True, False, False] and bound == pytest.approx(3.0)
    agg = ReferenceFilter(reference="krum", byzantine=1)
    out = run(agg, rows, [0.2] * 5)
    assert torch.allclose(out, torch.tensor([2 / 3, 1 / 3]))
    assert agg.last.dropped == [3, 4]


def test_zero_reference_skips_the_direction_test():
    # the median is [0, 0] (even count: mean of the two middle values): only the length test applies; norms
    # 1, 1, 1, 1, 9, 9: median 1 (the lower one), bound 3
    agg = ReferenceFilter()
    out = run(agg, [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [9.0, 0.0], [-9.0, 0.0]], [1 / 6] * 6)
    assert agg.last.dropped == [4, 5] and torch.allclose(out, torch.zeros(2))


def test_refuses_when_nothing_passes_and_too_few_for_krum():
    with pytest.raises(AggregationRefused, match="none of the 2 updates passes"):
        run(ReferenceFilter(min_cosine=0.9), [[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5])  # both at cosine 0.707
    with pytest.raises(AggregationRefused, match="needs at least 5 replies, got 4"):
        run(ReferenceFilter(reference="krum", byzantine=1), [[1.0]] * 4, [0.25] * 4)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"reference": "mean"}, r"reference='mean' .* one of \('median', 'krum'\)"),
        ({"byzantine": -1}, r"byzantine=-1 .* integer >= 0"),
        ({"min_cosine": 1.0}, r"min_cosine=1\.0 .* \[-1, 1\)"),
        ({"max_norm_ratio": 1.0}, r"max_norm_ratio=1\.0 .* > 1"),
    ],
)
def test_invalid_settings_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        ReferenceFilter(**kw)


def loop(tmp_path, rounds, callbacks, agg):
    return FedLoop(
        num_clients=10,
        clients_per_round=10,
        rounds=rounds,
        local_epochs=1,
        partition=IID(),
        strategy=FedAvg(aggregator=agg),
        callbacks=callbacks,
        output_dir=str(tmp_path),
        verbose=False,
        plot=False,
        loggers=[],
        checkpoint_every=1,
        seed=0,
    )


def test_drops_sign_flipped_replies_in_fedloop_and_resumes(tmp_path):
    """2 of 10 clients flip and scale their update by 4: every flipped reply is dropped, and one honest reply
    a round; a run killed after round 1 and resumed ends with the same weights."""
    dm = MNIST1DDataModule(batch_size=32, num_samples=1000)
    attack = SignFlip(fraction=0.2, scale=4.0, mode="fixed", seed=0)
    agg = ReferenceFilter()
    det = Detection(attack, agg)
    L.seed_everything(0)
    full = MNIST1DCNN()
    loop(tmp_path / "a", 3, [attack, det], agg).fit(full, dm)
    assert det.totals() == {"precision": 2 / 3, "recall": 1.0, "tp": 6.0, "fp": 3.0, "fn": 0.0}
    agg2 = ReferenceFilter()
    attack2 = SignFlip(fraction=0.2, scale=4.0, mode="fixed", seed=0)
    L.seed_everything(0)
    run_dir = loop(tmp_path / "b", 1, [attack2, Detection(attack2, agg2)], agg2).fit(MNIST1DCNN(), dm).run_dir
    agg3 = ReferenceFilter()
    attack3 = SignFlip(fraction=0.2, scale=4.0, mode="fixed", seed=0)
    det3 = Detection(attack3, agg3)
    L.seed_everything(1)
    resumed = MNIST1DCNN()
    loop(tmp_path / "b", 3, [attack3, det3], agg3).fit(resumed, dm, resume=run_dir)
    assert det3.tp == 6
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
