"""Datasets and client partitions."""

from lightning_fed.data.mnist1d import MNIST1DDataModule, make_mnist1d
from lightning_fed.data.partition import IID, Dirichlet, Partition, PartitionError, QuantitySkew, Shards
from lightning_fed.data.public import PublicData

__all__ = ["IID", "Dirichlet", "MNIST1DDataModule", "Partition", "PartitionError", "PublicData", "QuantitySkew", "Shards", "make_mnist1d"]
