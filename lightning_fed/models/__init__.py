"""Example LightningModules."""

from lightning_fed.models.ffn import MNIST1DFFN
from lightning_fed.models.logreg import LogisticRegression
from lightning_fed.models.mnist1d import MNIST1DCNN, MNIST1DMLP

__all__ = ["MNIST1DCNN", "MNIST1DFFN", "MNIST1DMLP", "LogisticRegression"]
