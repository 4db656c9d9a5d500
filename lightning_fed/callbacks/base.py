"""Federated hooks on top of Lightning's ``Callback``.

A ``FedCallback`` is a Lightning ``Callback`` (it also works under ``lightning.Trainer``, where the
federated hooks are simply never called) with six extra hooks that FedLoop (and a Flower node) calls:

* ``on_round_start(trainer, pl_module, instructions)`` — server, after the strategy configured the round;
  may edit the list of :class:`~lightning_fed.protocol.Instruction`.
* ``on_client_follow(trainer, pl_module, config)`` — a client on its own machine (a Flower node), before the
  round's weights load: bring the working model to the structure the server's ``config`` describes (pruning).
  FedLoop's own clients train the server's model and never need it.
* ``on_client_data(trainer, pl_module, shard) -> Dataset`` — client, before its loader is built; may return a
  subset of the client's training data (e.g. ``RecordSubset``), or the shard unchanged.
* ``on_client_start(trainer, pl_module, instruction)`` — client, after the payload was loaded, before
  local training.
* ``on_client_end(trainer, pl_module, reply)`` — client, after the reply payload was built, before it is
  encoded; may edit the :class:`~lightning_fed.protocol.Reply`.
* ``on_aggregate_start(trainer, pl_module, replies)`` — server, with the decoded, validated replies; may
  remove or edit entries of the list.
* ``on_round_end(trainer, pl_module, metrics)`` — server, after aggregation, with the global weights in
  ``pl_module``; may add entries to ``metrics`` (logged for the round). A callback that changes the
  model's structure here calls ``trainer.fed.model_changed()``.

and one set-up hook: ``wrap_uplink(codec) -> Codec``, called once before the first round with the uplink codec;
a callback that changes what travels (``MagnitudeSparsity`` packs masked entries) returns a wrapping codec.

The federated state (round, client id, client state, the client's data, the run folder, an evaluator) comes
from ``trainer.fed``, a :class:`~lightning_fed.context.FedContext`.

Plain Lightning callbacks need none of these: FedLoop only calls the hooks an object has.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from torch.utils.data import Dataset

from lightning_fed.codecs.base import Codec
from lightning_fed.protocol import Instruction, Reply
from lightning_fed.validation import CheckedArguments


class FedCallback(CheckedArguments, Callback):
    """A Lightning ``Callback`` with FedLoop's federated hooks (all no-ops by default)."""

    def on_round_start(self, trainer: Any, pl_module: Any, instructions: list[Instruction]) -> None:
        """Server: the round's instructions were made."""

    def wrap_uplink(self, codec: Codec) -> Codec:
        """Set-up: the uplink codec to use instead of ``codec`` (``codec`` itself by default)."""
        return codec

    def on_client_data(self, trainer: Any, pl_module: Any, shard: Dataset) -> Dataset:
        """Client: the data this client trains on this round (``shard`` by default)."""
        return shard

    def on_client_follow(self, trainer: Any, pl_module: Any, config: dict[str, Any]) -> None:
        """Client on its own machine (a Flower node, :mod:`lightning_fed.flower`), before the round's weights load:
        bring the working model to the server's current structure, as the task's ``config`` (what
        ``on_round_start`` wrote into the instructions) describes it. Not called in FedLoop, whose clients train
        the server's own (already restructured) model."""

    def on_client_start(self, trainer: Any, pl_module: Any, instruction: Instruction) -> None:
        """Client: payload loaded, local training about to start."""

    def on_client_end(self, trainer: Any, pl_module: Any, reply: Reply) -> None:
        """Client: reply built, about to be encoded."""

    def on_aggregate_start(self, trainer: Any, pl_module: Any, replies: list[Reply]) -> None:
        """Server: validated replies about to be aggregated. Drop replies from the list or replace payload
        entries; never write an entry in place (an ``Identity`` reply's entries are read-only views of its
        message). Overriding this hook turns off the server's fold (replies added as they arrive)."""

    def on_round_end(self, trainer: Any, pl_module: Any, metrics: dict[str, float]) -> None:
        """Server: aggregation done, global weights loaded into ``pl_module``."""


FED_HOOKS = ("on_round_start", "on_client_follow", "on_client_data", "on_client_start", "on_client_end", "on_aggregate_start", "on_round_end")
