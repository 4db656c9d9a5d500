"""Heterogeneous tiers and public data."""

from __future__ import annotations

import pytest
import torch
from _distill_common import cnn

from lightning_fed.data import PublicData
from lightning_fed.data.mnist1d import make_mnist1d
from lightning_fed.strategies import FedGen, ModelTiers
from lightning_fed.strategies.tiers import LogitEnsemble, TierAverage, architecture_of, require_homogeneous


def test_round_robin_random_and_map_assignment():
    tiers = ModelTiers(models=[cnn(8), cnn(16)])
    assert tiers.num_tiers == 3
    assert [tiers.tier_of(i) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    rnd = ModelTiers(models=[cnn(8), cnn(16)], assignment="random", seed=3)
    draw = [rnd.tier_of(i) for i in range(60)]
    assert draw == [ModelTiers(models=[cnn(8), cnn(16)], assignment="random", seed=3).tier_of(i) for i in range(60)]
    assert set(draw) == {0, 1, 2}
    assert draw != [ModelTiers(models=[cnn(8), cnn(16)], assignment="random", seed=4).tier_of(i) for i in range(60)]
    mapped = ModelTiers(models=[cnn(8)], client_map={0: 1, 3: 1})
    assert [mapped.tier_of(i) for i in range(4)] == [1, 1, 0, 1]
    assert mapped.clients_of(1, 4) == [0, 1, 3]


def test_tier_modules():
    default, m1 = cnn(4), cnn(8)
    tiers = ModelTiers(models=[m1])
    assert tiers.module(0, default) is default and tiers.module(1, default) is m1
    assert architecture_of(default) != architecture_of(m1)
    assert architecture_of(cnn(4)) == architecture_of(default)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"assignment": "greedy"}, "assignment='greedy'"),
        ({"client_map": {0: 5}}, "client_map"),
        ({"models": ["x"]}, "must be LightningModules"),
    ],
)
def test_tiers_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelTiers(**kwargs)


def test_strategies_that_average_whole_models_refuse_heterogeneous_tiers():
    with pytest.raises(ValueError, match="cannot aggregate across architectures"):
        FedGen(tiers=ModelTiers(models=[cnn(8)]))
    with pytest.raises(ValueError, match="cannot aggregate across architectures"):
        require_homogeneous(ModelTiers(models=[cnn(8)]), "FedAvg")
    require_homogeneous(None, "FedAvg")
    require_homogeneous(ModelTiers(), "FedAvg")
    FedGen(tiers=ModelTiers())


def test_public_data_is_another_sample_of_mnist1d():
    pub = PublicData(num_samples=300, seed=7)
    assert pub.x.shape == (300, 40) and pub.y is None and len(pub) == 300
    private = make_mnist1d(500, 42)
    assert not torch.equal(pub.x[:10], private["x"][:10])
    labeled = PublicData(num_samples=50, seed=7, labeled=True)
    assert labeled.y is not None and labeled.y.shape == (50,)
    assert torch.equal(labeled.x, PublicData(num_samples=50, seed=7).x)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    idx = pub.sample_indices(20, g1)
    assert torch.equal(idx, pub.sample_indices(20, g2)) and len(set(idx.tolist())) == 20
    assert torch.equal(pub.sample_indices(1000, g1), torch.arange(300))


def test_public_data_from_tensors_and_errors():
    p = PublicData.from_tensors(torch.ones(5, 3), torch.arange(5))
    assert p.x.shape == (5, 3) and p.y.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="num_samples=0"):
        PublicData(num_samples=0)
    with pytest.raises(ValueError, match=r"y must hold one label per sample \(5\), got shape \(2,\)"):
        PublicData.from_tensors(torch.ones(5, 3), torch.arange(2))


def test_public_data_from_numpy_arrays_and_lists():
    """What users hold their data in: numpy arrays (float64 inputs, int64 labels) and lists, stored as the
    float32 inputs and long labels a tensor gives; what cannot be read as numbers, or as class labels, is refused
    by name."""
    import numpy as np

    x = np.arange(15, dtype=np.float64).reshape(5, 3)
    p = PublicData.from_tensors(x, np.array([4, 3, 2, 1, 0]))
    assert p.x.dtype == torch.float32 and torch.equal(p.x, torch.arange(15.0).reshape(5, 3))
    assert p.y.dtype == torch.long and p.y.tolist() == [4, 3, 2, 1, 0]
    assert PublicData.from_tensors([[1, 2], [3, 4]], [1.0, 0.0]).y.tolist() == [1, 0]  # whole floats are labels
    for y, message in (([0.5, 1.0, 2.0, 3.0, 4.0], "integer class labels"), (np.ones((5, 1)), r"shape \(5, 1\)"),
                       ([True] * 5, "integer class labels, got torch.bool")):
        with pytest.raises(ValueError, match=message):
            PublicData.from_tensors(x, y)
    for bad in ("abc", [[1, 2], [3]], [object()]):
        with pytest.raises(ValueError, match="x must be a tensor or an array of numbers"):
            PublicData.from_tensors(bad)


def test_tier_average_by_hand():
    m = cnn(2)
    avg = TierAverage(m)
    base = {k: v.clone() for k, v in avg.payload().items()}
    d1 = {k: torch.ones_like(v) for k, v in base.items()}
    d2 = {k: 4 * torch.ones_like(v) for k, v in base.items()}
    avg.average([d1, d2], [3, 1])  # mean delta = (3*1 + 1*4) / 4 = 1.75
    for k, v in avg.payload().items():
        assert torch.allclose(v, base[k] + 1.75)


def test_logit_ensemble_is_mean():
    a, b = cnn(2), cnn(3)
    x = torch.randn(4, 40)
    assert torch.allclose(LogitEnsemble([a, b])(x), (a(x) + b(x)) / 2)
