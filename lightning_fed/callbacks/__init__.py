"""Callbacks: federated hooks and compression callbacks that work under lightning.Trainer and FedLoop."""

from lightning_fed.callbacks.base import FedCallback

__all__ = ["FedCallback"]
