"""Example LightningModules."""

from lightning_fed.models.mnist1d import MNIST1DCNN, MNIST1DMLP

__all__ = ["MNIST1DCNN", "MNIST1DMLP"]
