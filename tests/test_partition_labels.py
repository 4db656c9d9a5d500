"""Where partitions get class labels: label-free IID/QuantitySkew run on any dataset, label-based Dirichlet/Shards
refuse data without integer class labels (never splitting on a feature), ``labels=`` supplies them, and the
partition table and csv say "n/a" when labels are not known."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_fed.data import IID, Dirichlet, PartitionError, QuantitySkew, Shards
from lightning_fed.data.loaders import LabelsNotFound, dataset_labels
from lightning_fed.data.partition import summary_rows
from lightning_fed.report import partition_table, write_partition_csv

N = 240


def regression_set(n: int = N, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, generator=g)  # non-negative features: reading one as a label would "work"
    return TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1)


class RegressionDM(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(regression_set(), batch_size=16)

    def test_dataloader(self):
        return DataLoader(regression_set(60, seed=1), batch_size=16)


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.lin(x).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_mse", F.mse_loss(self.lin(x).squeeze(-1), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("part", [IID(), QuantitySkew(0.5, min_samples=10)])
def test_label_free_partitions_run_on_regression_data(make_loop, part):
    torch.manual_seed(0)
    loop = make_loop(partition=part)
    res = loop.fit(Regressor(), RegressionDM())
    # no val_dataloader: no validation; validation_step runs on the test set at the end, its names as test_*
    assert len(res.history) == 2 and "test_mse" in res.history[-1] and "val_mse" not in res.history[-1]
    assert sorted(torch.cat(loop.shards).tolist()) == list(range(N))
    csv = (res.run_dir / "partition.csv").read_text().splitlines()
    assert csv[0] == "client,samples,labels"
    assert all(line.endswith(",n/a") for line in csv[1:]) and len(csv) == 5


@pytest.mark.parametrize("part", [Dirichlet(0.5), Shards(2)])
def test_label_based_partitions_refuse_regression_data(make_loop, part, tmp_path):
    name = type(part).__name__
    with pytest.raises(PartitionError, match=rf"{name} splits by class label.*TensorDataset.tensors\[1\] holds a "
                                              r"tensor of dtype float32.*labels=.*IID\(\) or QuantitySkew"):
        make_loop(partition=part).fit(Regressor(), RegressionDM())
    assert not (tmp_path / "runs").exists()  # refused before the run folder is written


class DictSamples(Dataset):
    """Dict samples whose class is under a key no reader guesses."""

    def __init__(self, n: int = N):
        self.x = torch.randn(n, 40)
        self.digit = torch.arange(n) % 10

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "digit": int(self.digit[i])}


def test_dict_samples_need_a_labels_function():
    with pytest.raises(PartitionError, match=r"Dirichlet.*sample 0 is a dict with keys \['digit', 'x'\]"):
        Dirichlet(0.5).dataset_labels(DictSamples())
    assert IID().dataset_labels(DictSamples()) is None


def test_labels_function_makes_dirichlet_work_on_dict_samples():
    ds = DictSamples()
    part = Dirichlet(0.3, min_samples=5, labels=lambda d: [s["digit"] for s in d])
    labels = part.dataset_labels(ds)
    assert torch.equal(labels, ds.digit)
    shards = part.split(labels, 4, seed=0)
    assert sorted(torch.cat(shards).tolist()) == list(range(N))
    assert [s.tolist() for s in shards] == [s.tolist() for s in Dirichlet(0.3, min_samples=5).split(ds.digit, 4, 0)]


class DictDM(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(DictSamples(), batch_size=16)

    def test_dataloader(self):
        return DataLoader(DictSamples(40), batch_size=16)


class DictNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(40, 10)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.lin(batch["x"]), batch["digit"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.lin(batch["x"]), batch["digit"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_labels_function_in_fedloop(make_loop):
    torch.manual_seed(0)
    part = Dirichlet(0.5, min_samples=5, labels=lambda d: d.digit)
    res = make_loop(partition=part).fit(DictNet(), DictDM())
    csv = (res.run_dir / "partition.csv").read_text().splitlines()
    assert csv[0] == "client,samples," + ",".join(f"label_{c}" for c in range(10))
    assert sum(sum(map(int, line.split(",")[2:])) for line in csv[1:]) == N


def test_labels_function_result_is_checked():
    with pytest.raises(PartitionError, match=r"result of IID\(labels=...\) holds a tensor of dtype float32"):
        IID(labels=lambda d: torch.rand(len(d))).dataset_labels(DictSamples())
    with pytest.raises(TypeError, match="labels must be a function"):
        Dirichlet(0.5, labels=[1, 2, 3])


def test_integer_but_2d_labels_are_refused():
    x = torch.randn(N, 3)
    onehot = F.one_hot(torch.arange(N) % 3, 3)  # integer, but three values per sample
    ds = TensorDataset(x, onehot)
    with pytest.raises(PartitionError, match=r"Shards.*tensors\[1\] holds a tensor of dtype int64 and shape \(240, 3\)"
                                              r".*not one value per sample"):
        Shards(2).dataset_labels(ds)
    with pytest.raises(PartitionError, match=r"Dirichlet splits by class label.*shape \(240, 3\)"):
        Dirichlet(0.5).split(onehot, 4, seed=0)
    with pytest.raises(PartitionError, match=r"dtype float32"):
        Dirichlet(0.5).split(torch.rand(N), 4, seed=0)
    # one value per sample as a column is fine
    assert torch.equal(dataset_labels(TensorDataset(x, (torch.arange(N) % 3)[:, None])), torch.arange(N) % 3)


class Targets(Dataset):
    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return N

    def __getitem__(self, i):
        return torch.zeros(2), 0.5  # never read: the attribute wins


class Pairs(Dataset):
    def __init__(self, y):
        self.y = y

    def __len__(self):
        return N

    def __getitem__(self, i):
        return torch.zeros(2), self.y(i)


def test_label_sources():
    want = torch.arange(N) % 5
    assert torch.equal(dataset_labels(Targets((torch.arange(N) % 5).tolist())), want)
    assert torch.equal(dataset_labels(Subset(Targets(want), [3, 4, 5])), want[3:6])
    assert torch.equal(dataset_labels(Pairs(lambda i: i % 5)), want)
    assert torch.equal(dataset_labels(Pairs(lambda i: torch.tensor(i % 5))), want)
    with pytest.raises(LabelsNotFound, match="the `targets` attribute holds a tensor of dtype float"):
        dataset_labels(Targets(torch.rand(N)))
    with pytest.raises(LabelsNotFound, match=r"sample 0\[1\] is the float 0.5"):
        dataset_labels(Pairs(lambda i: 0.5))
    with pytest.raises(LabelsNotFound, match=r"sample 0\[1\] is a tensor of dtype int64 and shape \(2,\)"):
        dataset_labels(Pairs(lambda i: torch.tensor([1, 2])))
    with pytest.raises(LabelsNotFound, match="negative"):
        dataset_labels(Targets(torch.arange(N) - 1))


def test_label_free_split_takes_a_sample_count_and_matches_the_labelled_split():
    labels = torch.arange(N) % 10
    for part in (IID(), QuantitySkew(0.5)):
        a, b = part.split(N, 4, seed=2), part.split(labels, 4, seed=2)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(PartitionError, match="not a sample count"):
        Dirichlet(0.5).split(N, 4, seed=0)


def test_table_and_csv_say_na_without_labels(tmp_path):
    shards = IID().split(N, 3, seed=0)
    rows = summary_rows(shards, None)
    assert [r[2] for r in rows] == [None] * 3
    console = Console(record=True, width=100)
    console.print(partition_table(rows))
    text = console.export_text()
    assert text.count("n/a") == 3
    write_partition_csv(rows, tmp_path / "p.csv")
    assert (tmp_path / "p.csv").read_text() == "client,samples,labels\n0,80,n/a\n1,80,n/a\n2,80,n/a\n"
    labelled = summary_rows(shards, torch.arange(N) % 4)
    write_partition_csv(labelled, tmp_path / "q.csv")
    assert (tmp_path / "q.csv").read_text().splitlines()[0] == "client,samples,label_0,label_1,label_2,label_3"


def test_partitions_doc_example_runs(tmp_path):
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "partitions.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL) if "FedLoop(" in b)
    code = code.replace('output_dir="runs/partitions"', f'output_dir="{tmp_path}", verbose=False, plot=False')
    code = code.replace("print(", "str(")
    scope: dict = {}
    exec(compile(code, "docs/partitions.md", "exec"), scope)  # noqa: S102 - the documented example itself
    csv = (scope["result"].run_dir / "partition.csv").read_text().splitlines()
    assert csv[0] == "client,samples,label_0,label_1,label_2" and len(csv) == 7

