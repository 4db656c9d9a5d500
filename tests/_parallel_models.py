"""Modules for the multi-process tests (imported by the ranks through ``class_path``)."""

import os
import signal

from lightning_fed.models import MNIST1DCNN


class FailingCNN(MNIST1DCNN):
    """Raises in ``training_step`` for client ``fail_client`` (a client's own fault: it is dropped)."""

    def __init__(self, fail_client: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.fail_client = fail_client

    def training_step(self, batch, batch_idx):
        if self.trainer.fed.client_id == self.fail_client:
            raise ValueError(f"client {self.fail_client} has a broken sensor (rank {self.trainer.global_rank})")
        return super().training_step(batch, batch_idx)


class DyingCNN(MNIST1DCNN):
    """Kills its own process (SIGKILL) on rank ``$KILL_RANK`` in round ``$KILL_ROUND`` (1-based), when set."""

    def training_step(self, batch, batch_idx):
        rnd, rank = os.environ.get("KILL_ROUND"), os.environ.get("KILL_RANK")
        if rnd and self.trainer.fed.round + 1 == int(rnd) and self.trainer.global_rank == int(rank):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().training_step(batch, batch_idx)
