import pytest
import torch

from lightning_fed.data import IID, Dirichlet, PartitionError, QuantitySkew, Shards
from lightning_fed.data.partition import summary_rows

LABELS = torch.arange(1000) % 10


@pytest.mark.parametrize("part", [IID(), Dirichlet(0.5), Dirichlet(100.0), Shards(2), QuantitySkew(0.5)])
def test_partition_is_a_seeded_disjoint_cover(part):
    shards = part.split(LABELS, 10, seed=3)
    assert len(shards) == 10
    allidx = torch.cat(shards)
    assert torch.equal(allidx.sort().values, torch.arange(1000))  # disjoint and complete
    again = part.split(LABELS, 10, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(shards, again))
    other = part.split(LABELS, 10, seed=4)
    assert any(not torch.equal(a, b) for a, b in zip(shards, other))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    def mean_classes(alpha):
        shards = Dirichlet(alpha, min_samples=1).split(LABELS, 10, seed=0)
        return sum((torch.bincount(LABELS[s], minlength=10) > 0).sum().item() for s in shards) / 10

    assert mean_classes(0.05) < mean_classes(1.0) < mean_classes(1000.0) + 1e-9
    assert mean_classes(1000.0) == 10


def test_dirichlet_respects_min_samples():
    shards = Dirichlet(0.3, min_samples=40).split(LABELS, 10, seed=1)
    assert min(len(s) for s in shards) >= 40


def test_shards_limit_labels_per_client():
    shards = Shards(labels_per_client=2).split(LABELS, 20, seed=0)
    assert max(len(torch.unique(LABELS[s])) for s in shards) <= 3  # a shard may straddle one label boundary


def test_quantity_skew_sizes_vary_but_labels_are_mixed():
    shards = QuantitySkew(0.3, min_samples=5).split(LABELS, 10, seed=0)
    sizes = [len(s) for s in shards]
    assert min(sizes) >= 5 and max(sizes) > 2 * min(sizes)


def test_summary_rows_histograms():
    shards = IID().split(LABELS, 4, seed=0)
    rows = summary_rows(shards, LABELS, 10)
    assert [r[1] for r in rows] == [250] * 4
    assert sum(sum(r[2]) for r in rows) == 1000


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Dirichlet(0.0), "alpha must be > 0"),
        (lambda: Dirichlet(-1.0), "alpha must be > 0"),
        (lambda: Shards(0), "labels_per_client must be >= 1"),
        (lambda: QuantitySkew(alpha=0), "alpha must be > 0"),
        (lambda: IID(min_samples=0), "min_samples must be >= 1"),
    ],
)
def test_bad_settings_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_impossible_min_samples_is_a_clear_error():
    with pytest.raises(PartitionError, match="cannot give 200 clients min_samples=10"):
        Dirichlet(0.5, min_samples=10).split(LABELS, 200, seed=0)
    with pytest.raises(PartitionError, match="no draw in 3 tries"):
        Dirichlet(0.01, min_samples=90, max_tries=3).split(LABELS, 10, seed=0)
