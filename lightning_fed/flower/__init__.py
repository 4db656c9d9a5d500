"""Deployment through Flower: a recipe's server side as a Flower ServerApp, its client side as a ClientApp.

Needs the optional extra: ``pip install "lightning_fed[flower]"``. See docs/deployment.md.
"""

from lightning_fed.flower.apps import client_app, flower_apps, server_app
from lightning_fed.flower.runner import FlowerRunner

__all__ = ["FlowerRunner", "client_app", "flower_apps", "server_app"]
