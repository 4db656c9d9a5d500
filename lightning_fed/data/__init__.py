"""Datasets and client partitions."""

from lightning_fed.data.mnist1d import MNIST1DDataModule, make_mnist1d
from lightning_fed.data.natural import Natural
from lightning_fed.data.partition import IID, Dirichlet, Partition, PartitionError, QuantitySkew, Shards
from lightning_fed.data.public import PublicData
from lightning_fed.data.synthetic import DeviceDataset, SyntheticDataModule, make_synthetic

__all__ = ["IID", "DeviceDataset", "Dirichlet", "MNIST1DDataModule", "Natural", "Partition", "PartitionError",
           "PublicData", "QuantitySkew", "Shards", "SyntheticDataModule", "make_mnist1d", "make_synthetic"]
