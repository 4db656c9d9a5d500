"""Client runners: turn a round's tasks (downlink messages) into reply messages.

The client side of a round is :class:`ClientWork`: for one task it loads the client's own state from the
client store, restores a working model from the instruction, trains it with the module's own Lightning hooks
on the client's shard, builds the strategy's reply and encodes it with the codec's client half. It touches
nothing of the server: what it returns is a :class:`~lightning_fed.protocol.ClientMessage` (bytes, example
count, metrics, or the reason it failed).

A :class:`ClientRunner` decides where and when each client's work runs. :class:`SequentialRunner` runs them
one after another in this process; a multi-process runner (ranks split a round's clients) and an
event-driven asynchronous runner (a simulated clock) implement the same interface.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_fed.client import LocalTrainer
from lightning_fed.codecs.base import Codec, DecodeArgs, EncodeArgs
from lightning_fed.context import FedContext
from lightning_fed.data.loaders import client_loader
from lightning_fed.errors import is_client_fault
from lightning_fed.protocol import ClientMessage, ClientTask, Instruction, Payload, Reply, payload_bytes
from lightning_fed.seeding import derive_seed, seed_rngs
from lightning_fed.store import ClientStore
from lightning_fed.strategies.base import Strategy
from lightning_fed.trainer_view import TrainerView
from lightning_fed.validation import CheckedArguments

log = logging.getLogger("lightning_fed")

LOADER_STREAM = 1  # the (seed, round, client, 1) stream shuffles a client's batches; (seed, round, client) seeds training


def _signature(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of a module's parameters and buffers: its structure, cheap to compare."""
    return [(n, tuple(t.shape), t.dtype) for n, t in [*module.named_parameters(), *module.named_buffers()]]


class WorkingModules:
    """The modules clients train on (one per architecture), each restorable to its structure at round start.

    A client's code may change its working model's structure (replace a parameter, add a layer). Sharing one
    working module between clients would then leak that change into every later client of the round. During a
    client's work, torch's global registration hooks note any parameter, buffer or submodule being registered
    anywhere, and the recorded tensors' shapes are compared after it (a ``.data`` swap changes a shape in place);
    only then is the module's full structure compared with the one recorded at round start and, if it differs,
    the module restored in place from a copy taken then. Structural copies are only taken when the structure is
    new (the first round, or after the server pruned the model).
    """

    def __init__(self, keep: dict[int, Any]) -> None:
        self._keep = keep  # objects a copy must share, not duplicate (the trainer view, callbacks)
        self._pristine: dict[int, tuple[list[Any], torch.nn.Module, list[tuple[torch.Tensor, torch.Size]]]] = {}
        self._registered = False

    def round_start(self, modules: Sequence[torch.nn.Module]) -> None:
        """Record each module's structure (and a copy, when the structure is new)."""
        for m in modules:
            sig = _signature(m)
            known = self._pristine.get(id(m))
            copy_ = known[1] if known is not None and known[0] == sig else copy.deepcopy(m, dict(self._keep))
            self._pristine[id(m)] = (sig, copy_, [(t, t.shape) for t in (*m.parameters(), *m.buffers())])

    @contextmanager
    def watch(self) -> Iterator[None]:
        """Note, while a client works, whether any module registered a parameter, buffer or submodule."""
        def mark(*args: Any) -> None:
            self._registered = True

        self._registered = False
        handles = [register_module_parameter_registration_hook(mark), register_module_buffer_registration_hook(mark),
                   register_module_module_registration_hook(mark)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def restore(self, module: torch.nn.Module) -> bool:
        """Restore ``module``'s structure if a client changed it; return whether it had to."""
        known = self._pristine.get(id(module))
        if known is None:
            return False
        if not self._registered and all(t.shape == shape for t, shape in known[2]):
            return False  # nothing was registered and no recorded tensor changed shape: the structure is intact
        if _signature(module) == known[0]:
            return False
        fresh = copy.deepcopy(known[1], dict(self._keep))
        module.__dict__.clear()
        module.__dict__.update(fresh.__dict__)
        return True


@dataclass
class ClientWork:
    """The client side of a round: one task in, one reply message out.

    Attributes:
        strategy: its client half (``client_module``, ``client_receive``, ``client_reply``).
        codec: the uplink codec (client half: ``encode``).
        downlink_codec: decodes the instruction payload.
        store: the clients' own states on disk.
        dataset: the training set; ``shards[c]`` are client ``c``'s indices into it.
        shards: every client's indices.
        template: the data module's training loader (batch size, collate function, workers).
        local: runs local training with the module's hooks.
        view: the trainer view (``trainer``) the client's callbacks and module see.
        context: the federated context (``trainer.fed``).
        modules: the working modules and their structural restore.
        prepare: puts a strategy-provided module on the device and attaches the view (once).
        hook: calls a federated callback hook on every callback.
        chain: calls a federated hook that returns a value (``on_client_data``) on every callback in turn.
        seed: the run's seed.
        local_epochs: default local epochs (an instruction's ``local_epochs`` overrides it).
        downlink_state: the receivers' downlink decoder state (one simulated receiver decodes each message).
    """

    strategy: Strategy
    codec: Codec
    downlink_codec: Codec
    store: ClientStore
    dataset: Dataset
    shards: list[torch.Tensor]
    template: DataLoader
    local: LocalTrainer
    view: TrainerView
    context: FedContext
    modules: WorkingModules
    prepare: Callable[[L.LightningModule], L.LightningModule]
    hook: Callable[..., None]
    chain: Callable[[str, Any], Any]
    seed: int
    local_epochs: int
    downlink_state: dict[str, Any]

    def __call__(self, task: ClientTask, payload: Payload | None) -> ClientMessage:
        """Run one client's round on the decoded instruction ``payload`` (``None``: the client decodes the task's
        message itself, with its own downlink state, for a ``per_receiver`` downlink codec); a client's own
        failure becomes a :class:`ClientMessage` with ``failure`` set, a failure of lightning_fed's code
        propagates."""
        cid, ctx, view = task.client_id, self.context, self.view
        ctx.client_id, ctx.client_state = cid, self.store.load(cid)
        decode_s = 0.0
        if payload is None:
            t = time.perf_counter()
            payload = self.downlink_codec.decode(task.message, ctx.client_state.setdefault("downlink", {}),
                                                 DecodeArgs(round=task.round, spec=task.spec))
            decode_s = time.perf_counter() - t
        ctx.shard = Subset(self.dataset, self.shards[cid])
        default = view.lightning_module
        module = self.prepare(self.strategy.client_module(cid, default))
        view.lightning_module = module
        instr = Instruction(cid, payload, task.config)
        try:
            with self.modules.watch():  # notes a structural change the client makes
                seed_rngs(derive_seed(self.seed, task.round, cid))
                self.strategy.client_receive(module, instr)
                shard = self.chain("on_client_data", ctx.shard)
                self.hook("on_client_start", instr)
                generator = torch.Generator().manual_seed(derive_seed(self.seed, task.round, cid, LOADER_STREAM))
                loader = client_loader(self.template, shard, generator)
                metrics = self.local.fit(loader, int(task.config.get("local_epochs", self.local_epochs)),
                                         task.config.get("max_steps"))
                payload = self.strategy.client_reply(module, instr)
                reply = Reply(cid, payload, num_examples=len(ctx.shard), metrics=metrics,
                              local_steps=int(view.global_step))
                self.hook("on_client_end", reply)
                t = time.perf_counter()
                codec_state = ctx.client_state.setdefault("codec", {})
                message = self.codec.encode(reply.payload, codec_state,
                                            EncodeArgs(round=task.round, share=task.share, broadcast=task.broadcast,
                                                       client_id=cid, num_examples=reply.num_examples,
                                                       config=task.config))
                encode_s = time.perf_counter() - t
        except Exception as err:
            if not is_client_fault(err):
                raise
            ctx.client_state = {}  # a failed client's state is not saved: its next round starts from the last good one
            return ClientMessage(cid, failure=f"{type(err).__name__}: {err}")
        finally:
            view.lightning_module = default
            if self.modules.restore(module):
                log.warning("round %d: client %d changed its model's structure; restored for the next client",
                            task.round + 1, cid)
            ctx.client_id, ctx.shard = None, None
        if not ctx.client_state.get("codec"):
            ctx.client_state.pop("codec", None)
        self.store.save(cid, ctx.client_state)
        ctx.client_state = {}
        return ClientMessage(cid, message, reply.num_examples, reply.metrics, raw_bytes=payload_bytes(reply.payload),
                             encode_s=encode_s, decode_s=decode_s, local_steps=reply.local_steps)


class ClientRunner(CheckedArguments):
    """Where and when the clients of a round do their work. Subclasses implement :meth:`run`."""

    def run(self, tasks: list[ClientTask], work: ClientWork) -> list[ClientMessage]:
        """Every task's reply message (in the order of ``tasks``)."""
        raise NotImplementedError

    def stream(self, tasks: list[ClientTask], work: ClientWork) -> Iterator[ClientMessage]:
        """The reply messages of :meth:`run` one at a time, in the same order, each let go by the runner once
        yielded (so a consumer that releases them holds one at a time). By default :meth:`run`'s list, popped."""
        messages = self.run(tasks, work)
        messages.reverse()
        while messages:
            yield messages.pop()


class SequentialRunner(ClientRunner):
    """Runs the clients one after another in this process (the default).

    Each distinct downlink message is decoded once per round and the payload shared by the clients that
    received it (read-only: strategies load it into the working model, they never write it).
    """

    def run(self, tasks: list[ClientTask], work: ClientWork) -> list[ClientMessage]:
        """Decode each task's instruction and run the client."""
        return list(self.stream(tasks, work))

    def stream(self, tasks: list[ClientTask], work: ClientWork) -> Iterator[ClientMessage]:
        """Run the clients one at a time, each when the consumer asks for the next message: the server decodes
        and folds a reply before the next client trains, and no message outlives its decoding."""
        decoded: dict[int, tuple[Payload, float]] = {}
        for task in tasks:
            if work.downlink_codec.per_receiver:  # the client decodes its own message with its own state
                yield work(task, None)
                continue
            key = id(task.message)
            if key not in decoded:
                t = time.perf_counter()
                payload = work.downlink_codec.decode(task.message, work.downlink_state,
                                                     DecodeArgs(round=task.round, spec=task.spec))
                decoded[key] = (payload, time.perf_counter() - t)
            payload, decode_s = decoded[key]
            msg = work(task, payload)
            msg.decode_s = decode_s
            decoded[key] = (payload, 0.0)  # a shared payload is decoded (and timed) once
            yield msg
            del msg


__all__ = ["ClientRunner", "ClientWork", "SequentialRunner", "WorkingModules"]
