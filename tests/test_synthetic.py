"""Synthetic(alpha, beta) of the FedProx paper: deterministic, the paper's shapes and statistics, the IID variant,
its natural partition in FedLoop, and bad settings."""

import lightning as L
import pytest
import torch

from lightning_fed import FedLoop
from lightning_fed.data import Dirichlet, Natural, PartitionError, SyntheticDataModule, make_synthetic
from lightning_fed.models import LogisticRegression
from lightning_fed.strategies import FedProx


def test_generator_is_deterministic_with_the_papers_shapes():
    xs, ys = make_synthetic(1.0, 1.0, seed=0)
    again, labels = make_synthetic(1.0, 1.0, seed=0)
    other, _ = make_synthetic(1.0, 1.0, seed=1)
    assert len(xs) == 30 and all(torch.equal(a, b) for a, b in zip(xs, again))
    assert all(torch.equal(a, b) for a, b in zip(ys, labels))
    assert not torch.equal(xs[0][:50], other[0][:50])
    sizes = [len(y) for y in ys]
    assert all(x.shape == (n, 60) and x.dtype == torch.float32 for x, n in zip(xs, sizes))
    assert all(y.dtype == torch.long and 0 <= int(y.min()) and int(y.max()) <= 9 for y in ys)
    assert min(sizes) >= 50 and max(sizes) > 5 * sorted(sizes)[len(sizes) // 2]  # power law: a heavy tail
    assert len(torch.unique(torch.cat(ys))) == 10


def test_covariance_and_device_means():
    xs, _ = make_synthetic(1.0, 1.0, seed=0)
    big = max(xs, key=len)
    var = big.var(dim=0)
    assert var[0] == pytest.approx(1.0, rel=0.2) and var[59] == pytest.approx(60**-1.2, rel=0.2)  # j^-1.2
    means = torch.stack([x.mean(0) for x in xs])  # v_k ~ N(B_k, 1): the devices' inputs differ
    iid, _ = make_synthetic(iid=True, seed=0)
    iid_means = torch.stack([x.mean(0) for x in iid])
    assert means[:, 0].std() > 0.5 and iid_means[:, 0].abs().max() < 0.5


def test_alpha_beta_zero_still_differ_per_device_but_iid_shares_one_model():
    _, ys = make_synthetic(0.0, 0.0, seed=0)
    _, iid_ys = make_synthetic(iid=True, seed=0)
    hist = torch.stack([torch.bincount(y, minlength=10).float() / len(y) for y in ys])
    iid_hist = torch.stack([torch.bincount(y, minlength=10).float() / len(y) for y in iid_ys])
    assert hist.std(0).mean() > iid_hist.std(0).mean()  # non-IID label mixes differ more between devices


def test_natural_partition_gives_each_device_to_its_client(tmp_path):
    dm = SyntheticDataModule(alpha=0.5, beta=0.5, num_devices=6, seed=2, batch_size=10)
    L.seed_everything(0)
    loop = FedLoop(
        num_clients=6,
        clients_per_round=3,
        rounds=2,
        local_epochs=1,
        partition=Natural(),
        strategy=FedProx(mu=1.0),
        verbose=False,
        plot=False,
        checkpoint_every=0,
        loggers=[],
        output_dir=str(tmp_path),
    )
    res = loop.fit(LogisticRegression(lr=0.01), dm)
    xs, _ = make_synthetic(0.5, 0.5, num_devices=6, seed=2)
    assert [len(s) for s in loop.shards] == [round(0.8 * len(x)) for x in xs]
    assert all(
        torch.equal(dm.train_set.groups[s], torch.full((len(s),), k)) for k, s in enumerate(loop.shards)
    )
    assert len(dm.test_set) == sum(len(x) for x in xs) - sum(len(s) for s in loop.shards)
    assert 0 <= res.final_metrics["test_acc"] <= 1


def test_natural_partition_refuses_another_client_count(tmp_path):
    loop = FedLoop(
        num_clients=5,
        clients_per_round=2,
        rounds=1,
        partition=Natural(),
        verbose=False,
        plot=False,
        output_dir=str(tmp_path),
    )
    with pytest.raises(
        PartitionError,
        match="Natural: num_clients=5 is not allowed for this data; num_clients must "
        "be the number of groups, 6",
    ):
        loop.fit(LogisticRegression(), SyntheticDataModule(num_devices=6))
    assert not any(tmp_path.iterdir())  # refused before anything was written
    with pytest.raises(PartitionError, match="no 'groups' attribute"):
        Natural().split_dataset(torch.utils.data.TensorDataset(torch.zeros(3)), None, 1, 0)
    assert Dirichlet(0.5).split_dataset(list(range(20)), torch.arange(20) % 2, 2, 0)[0].dtype == torch.long


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: SyntheticDataModule(alpha=-1.0),
            r"SyntheticDataModule: alpha=-1.0 is not allowed; alpha must be >= 0",
        ),
        (lambda: SyntheticDataModule(beta=-0.5), r"beta=-0.5 is not allowed"),
        (lambda: SyntheticDataModule(test_fraction=1.0), r"test_fraction=1.0 is not allowed"),
        (lambda: make_synthetic(alpha=-1.0), r"make_synthetic: alpha=-1.0 is not allowed"),
        (lambda: make_synthetic(num_devices=0), r"num_devices=0 is not allowed"),
        (lambda: LogisticRegression(in_features=0), r"in_features=0 is not allowed"),
    ],
)
def test_bad_settings_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()
