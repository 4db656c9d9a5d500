"""FedLoop: the federated Lightning Fabric loop.

One round: sample clients (seeded) → the strategy's instructions → downlink encode/decode → each client
loads the payload in place into the one working model, trains with the module's own hooks, and replies →
the codec encodes the reply (bytes counted) → the server decodes and validates it → the strategy
aggregates → evaluate every ``eval_every`` rounds → log → checkpoint every ``checkpoint_every`` rounds.

Determinism: client sampling depends only on (seed, round) and each client's local training RNG only on
(seed, round, client), so a run resumed from any checkpoint ends with the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric import Fabric
from lightning.pytorch.callbacks import Callback
from rich.console import Console

from lightning_fed.callbacks.base import FED_HOOKS
from lightning_fed.checkpoint import load_checkpoint, save_checkpoint
from lightning_fed.client import LocalTrainer
from lightning_fed.codecs.base import Codec, Identity, decode_expected, encode_budgeted
from lightning_fed.codecs.wire import MalformedMessage
from lightning_fed.data.loaders import client_loader, dataset_labels
from lightning_fed.data.partition import IID, Partition, summary_rows
from lightning_fed.evaluate import Evaluator
from lightning_fed.identity import run_identity
from lightning_fed.outputs import LOGGERS, make_loggers, new_run_dir, resolve_resume, write_outputs
from lightning_fed.progress import RoundProgress
from lightning_fed.protocol import Instruction, RejectedReply, Reply, spec_of, validate_reply
from lightning_fed.report import partition_table, write_partition_csv
from lightning_fed.seeding import derive_seed, seed_rngs
from lightning_fed.store import ClientStore
from lightning_fed.strategies.base import Strategy
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.trainer_view import TrainerView

log = logging.getLogger("lightning_fed")

PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")
UPLINK_ALLOCATIONS = ("uniform", "examples")


def uplink_shares(allocation: str, examples: list[int]) -> list[float]:
    """Each client's share of the uplink budget (mean 1 over all clients): all 1 for ``"uniform"``; for
    ``"examples"`` proportional to the client's number of training examples (an empty shard counts as 1).

    Example::

        uplink_shares("examples", [100, 300])   # [0.5, 1.5]
    """
    if allocation not in UPLINK_ALLOCATIONS:
        raise ValueError(f"uplink_allocation={allocation!r} is not allowed; use one of {UPLINK_ALLOCATIONS}")
    if allocation == "uniform" or not examples:
        return [1.0] * len(examples)
    n = [max(int(x), 1) for x in examples]
    total = sum(n)
    return [x * len(n) / total for x in n]


@dataclass
class FitResult:
    """What :meth:`FedLoop.fit` returns.

    Attributes:
        run_dir: the run's output folder.
        history: one dict of metrics per round.
        final_metrics: the last evaluation's metrics.
    """

    run_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)


class FedLoop:
    """Federated training of an unchanged LightningModule on a LightningDataModule's training set.

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=50, local_epochs=5,
                       partition=Dirichlet(alpha=0.5), strategy=FedAvg())
        result = loop.fit(MyLitModel(), MyDataModule())

    Args:
        num_clients: clients the training set is split among.
        clients_per_round: clients sampled (without replacement) each round.
        rounds: federated rounds.
        local_epochs: local epochs per round (a strategy may override it per client).
        partition: how the training set is split; default IID.
        strategy: server strategy; default FedAvg.
        codec: uplink codec (client → server); default Identity.
        downlink_codec: downlink codec (server → client); default Identity.
        uplink_allocation: how the uplink budget is split among clients. ``"uniform"``: every message at the
            codec's configured rate. ``"examples"``: client ``c`` gets ``share = n_c / mean(n)`` (``n`` = training
            examples, its FedAvg aggregation weight; the mean share over all clients is 1, so the expected bytes
            of a round stay the same), passed as ``encode(..., share=)``. Codecs whose size follows a density
            (``TopK``, ``Differential(TopK(...))``, ``TimeCorrelatedTopK``) use it; fixed-rate codecs ignore it.
        callbacks: Lightning callbacks (FedCallbacks also get the federated hooks).
        min_clients: the round is aggregated only if at least this many replies are valid.
        eval_every: evaluate the global model every this many rounds (and after the last).
        checkpoint_every: checkpoint every this many rounds; 0 disables checkpoints.
        keep_checkpoints: how many recent checkpoints to keep.
        output_dir: runs are written to ``output_dir/version_N``.
        seed: seed of client sampling, partition and local training.
        accelerator: Fabric accelerator ("cpu", "cuda", "auto"…).
        precision: Fabric precision ("32-true", "bf16-mixed", "16-mixed"…).
        max_message_bytes: replies larger than this are rejected before decoding; ``None`` = no limit.
        max_update_abs: replies with an entry larger than this in magnitude are rejected; ``None`` = no bound.
        keep_optimizer_state: keep each client's optimizer state between its rounds (in the client store).
        loggers: Lightning loggers to write to: any of "csv", "tensorboard" (skipped if not installed).
        verbose: show the rich progress bar and tables on the console.
        plot: write ``accuracy.png`` at the end.
    """

    def __init__(
        self,
        num_clients: int = 10,
        clients_per_round: int = 5,
        rounds: int = 10,
        local_epochs: int = 1,
        partition: Partition | None = None,
        strategy: Strategy | None = None,
        codec: Codec | None = None,
        downlink_codec: Codec | None = None,
        uplink_allocation: str = "uniform",
        callbacks: list[Callback] | None = None,
        min_clients: int = 1,
        eval_every: int = 1,
        checkpoint_every: int = 10,
        keep_checkpoints: int = 2,
        output_dir: str = "runs/fedloop",
        seed: int = 0,
        accelerator: str = "cpu",
        precision: str = "32-true",
        max_message_bytes: int | None = None,
        max_update_abs: float | None = None,
        keep_optimizer_state: bool = False,
        loggers: list[str] | None = None,
        verbose: bool = True,
        plot: bool = True,
    ) -> None:
        def need(cond: bool, key: str, value: Any, allowed: str) -> None:
            if not cond:
                raise ValueError(f"FedLoop: {key}={value!r} is not allowed; {key} must be {allowed}")

        need(num_clients >= 1, "num_clients", num_clients, ">= 1")
        need(1 <= clients_per_round <= num_clients, "clients_per_round", clients_per_round,
             f"between 1 and num_clients={num_clients}")
        need(rounds >= 1, "rounds", rounds, ">= 1")
        need(local_epochs >= 1, "local_epochs", local_epochs, ">= 1")
        need(1 <= min_clients <= clients_per_round, "min_clients", min_clients,
             f"between 1 and clients_per_round={clients_per_round}")
        need(eval_every >= 1, "eval_every", eval_every, ">= 1")
        need(uplink_allocation in UPLINK_ALLOCATIONS, "uplink_allocation", uplink_allocation,
             f"one of {UPLINK_ALLOCATIONS}")
        need(checkpoint_every >= 0, "checkpoint_every", checkpoint_every, ">= 0 (0 disables checkpoints)")
        need(keep_checkpoints >= 1, "keep_checkpoints", keep_checkpoints, ">= 1")
        need(str(precision) in PRECISIONS, "precision", precision, f"one of {PRECISIONS}")
        need(max_message_bytes is None or max_message_bytes > 0, "max_message_bytes", max_message_bytes, "> 0 or None")
        need(max_update_abs is None or max_update_abs > 0, "max_update_abs", max_update_abs, "> 0 or None")
        loggers = list(LOGGERS) if loggers is None else list(loggers)
        for name in loggers:
            need(name in LOGGERS, "loggers", loggers, f"a list of {LOGGERS}")
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.rounds = rounds
        self.local_epochs = local_epochs
        self.partition = partition if partition is not None else IID()
        self.strategy = strategy if strategy is not None else FedAvg()
        self.codec = codec if codec is not None else Identity()
        self.downlink_codec = downlink_codec if downlink_codec is not None else Identity()
        self.uplink_allocation = uplink_allocation
        self.uplink_shares: list[float] = [1.0] * num_clients
        self.callbacks = list(callbacks or [])
        for cb in self.callbacks:  # callbacks may check how they combine (e.g. prune before QAT) before training
            check = getattr(cb, "check_callbacks", None)
            if callable(check):
                check(self.callbacks)
        self.min_clients = min_clients
        self.eval_every = eval_every
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.output_dir = output_dir
        self.seed = seed
        self.accelerator = accelerator
        self.precision = str(precision)
        self.max_message_bytes = max_message_bytes
        self.max_update_abs = max_update_abs
        self.keep_optimizer_state = keep_optimizer_state
        self.logger_names = loggers
        self.verbose = verbose
        self.plot = plot
        self.console = Console(stderr=True, quiet=not verbose)
        self._model_changed = False

    # ------------------------------------------------------------------ public API
    def sample_clients(self, server_round: int) -> list[int]:
        """The clients of ``server_round``: a seeded sample without replacement, sorted."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, server_round))
        return sorted(torch.randperm(self.num_clients, generator=g)[: self.clients_per_round].tolist())

    def model_changed(self) -> None:
        """Tell the loop that a server-side callback changed the working model's structure (e.g. pruning):
        the strategy re-reads its global state from the model at the end of the round's hooks."""
        self._model_changed = True

    def fit(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule,
        *,
        resume: str | Path | None = None,
        run_config: str | None = None,
    ) -> FitResult:
        """Train ``model`` federated on ``datamodule``'s training set.

        Args:
            model: the LightningModule (its weights are the initial global model).
            datamodule: provides ``train_dataloader()`` (split among clients) and ``test_dataloader()`` or
                ``val_dataloader()`` (the held-out evaluation set).
            resume: a run folder or checkpoint folder to continue from, or ``"last"`` for the newest run
                under ``output_dir``.
            run_config: text of the resolved configuration, saved as ``config.yaml`` in the run folder.
        """
        self.identity = run_identity(self, model)  # taken before callbacks (pruning, MoE) change the model
        ckpt_dir = resolve_resume(self.output_dir, resume, self.identity)  # refuses a mismatch before any write
        run_dir = ckpt_dir.parent.parent if ckpt_dir is not None else new_run_dir(self.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if run_config is not None:
            (run_dir / "config.yaml").write_text(run_config)
        fabric = Fabric(accelerator=self.accelerator, devices=1, precision=self.precision, loggers=make_loggers(self.logger_names, run_dir))
        self._setup_data(datamodule, run_dir)
        model = fabric.strategy.precision.convert_module(model)
        model = fabric.to_device(model)
        self.fabric, self.model, self.run_dir = fabric, model, run_dir
        self.all_callbacks = self.callbacks + self.strategy.client_callbacks()
        self.view = view = TrainerView(fabric, self)
        view.lightning_module, view.callbacks = model, self.all_callbacks
        self._attach(model, view)
        self._prepared: dict[int, L.LightningModule] = {}
        self.store = ClientStore(run_dir / "clients")
        self.local = LocalTrainer(fabric, view, self.all_callbacks, self.keep_optimizer_state)
        self.evaluator = Evaluator(fabric, view, self.all_callbacks)
        self.history: list[dict[str, float]] = []
        self._downlink_state: dict[str, Any] = {}
        self._last_eval: dict[str, float] = {}
        for cb in self.all_callbacks:
            cb.setup(view, model, "fit")
        start = 0
        if ckpt_dir is not None:
            start = self._restore(ckpt_dir)
        else:
            self.strategy.setup(model)
        for cb in self.all_callbacks:
            cb.on_fit_start(view, model)
        model.on_fit_start()
        final: dict[str, float] = {}
        try:
            with RoundProgress(self.rounds, start, enabled=self.verbose, console=self.console) as progress:
                for r in range(start, self.rounds):
                    metrics = self._round(r)
                    self.history.append(metrics)
                    fabric.log_dict({k: v for k, v in metrics.items() if k != "round"}, step=r + 1)
                    final = self._last_eval or final
                    if self.checkpoint_every and ((r + 1) % self.checkpoint_every == 0 or r + 1 == self.rounds):
                        self.save_checkpoint(r)
                    progress.advance(metrics)
            for cb in self.all_callbacks:
                cb.on_fit_end(view, model)
            model.on_fit_end()
            for cb in self.all_callbacks:
                cb.teardown(view, model, "fit")
        finally:
            for lg in fabric.loggers:
                lg.finalize("success")
            for m in [model, *self._prepared.values()]:
                self._detach(m)
        write_outputs(self.model, self.history, self.run_dir, self.console, self.plot)
        return FitResult(run_dir, self.history, final)

    # ------------------------------------------------------------------ one round
    def _round(self, r: int) -> dict[str, float]:
        t0 = time.perf_counter()
        view, model = self.view, self.model
        view.current_round, view.client_id = r, None
        self.codec.on_round_start(r)
        self.downlink_codec.on_round_start(r)
        clients = self.sample_clients(r)
        instructions = self.strategy.configure_round(r, clients)
        self._fed_hook("on_round_start", instructions)
        stats = {"bytes_up": 0, "bytes_down": 0, "raw_bytes_up": 0, "raw_bytes_down": 0, "rejected": 0, "failed": 0,
                 "encode_s": 0.0, "decode_s": 0.0}
        received = self._downlink(instructions, stats)
        stats["bytes_down"] += len(self.codec.broadcast()) * len(received)  # e.g. a shared sparsity mask
        sent = [out for instr in received if (out := self._client(r, instr, stats)) is not None]
        # the server handles the round's messages together once the clients are done; each message is released
        # as soon as it is decoded, so at most one copy of each reply (encoded or decoded) is held
        replies: list[Reply] = []
        sent.reverse()
        while sent:
            instr, reply, message = sent.pop()
            checked = self.receive(r, instr, reply, message, stats)
            if checked is not None:
                replies.append(checked)
            del message
        view.client_id, view.client_state = None, {}
        self._fed_hook("on_aggregate_start", replies)
        metrics: dict[str, float] = {"round": r + 1, "clients": len(clients), "good": len(replies)}
        if len(replies) >= self.min_clients:
            metrics.update(self.strategy.aggregate(r, replies))
            metrics["skipped"] = 0
        else:
            log.warning("round %d skipped: %d valid replies, min_clients=%d", r + 1, len(replies), self.min_clients)
            metrics["skipped"] = 1
        self.strategy.load_global(model)
        if replies:
            n = sum(rp.num_examples for rp in replies)
            for key in sorted({k for rp in replies for k in rp.metrics}):
                vals = [(rp.metrics[key], rp.num_examples) for rp in replies if key in rp.metrics]
                metrics[key] = sum(v * w for v, w in vals) / sum(w for _, w in vals)
            metrics["examples"] = n
        metrics.update(stats)
        if stats["bytes_up"]:
            metrics["compression_ratio"] = stats["raw_bytes_up"] / stats["bytes_up"]
        if stats["bytes_down"]:
            metrics["compression_ratio_down"] = stats["raw_bytes_down"] / stats["bytes_down"]
        self._fed_hook("on_round_end", metrics)
        if self._model_changed:
            self.strategy.model_changed(model)
            self._model_changed = False
        if (r + 1) % self.eval_every == 0 or r + 1 == self.rounds:
            self._last_eval = self.evaluator.run(self.eval_loader)
            self._last_eval.update(self.strategy.evaluate(self.evaluate_module))
            metrics.update(self._last_eval)
        metrics["seconds"] = time.perf_counter() - t0
        return metrics

    def _downlink(self, instructions: list[Instruction], stats: dict[str, Any]) -> list[Instruction]:
        """Encode each distinct payload once, count its bytes per receiving client, decode for clients."""
        decoded: dict[int, Any] = {}
        out = []
        for instr in instructions:
            key = id(instr.payload)
            if key not in decoded:
                t = time.perf_counter()
                msg = self.downlink_codec.encode(instr.payload, self._downlink_state)
                stats["encode_s"] += time.perf_counter() - t
                t = time.perf_counter()
                payload = decode_expected(self.downlink_codec, msg, spec=spec_of(instr.payload))
                stats["decode_s"] += time.perf_counter() - t
                decoded[key] = (len(msg), sum(v.numel() * v.element_size() for v in instr.payload.values()), payload)
            size, raw, payload = decoded[key]
            stats["bytes_down"] += size
            stats["raw_bytes_down"] += raw
            out.append(Instruction(instr.client_id, payload, dict(instr.config)))
        return out

    def _client(self, r: int, instr: Instruction, stats: dict[str, Any]) -> tuple[Instruction, Reply, bytes] | None:
        """Run one client end to end; return its instruction, reply and encoded message, or ``None`` if it
        failed (logged)."""
        cid, view = instr.client_id, self.view
        view.client_id = cid
        view.client_state = self.store.load(cid)
        model = self._working_module(self.strategy.client_module(cid, self.model))
        view.lightning_module = model
        try:
            seed_rngs(derive_seed(self.seed, r, cid))
            self.strategy.client_receive(model, instr)
            self._fed_hook("on_client_start", instr)
            shard = self.shards[cid]
            loader = client_loader(self.train_template, shard, torch.Generator().manual_seed(derive_seed(self.seed, r, cid, 1)))
            train_metrics = self.local.fit(loader, int(instr.config.get("local_epochs", self.local_epochs)))
            payload = self.strategy.client_reply(model, instr)
            reply = Reply(cid, payload, num_examples=len(shard), metrics=train_metrics)
            self._fed_hook("on_client_end", reply)
            t = time.perf_counter()
            message = encode_budgeted(self.codec, reply.payload, view.client_state.setdefault("codec", {}),
                                      share=self.uplink_shares[cid])
            stats["encode_s"] += time.perf_counter() - t
            stats["raw_bytes_up"] += sum(t.numel() * t.element_size() for t in reply.payload.values())
        except Exception as err:  # a crashing client must not stop the round
            log.warning("round %d: client %d dropped: %s: %s", r + 1, cid, type(err).__name__, err)
            stats["failed"] += 1
            return None
        finally:
            view.lightning_module = self.model
        if not view.client_state.get("codec"):
            view.client_state.pop("codec", None)
        self.store.save(cid, view.client_state)
        stats["bytes_up"] += len(message)
        return instr, Reply(cid, {}, reply.num_examples, reply.metrics), message  # the payload now travels as bytes

    def _working_module(self, module: L.LightningModule) -> L.LightningModule:
        """Put a strategy-provided module (another architecture) on the device and attach the view, once."""
        if module is self.model or id(module) in self._prepared:
            return module
        module = self.fabric.to_device(self.fabric.strategy.precision.convert_module(module))
        self._attach(module, self.view)
        self._prepared[id(module)] = module
        return module

    def evaluate_module(self, module: L.LightningModule) -> dict[str, float]:
        """Evaluate any module (e.g. a tier's model) on the held-out split with the loop's evaluator."""
        module = self._working_module(module)
        self.view.lightning_module = module
        try:
            return self.evaluator.run(self.eval_loader)
        finally:
            self.view.lightning_module = self.model

    def receive(self, r: int, instr: Instruction, reply: Reply, message: bytes, stats: dict[str, Any]) -> Reply | None:
        """Server side of a reply: size limit, decode (no pickle), validate; ``None`` if rejected (logged)."""
        try:
            spec = self.strategy.reply_spec(instr)
            t = time.perf_counter()
            payload = decode_expected(self.codec, message, max_bytes=self.max_message_bytes, spec=spec,
                                      sender=reply.client_id)
            stats["decode_s"] += time.perf_counter() - t
            checked = Reply(reply.client_id, payload, reply.num_examples, dict(reply.metrics))
            validate_reply(checked, spec, max_abs=self.max_update_abs)
        except (MalformedMessage, RejectedReply) as err:
            log.warning("round %d: reply of client %d rejected: %s", r + 1, reply.client_id, err)
            stats["rejected"] += 1
            return None
        return checked

    def _fed_hook(self, name: str, *args: Any) -> None:
        for cb in self.all_callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                fn(self.view, self.model, *args)

    # ------------------------------------------------------------------ data and outputs
    def _setup_data(self, dm: L.LightningDataModule, run_dir: Path) -> None:
        dm.prepare_data()
        dm.setup("fit")
        self.train_template = dm.train_dataloader()
        dataset = self.train_template.dataset
        try:
            labels = dataset_labels(dataset)
        except ValueError:
            if not isinstance(self.partition, IID):
                raise
            labels = torch.zeros(len(dataset), dtype=torch.long)
        self.shards = self.partition.split(labels, self.num_clients, self.seed)
        self.uplink_shares = uplink_shares(self.uplink_allocation, [len(s) for s in self.shards])
        rows = summary_rows(self.shards, labels, int(labels.max()) + 1 if len(labels) else 1)
        write_partition_csv(rows, run_dir / "partition.csv")
        if not self.console.quiet:  # a quiet console still renders what it is given
            self.console.print(partition_table(rows))
        dm.setup("test")
        try:
            self.eval_loader = dm.test_dataloader()
        except Exception:  # noqa: BLE001 - Lightning raises MisconfigurationException when not implemented
            self.eval_loader = dm.val_dataloader()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, r: int) -> Path:
        """Atomically checkpoint the state after round ``r`` (0-based)."""
        state = {
            "round": r,
            "num_clients": self.num_clients,
            "seed": self.seed,
            "identity": self.identity,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "strategy": self.strategy.state_dict(),
            "codec": self.codec.state_dict(),
            "downlink_codec": self.downlink_codec.state_dict(),
            "downlink_state": self._downlink_state,
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.all_callbacks},
            "history": self.history,
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
        }
        return save_checkpoint(self.run_dir, r, state, self.store, self.keep_checkpoints)

    def _restore(self, ckpt_dir: Path) -> int:
        state = load_checkpoint(ckpt_dir)
        for cb in self.all_callbacks:  # callbacks first: they may rebuild the model's structure (pruning)
            if cb.state_key in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][cb.state_key])
        self.model.load_state_dict(state["model"])
        self.strategy.setup(self.model)
        self.strategy.load_state_dict(state["strategy"])
        self.codec.load_state_dict(state["codec"])
        self.downlink_codec.load_state_dict(state["downlink_codec"])
        self._downlink_state = state["downlink_state"]
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate((3, tuple(state["rng"]["python"]), None))
        self.store.restore(ckpt_dir / "clients")
        log.info("resumed from %s after round %d", ckpt_dir, state["round"] + 1)
        return state["round"] + 1

    # ------------------------------------------------------------------ module attachment
    @staticmethod
    def _attach(model: L.LightningModule, view: TrainerView) -> None:
        """Route ``self.log``, ``self.trainer`` and ``self.optimizers()`` of the module to the view."""
        for m in model.modules():
            if isinstance(m, L.LightningModule):
                m._fabric = view  # type: ignore[assignment]
                m._trainer = view  # type: ignore[assignment]

    @staticmethod
    def _detach(model: L.LightningModule) -> None:
        for m in model.modules():
            if isinstance(m, L.LightningModule):
                m._fabric = None
                m._trainer = None
                m._fabric_optimizers = []


__all__ = ["FED_HOOKS", "FedLoop", "FitResult", "derive_seed", "seed_rngs"]  # seeds re-exported for old imports
