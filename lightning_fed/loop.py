"""FedLoop: the federated Lightning Fabric loop.

A round is a pipeline whose sides share nothing but messages (see docs/architecture.md):

    plan (lightning_fed/plan.py)      sample clients, the strategy's instructions, encode the downlink
    run (lightning_fed/runner.py)     each client: its state, its shard, local training, encode its reply
    collect (lightning_fed/server.py) decode with the sender's state, validate, log failures and rejections
    server (here and server.py)       the callbacks' say, aggregate, evaluate, log, checkpoint

Determinism: client sampling depends only on (seed, round) and each client's local training RNG only on
(seed, round, client), so a run resumed from any checkpoint ends with the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from torch.utils.data import DataLoader

from lightning_fed.calibration import CCVR, CalibrationRun
from lightning_fed.callbacks._compress import model_inputs
from lightning_fed.callbacks.base import FED_HOOKS, FedCallback
from lightning_fed.checkpoint import save_checkpoint
from lightning_fed.client import LocalTrainer, check_manual_optimization, check_module, train_aside
from lightning_fed.codecs.base import Codec, Identity
from lightning_fed.context import FedContext
from lightning_fed.data.loaders import (
    LoadersModule,
    client_loader,
    described_kind,
    loaders_module,
    training_template,
)
from lightning_fed.data.partition import IID, Partition, summary_rows
from lightning_fed.errors import AggregationRefused, RoundsFailed
from lightning_fed.evaluate import Evaluator
from lightning_fed.identity import run_identity
from lightning_fed.lightning_callbacks import refusal as lightning_callback_refusal
from lightning_fed.outputs import (
    LOGGERS,
    make_loggers,
    new_run_dir,
    resolve_resume,
    save_weights,
    write_outputs,
)
from lightning_fed.parallel import RankRunner
from lightning_fed.personal import PersonalEval, PersonalRun
from lightning_fed.plan import (
    SAMPLINGS,
    UPLINK_ALLOCATIONS,
    RoundPlan,
    acknowledge_downlink,
    plan_round,
    sample_clients,
    uplink_shares,
)
from lightning_fed.progress import RoundProgress
from lightning_fed.protocol import ClientMessage
from lightning_fed.ranks import DEFAULT_TIMEOUT_S, RankFailed, Ranks, launch
from lightning_fed.report import partition_table, write_partition_csv
from lightning_fed.runner import ClientRunner, ClientWork, SequentialRunner, WorkingModules
from lightning_fed.seeding import derive_seed, rng_untouched, seed_rngs
from lightning_fed.server import Server
from lightning_fed.store import ClientStore
from lightning_fed.strategies.base import Strategy
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.systems.clock import MacCounter, SimulatedClock, Workload
from lightning_fed.trainer_view import TrainerView
from lightning_fed.validation import ArgumentTypeError, CheckedArguments, need

log = logging.getLogger("lightning_fed")

OWNER = "FedLoop"  # how configuration errors name the class
SERVER_STREAM = -1  # (seed, round, -1) seeds the server side of a round; clients use (seed, round, client >= 0)
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")
PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
"""Lightning's short forms of a precision (``Trainer(precision=16)``, ``"bf16"``) and the setting each stands for."""


def lightning_strategy_hint(value: Any) -> str | None:
    """What to say when ``FedLoop(strategy=...)`` (or a recipe's ``loop.strategy``) is given one of Lightning's
    process strategies (``"ddp"``, ``"fsdp"``, ...): FedLoop's strategy is the federated one, and processes are
    ``devices``. ``None`` for any other value."""
    from lightning.fabric.strategies import STRATEGY_REGISTRY

    if not isinstance(value, str) or value not in {*STRATEGY_REGISTRY, "auto"}:
        return None
    return (f"{value!r} is one of Lightning's process strategies; FedLoop's strategy is the federated server "
            "strategy (FedAvg(), FedProx(mu=0.01), ...), and the clients of a round train on several processes "
            "with devices=N, see docs/scale-out.md")


@dataclass
class FitResult:
    """What :meth:`FedLoop.fit` returns.

    Attributes:
        run_dir: the run's output folder.
        history: one dict of metrics per round.
        final_metrics: the metrics of the last evaluation rounds: the final test (``test_*``, from
            ``test_step`` on ``test_dataloader()`` after the last round) and the last validation (``val_*``).
    """

    run_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)


class FedLoop(CheckedArguments):
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
        callbacks: Lightning callbacks, or one (as ``lightning.Trainer`` takes them; FedCallbacks also get the
            federated hooks).
        min_clients: the round is aggregated only if at least this many replies are valid.
        eval_every: validate the global model every this many rounds (and after the last): ``validation_step`` on
            ``val_dataloader()``, logged as the module's own ``val_*`` names plus ``val_acc``/``val_loss`` for
            classifiers. A data module without ``val_dataloader()`` gets no validation (see docs/evaluation.md).
        test_every: also test the global model every this many rounds: ``test_step`` on ``test_dataloader()``,
            logged as ``test_*``. ``0`` (default): test only after the last round, which is always tested; the
            final test metrics are :attr:`FitResult.final_metrics`. Set it to report a test-accuracy curve, never
            to choose a model or hyperparameters (that is what validation is for).
        checkpoint_every: checkpoint every this many rounds; 0 disables checkpoints.
        keep_checkpoints: how many recent checkpoints to keep.
        output_dir: runs are written to ``output_dir/version_N``.
        seed: seed of client sampling, partition and local training.
        accelerator: Fabric accelerator ("cpu", "cuda", "auto"…).
        precision: Fabric precision ("32-true", "bf16-mixed", "16-mixed"…; Lightning's 32, 16, "bf16" and 64 stand
            for "32-true", "16-mixed", "bf16-mixed" and "64-true").
        devices: processes per node, as ``lightning.Trainer(devices=)``: the round's clients are split among
            them and the result is the same as with one process (docs/scale-out.md). ``1`` (default): one process.
            With ``accelerator="cuda"`` each process gets its own GPU unless ``processes_per_device`` > 1.
        num_nodes: machines, each running ``devices`` processes (started by torchrun, SLURM, or the same command
            on every machine with ``NODE_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set, as for Lightning).
        processes_per_device: how many processes share one GPU (``accelerator="cuda"``): ``devices=8,
            processes_per_device=4`` runs 8 processes on 2 GPUs, which keeps a GPU busy with small models.
        timeout_s: how long a rank waits for the others at the end of a round before giving up.
        max_message_bytes: replies larger than this are rejected before decoding; ``None`` = no limit.
        max_update_abs: replies with an entry larger than this in magnitude are rejected; ``None`` = no bound.
        max_norm_ratio: replies whose L2 norm is more than this many times the median of the previous round's
            accepted replies (of the same structure, at least 3; without such a round, of the round's own replies)
            are rejected, a bound honest runs never reach (the largest ratios of every round are logged as
            ``norm_ratio``, against the round's median, and ``norm_ratio_prev``, against the previous one's);
            ``None`` disables it. Judged before its fold, a reply's payload is let go once added. Whatever it is, the server weights a
            reply by the client's partition size at most, never by the count the client claims.
        keep_optimizer_state: keep each client's optimizer state between its rounds (in the client store).
        loggers: Lightning loggers to write to: any of "csv", "tensorboard" (skipped if not installed).
        verbose: show the rich progress bar and tables on the console.
        plot: write ``accuracy.png`` at the end.
        max_failed_rounds: stop the run with :class:`~lightning_fed.errors.RoundsFailed` (naming every client's
            reason) after this many consecutive rounds with fewer than ``min_clients`` valid replies; a run in
            which no round aggregated stops with it too.
        runner: where and when the clients of a round run; default :class:`~lightning_fed.runner.SequentialRunner`
            (one process, one client after another).
        gradient_clip_val: as ``lightning.Trainer(gradient_clip_val=)``: passed to the module's
            ``configure_gradient_clipping`` on every optimizer step of local training; ``None`` clips nothing.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``, as ``lightning.Trainer(gradient_clip_algorithm=)``.
        accumulate_grad_batches: as ``lightning.Trainer(accumulate_grad_batches=)``: a client steps its optimizer
            every this many batches (and on the last batch of a local epoch), the loss divided by it.
        personal_eval: personalized evaluation at evaluation rounds: every client's held-out split (a slice of the
            test set with its label proportions, or a split of its shard) scores the global model and, for strategies
            that keep them, the personal models (:class:`~lightning_fed.personal.PersonalEval`); ``None``: none.
        calibration: a :class:`~lightning_fed.calibration.CCVR`: at every evaluation round the global model's head is
            calibrated with virtual features drawn from the clients' per-class feature statistics and evaluated
            beside the plain model (``ccvr/test_acc``, ...); the last one is written as ``calibrated.safetensors``.
            Training is unchanged. ``None``: none.
        sampling: ``"random"``: each round's clients are drawn independently; ``"cyclic"``: every client takes part
            once per cycle of ``ceil(num_clients / clients_per_round)`` rounds; ``"poisson"``: each client takes
            part with probability ``clients_per_round / num_clients`` (see :func:`~lightning_fed.plan.sample_clients`).
        clock: a :class:`~lightning_fed.systems.SimulatedClock`: clients get device and network profiles, rounds
            get simulated seconds (``sim_round_s``, ``sim_time_s``, ``clock.csv``), and its deadline, straggler
            policy, over-selection and dropouts decide which replies arrive (docs/systems.md). ``None``: none.
            An asynchronous strategy (:class:`~lightning_fed.strategies.FedBuff`) needs one: its rounds are server
            versions, each receiving the replies that arrive first on the clock (``clients_per_round`` unused).
    """

    @staticmethod
    def _argument_hint(name: str, value: Any) -> str | None:
        """More to say when the constructor's object check refuses ``name=value`` (CheckedArguments)."""
        return lightning_strategy_hint(value) if name == "strategy" else None

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
        callbacks: list[Callback] | Callback | None = None,
        min_clients: int = 1,
        eval_every: int = 1,
        test_every: int = 0,
        checkpoint_every: int = 10,
        keep_checkpoints: int = 2,
        output_dir: str = "runs/fedloop",
        seed: int = 0,
        accelerator: str = "cpu",
        precision: str | int = "32-true",
        max_message_bytes: int | None = None,
        max_update_abs: float | None = None,
        max_norm_ratio: float | None = 1e4,
        keep_optimizer_state: bool = False,
        loggers: list[str] | None = None,
        verbose: bool = True,
        plot: bool = True,
        max_failed_rounds: int = 3,
        runner: ClientRunner | None = None,
        sampling: str = "random",
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        accumulate_grad_batches: int = 1,
        devices: int = 1,
        num_nodes: int = 1,
        processes_per_device: int = 1,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        personal_eval: PersonalEval | None = None,
        clock: SimulatedClock | None = None,
        calibration: CCVR | None = None,
    ) -> None:
        need(OWNER, num_clients >= 1, "num_clients", num_clients, ">= 1")
        need(OWNER, 1 <= clients_per_round <= num_clients, "clients_per_round", clients_per_round,
             f"between 1 and num_clients={num_clients}")
        need(OWNER, rounds >= 1, "rounds", rounds, ">= 1")
        need(OWNER, local_epochs >= 1, "local_epochs", local_epochs, ">= 1")
        need(OWNER, 1 <= min_clients <= clients_per_round, "min_clients", min_clients,
             f"between 1 and clients_per_round={clients_per_round}")
        need(OWNER, eval_every >= 1, "eval_every", eval_every, ">= 1")
        need(OWNER, test_every >= 0, "test_every", test_every, ">= 0 (0: test only after the last round)")
        need(OWNER, uplink_allocation in UPLINK_ALLOCATIONS, "uplink_allocation", uplink_allocation,
             f"one of {UPLINK_ALLOCATIONS}")
        need(OWNER, checkpoint_every >= 0, "checkpoint_every", checkpoint_every, ">= 0 (0 disables checkpoints)")
        need(OWNER, keep_checkpoints >= 1, "keep_checkpoints", keep_checkpoints, ">= 1")
        need(OWNER, max_failed_rounds >= 1, "max_failed_rounds", max_failed_rounds, ">= 1")
        need(OWNER, sampling in SAMPLINGS, "sampling", sampling, f"one of {SAMPLINGS}")
        need(OWNER, gradient_clip_val is None or gradient_clip_val >= 0, "gradient_clip_val", gradient_clip_val,
             ">= 0 or None")
        need(OWNER, gradient_clip_algorithm in ("norm", "value"), "gradient_clip_algorithm", gradient_clip_algorithm,
             "one of ('norm', 'value')")
        need(OWNER, accumulate_grad_batches >= 1, "accumulate_grad_batches", accumulate_grad_batches, ">= 1")
        need(OWNER, devices >= 1, "devices", devices, "an integer >= 1 (processes per node)")
        need(OWNER, num_nodes >= 1, "num_nodes", num_nodes, "an integer >= 1")
        need(OWNER, processes_per_device >= 1, "processes_per_device", processes_per_device, "an integer >= 1")
        need(OWNER, timeout_s > 0, "timeout_s", timeout_s, "> 0")
        need(OWNER, runner is None or devices * num_nodes == 1, "runner", runner,
             "None when devices * num_nodes > 1 (the processes split the clients themselves)")
        need(OWNER, PRECISION_ALIASES.get(str(precision), str(precision)) in PRECISIONS, "precision", precision,
             f"one of {PRECISIONS} (or Lightning's 32, 16, 'bf16', 64)")
        precision = PRECISION_ALIASES.get(str(precision), str(precision))
        need(OWNER, max_message_bytes is None or max_message_bytes > 0, "max_message_bytes", max_message_bytes, "> 0 or None")
        need(OWNER, max_update_abs is None or max_update_abs > 0, "max_update_abs", max_update_abs, "> 0 or None")
        need(OWNER, max_norm_ratio is None or max_norm_ratio > 1, "max_norm_ratio", max_norm_ratio, "> 1 or None")
        loggers = list(LOGGERS) if loggers is None else list(loggers)
        for name in loggers:
            need(OWNER, name in LOGGERS, "loggers", loggers, f"a list of {LOGGERS}")
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.rounds = rounds
        self.local_epochs = local_epochs
        self.partition = partition if partition is not None else IID()
        self.strategy = strategy if strategy is not None else FedAvg()
        self.codec = codec if codec is not None else Identity()
        self.downlink_codec = downlink_codec if downlink_codec is not None else Identity()
        check_codec = getattr(self.strategy, "check_codec", None)  # e.g. secure aggregation needs a linear codec
        if callable(check_codec):
            check_codec(self.codec)
        self.uplink_allocation = uplink_allocation
        self.uplink_shares: list[float] = [1.0] * num_clients
        self.callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks or [])
        for cb in self.callbacks:
            need(OWNER, isinstance(cb, Callback), "callbacks", callbacks,
                 "a Lightning Callback or a list of them (instances: StructuredPruning(ratio=0.3), not the class)")
            if (why := lightning_callback_refusal(cb)) is not None:
                raise ValueError(f"{OWNER}: callbacks: {why}")
        for cb in self.callbacks:  # callbacks may check how they combine (e.g. prune before QAT) before training
            check = getattr(cb, "check_callbacks", None)
            if callable(check):
                check(self.callbacks)
        self.min_clients = min_clients
        self.eval_every = eval_every
        self.test_every = test_every
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.output_dir = output_dir
        self.seed = seed
        self.accelerator = accelerator
        self.precision = precision
        self.max_message_bytes = max_message_bytes
        self.max_update_abs = max_update_abs
        self.max_norm_ratio = max_norm_ratio
        self.keep_optimizer_state = keep_optimizer_state
        self.logger_names = loggers
        self.verbose = verbose
        self.plot = plot
        self.max_failed_rounds = max_failed_rounds
        self.sampling = sampling
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.accumulate_grad_batches = accumulate_grad_batches
        self.devices = devices
        self.num_nodes = num_nodes
        self.processes_per_device = processes_per_device
        self.timeout_s = timeout_s
        self.runner = runner if runner is not None else SequentialRunner()
        self.personal_eval = personal_eval
        self.clock = clock
        self.calibration = calibration
        self._calibrated: dict[str, torch.Tensor] | None = None  # the latest calibrated head (CCVR)
        if clock is not None:  # profiles resolve now: a bad CSV or a missing client fails before the run
            clock.bind(num_clients, clients_per_round, seed)
            need(OWNER, clock.keep_first is None or clock.keep_first >= min_clients, "min_clients", min_clients,
                 f"at most the clock's keep_first={clock.keep_first} (the replies a round keeps)")
        self.schedule = self.strategy.schedule()  # asynchronous rounds (FedBuff): an event queue on the clock
        if self.schedule is not None:
            self.schedule.check(num_clients, clock)
        check_plan = getattr(self.strategy, "check_plan", None)  # a budget over the planned rounds (DPFedAvg)
        if callable(check_plan):
            check_plan(num_clients, clients_per_round, rounds, sampling)
        self.ranks = Ranks()
        self.console = Console(stderr=True, quiet=not verbose)

    # ------------------------------------------------------------------ public API
    def sample_clients(self, server_round: int) -> list[int]:
        """The clients of ``server_round``: a seeded sample without replacement, sorted."""
        return sample_clients(self.seed, server_round, self.num_clients, self.clients_per_round, self.sampling)

    def fit(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | DataLoader | None = None,
        val_dataloaders: DataLoader | None = None,
        *,
        train_dataloaders: DataLoader | None = None,
        resume: str | Path | None = None,
        run_config: str | None = None,
    ) -> FitResult:
        """Train ``model`` federated on ``datamodule``'s training set, or on a training loader's, as
        ``lightning.Trainer.fit`` takes them: ``fit(model, dm)``, ``fit(model, train_loader, val_loader)`` or
        ``fit(model, train_dataloaders=..., val_dataloaders=...)``.

        Args:
            model: the LightningModule (its weights are the initial global model).
            datamodule: provides ``train_dataloader()`` (split among clients) and, optionally,
                ``val_dataloader()`` (validation at evaluation rounds) and ``test_dataloader()`` (the final test);
                or the training ``DataLoader`` itself.
            val_dataloaders: with a training loader, the validation loader (optional).
            train_dataloaders: the training ``DataLoader`` (its dataset is split among the clients; each client's
                loader takes its batch size, collate function and workers, shuffled per round), instead of a data module.
            resume: a run folder or checkpoint folder to continue from, or ``"last"`` for the newest run
                under ``output_dir``.
            run_config: text of the resolved configuration, saved as ``config.yaml`` in the run folder.

        Raises:
            RoundsFailed: ``max_failed_rounds`` consecutive rounds (or every round of the run) had fewer than
                ``min_clients`` valid replies.
            RankFailed: a process of a multi-process run died (named in the message), or one cannot see the run
                folder; the run continues from its last checkpoint with ``resume="last"``.
        """
        compiled = getattr(model, "_orig_mod", None)  # torch.compile's wrapper: left as it was given
        if not isinstance(model, L.LightningModule) and not isinstance(compiled, L.LightningModule):
            raise ArgumentTypeError(f"FedLoop.fit: model={described_kind(model)} is not allowed; model must be a "
                                    "LightningModule instance (its training_step and configure_optimizers train each "
                                    "client)")
        datamodule = loaders_module(datamodule, train_dataloaders, val_dataloaders)
        self.identity = run_identity(self, model)  # taken before callbacks (pruning, MoE) change the model
        self.ranks = launch(self.devices, self.num_nodes, self.timeout_s)
        ok = False
        try:
            result = self._fit(model, datamodule, resume, run_config)
            ok = True
            return result
        finally:
            self._close_ranks(ok)

    def _fit(self, model: L.LightningModule, datamodule: L.LightningDataModule, resume: str | Path | None,
             run_config: str | None) -> FitResult:
        ranks = self.ranks
        rank_zero_only.rank = ranks.rank  # Lightning's rank-zero utilities (loggers) follow our ranks
        self.console = Console(stderr=True, quiet=not (self.verbose and ranks.is_zero))
        found = resolve_resume(self.output_dir, resume, self.identity)  # refuses a mismatch before any write
        ckpt_dir, ckpt_state = found if found is not None else (None, None)
        ranks.resume_hint = self._resume_hint(None if ckpt_state is None else int(ckpt_state["round"]))
        rows = self._setup_data(datamodule)
        if self._prepares(model):
            with rng_untouched():
                model.prepare_data()  # after the data module's, as lightning.Trainer calls them
        check_module(model, self.train_template, [len(s) for s in self.shards])
        check_manual_optimization(model, self.gradient_clip_val, self.accumulate_grad_batches)  # before any write
        self.strategy.check_model(model)
        if self.calibration is not None:
            need(OWNER, self.strategy.has_global_model, "calibration", self.calibration,
                 f"None with {type(self.strategy).__name__}, which keeps no global model to calibrate")
            self.calibration.head_module(model)  # refuses a head name that is not a linear layer, before any write
        if ranks.distributed:
            for cb in [*self.callbacks, *self.strategy.client_callbacks()]:
                reason = getattr(cb, "single_process_reason", None)
                if reason:
                    raise ValueError(f"{type(cb).__name__} cannot run with devices * num_nodes > 1: {reason}")
            self._check_same_start(model)  # also: every rank has resolved the resume before a new folder exists
        run_dir = ckpt_dir.parent.parent if ckpt_dir is not None else (new_run_dir(self.output_dir) if ranks.is_zero else None)
        run_dir = Path(ranks.agree(str(run_dir) if ranks.is_zero else None))
        if ranks.is_zero:
            run_dir.mkdir(parents=True, exist_ok=True)  # everything that can refuse the run has run by now
            if run_config is not None:
                (run_dir / "config.yaml").write_text(run_config)
            write_partition_csv(rows, run_dir / "partition.csv")
        if not self.console.quiet:  # a quiet console still renders what it is given
            self.console.print(partition_table(rows))
        if ranks.distributed:
            self._check_shared_folder(run_dir)
        fabric = self._fabric()
        self.loggers = make_loggers(self.logger_names, run_dir) if ranks.is_zero else []
        model = fabric.to_device(fabric.strategy.precision.convert_module(model))
        self._build(fabric, model, run_dir)
        view = self.view
        for cb in self.all_callbacks:
            cb.setup(view, model, "fit")
        self._setup_module(model)
        start = 0
        if ckpt_dir is not None:
            start = self._restore(ckpt_dir, ckpt_state)
        else:
            self.strategy.setup(model)
        for cb in self.all_callbacks:
            cb.on_fit_start(view, model)
        model.on_fit_start()
        final: dict[str, float] = {}
        status = "failed"
        try:
            with RoundProgress(self.rounds, start, enabled=self.verbose and ranks.is_zero,
                               console=self.console) as progress:
                for r in range(start, self.rounds):
                    ranks.activity = f"round {r + 1}"
                    metrics = self._round(r)
                    self.history.append(metrics)
                    for lg in self.loggers:
                        lg.log_metrics({k: v for k, v in metrics.items() if k != "round"}, step=r + 1)
                    final = self._final_eval or final
                    if self.checkpoint_every and ((r + 1) % self.checkpoint_every == 0 or r + 1 == self.rounds):
                        self.save_checkpoint(r)
                        ranks.resume_hint = self._resume_hint(r)
                    progress.advance(metrics)
            ranks.activity = "the end of the run"
            if self.history and all(h.get("skipped") for h in self.history):
                raise RoundsFailed(self._failure_report("every round of the run"))
            for cb in self.all_callbacks:
                cb.on_fit_end(view, model)
            model.on_fit_end()
            for cb in self.all_callbacks:
                cb.teardown(view, model, "fit")
            model.teardown("fit")
            datamodule.teardown("fit")
            status = "success"
        finally:
            for lg in self.loggers:
                lg.finalize(status)
            for m in [model, *self._prepared.values()]:
                self._detach(m)
        if ranks.is_zero:
            write_outputs(self.model, self.history, self.run_dir, self.console, self.plot)
            if self.calibration is not None and self._calibrated is not None:
                with self.calibration.applied(self.model, self._calibrated):
                    save_weights(self.model, self.run_dir / "calibrated.safetensors")
        return FitResult(run_dir, self.history, final)

    def client_side(self, model: L.LightningModule, datamodule: L.LightningDataModule, state_dir: str | Path) -> ClientWork:
        """This loop's client side alone, built as :meth:`fit` builds it, for a runtime that runs each client on
        its own machine (Flower's ClientApp, :mod:`lightning_fed.flower`): the shards, the module and its
        callbacks set up, the strategy's client half, the uplink codec. The client store lives in ``state_dir``
        (shared by the processes of one node). Nothing of the server side is used."""
        self._setup_data(datamodule)
        with rng_untouched():
            model.prepare_data()
        check_module(model, self.train_template, [len(s) for s in self.shards])
        self.strategy.check_model(model)
        fabric = self._fabric()
        self.loggers = []
        model = fabric.to_device(fabric.strategy.precision.convert_module(model))
        self._build(fabric, model, Path(state_dir))
        self.store = self.work.store = ClientStore(Path(state_dir) / "clients", shared=True)
        for cb in self.all_callbacks:
            cb.setup(self.view, model, "fit")
        self._setup_module(model)
        self.strategy.setup(model)
        for cb in self.all_callbacks:
            cb.on_fit_start(self.view, model)
        model.on_fit_start()
        return self.work

    def _setup_module(self, model: L.LightningModule) -> None:
        """``model.setup("fit")`` after the callbacks' ``setup``, as ``lightning.Trainer`` calls it (the view attached:
        ``self.trainer.datamodule`` works there); layers it builds are then put on the device and in the precision
        like the rest, before the strategy takes the initial global model."""
        model.setup("fit")
        self.fabric.to_device(self.fabric.strategy.precision.convert_module(model))

    def _build(self, fabric: Fabric, model: L.LightningModule, run_dir: Path) -> None:
        """The parts of a run: the stores, the context and trainer view, the uplink codec as the callbacks wrap
        it, the client side (:class:`ClientWork`) and the server side (:class:`Server`)."""
        self.fabric, self.model, self.run_dir = fabric, model, run_dir
        self.all_callbacks = self.callbacks + self.strategy.client_callbacks()
        ranks = self.ranks
        self.store = ClientStore(run_dir / "clients", shared=ranks.distributed)  # each rank saves its clients
        if ranks.is_zero:
            self.senders = ClientStore(run_dir / "senders")
        else:  # every rank decodes every message; rank 0's copy of the senders' state is the one checkpointed
            self._senders_tmp = Path(tempfile.mkdtemp(prefix=f"lightning_fed-rank{ranks.rank}-senders-"))
            self.senders = ClientStore(self._senders_tmp)
        self.receivers = None  # the server's state about each receiver of a per-receiver downlink codec
        if self.downlink_codec.per_receiver:
            self.receivers = ClientStore(run_dir / "receivers" if ranks.is_zero else self._senders_tmp / "receivers")
        self.context = ctx = FedContext(
            num_clients=self.num_clients, num_rounds=self.rounds, eval_every=self.eval_every, run_dir=run_dir,
            test_every=self.test_every, val_data=self.val_loader, test_data=self.test_loader,
            eval_data=self.val_loader if self.val_loader is not None else self.test_loader,
            console=self.console, local_epochs=self.local_epochs, steps_per_epoch=self._steps_per_epoch(),
            _evaluate=self.evaluate_module, _train=self._train_aside, _stored_clients=self.store.ids,
            _stored_state=self.store.load)
        self.view = view = TrainerView(fabric, ctx, self.loggers, ranks.rank, ranks.world_size)
        view.datamodule = None if isinstance(self.datamodule, LoadersModule) else self.datamodule
        view.lightning_module, view.callbacks = model, self.all_callbacks
        self._attach(model, view)
        self._prepared: dict[int, L.LightningModule] = {}
        self.uplink = self.codec
        for cb in self.all_callbacks:  # e.g. MagnitudeSparsity packs the masked entries of every reply
            wrap = getattr(cb, "wrap_uplink", None)
            if wrap is not None:
                self.uplink = wrap(self.uplink)
        self.local = LocalTrainer(fabric, view, self.all_callbacks, self.keep_optimizer_state, self.gradient_clip_val,
                                  self.gradient_clip_algorithm, self.accumulate_grad_batches)
        self.evaluator = Evaluator(fabric, view, self.all_callbacks)
        proxy = weakref.proxy(view)  # what LightningModule.fabric holds (its setter stores a weak proxy)
        self.modules = WorkingModules({id(view): view, id(proxy): proxy, **{id(cb): cb for cb in self.all_callbacks}})
        self.work = ClientWork(
            strategy=self.strategy, codec=self.uplink, downlink_codec=self.downlink_codec, store=self.store,
            dataset=self.train_template.dataset, shards=self.shards, template=self.train_template, local=self.local,
            view=view, context=ctx, modules=self.modules, prepare=self._working_module, hook=self._fed_hook,
            chain=self._chain_hook, seed=self.seed, local_epochs=self.local_epochs, downlink_state={})
        self.round_runner = RankRunner(ranks) if ranks.distributed else self.runner
        sizes = [len(s) for s in self.shards]
        self.server = Server(self.strategy, self.uplink, self.senders, self.max_message_bytes, self.max_update_abs,
                             trusted_examples=sizes.__getitem__, max_norm_ratio=self.max_norm_ratio)
        # a callback that sees the replies before aggregation may drop or edit them: no fold to discard then
        self.server.fold = not any(_overrides(cb, "on_aggregate_start") for cb in self.all_callbacks) and not (
            self.clock is not None and self.clock.discards)
        if self.clock is not None:
            self.clock.bind(self.num_clients, self.clients_per_round, self.seed)  # a new run starts at time 0
            if self.schedule is not None:
                self.schedule.bind(self.clock, self.num_clients, self.seed)
            macs = MacCounter()
            self.workload = Workload(
                examples=sizes, batch_size=self.train_template.batch_size or 1,
                drop_last=bool(self.train_template.drop_last), accumulate_grad_batches=self.accumulate_grad_batches,
                local_epochs=self.local_epochs, macs_per_sample=lambda cid: self._macs(macs, cid))
        self.history: list[dict[str, float]] = []
        self._downlink_state: dict[str, Any] = {}
        self._final_eval: dict[str, float] = {}  # the latest validation and test metrics
        self._failed: list[tuple[int, list[str]]] = []  # the current streak of rounds that could not aggregate
        if self.personal_eval is not None:
            held_in_test = self.personal_eval.holdout == "test"
            source = self.test_loader if held_in_test else self.train_template
            self.personal_eval.bind(PersonalRun(
                strategy=self.strategy, model=model, prepare=self._working_module, load_state=self.store.load,
                train=ctx.train, shards=self.shards, data=source.dataset,
                collate=getattr(source, "collate_fn", None), holdouts=self.holdouts, seed=self.seed, run_dir=run_dir,
                write=ranks.is_zero))
        if self.calibration is not None:
            self.calibration.bind(CalibrationRun(shards=self.shards, data=self.train_template.dataset,
                                                 collate=getattr(self.train_template, "collate_fn", None)))

    # ------------------------------------------------------------------ one round
    def _round(self, r: int) -> dict[str, float]:
        t0 = time.perf_counter()
        ctx, model = self.context, self.model
        ctx.round, ctx.client_id, ctx.client_state = r, None, {}
        total = 0
        if self.schedule is not None:  # asynchronous: this version's dispatches, then its arrivals
            ex = self.schedule.exchange(r, self._dispatch)
            clients, instructions, messages, discard, sim, down = (
                ex.clients, ex.instructions, ex.messages, ex.discard, ex.sim, ex.down)
        else:
            clients = self.sample_clients(r)
            # without a clock, the clients run while the server reads their messages (one message at a time)
            plan, messages, absent = self._dispatch(r, clients, stream=self.clock is None)
            instructions, down, sim, discard = plan.instructions, plan.stats, {}, {}
            if self.clock is not None:
                order = {t.client_id: i for i, t in enumerate(plan.tasks)}
                messages = sorted(messages + absent, key=lambda m: order[m.client_id])
                discard, sim = self.clock.finish(r, messages)
            else:  # the fold's bet whatever the runner: the sampled clients' shard sizes (the trusted counts)
                total = sum(len(self.shards[t.client_id]) for t in plan.tasks)
        seed_rngs(derive_seed(self.seed, r, SERVER_STREAM))  # the server side's randomness: (seed, round) only
        # consumes the messages as it decodes them
        got = self.server.collect(r, instructions, messages, total_examples=total if total else None)
        if not isinstance(messages, list):  # the clients ran meanwhile and seeded the RNGs their own way
            seed_rngs(derive_seed(self.seed, r, SERVER_STREAM))
        if discard:  # decoded (each sender's codec state advanced), but late or over-selected: not aggregated
            got.replies = [rp for rp in got.replies if rp.client_id not in discard]
            for _, reason in sorted(discard.items()):
                log.info("round %d: %s", r + 1, reason)
                got.reasons.append(reason)
        replies = got.replies
        self._fed_hook("on_aggregate_start", replies)
        metrics: dict[str, float] = {"round": r + 1, "clients": len(clients), "good": len(replies), **sim}
        refused = None
        if len(replies) >= self.min_clients:
            try:
                metrics.update(self.server.aggregate(r, replies))
            except AggregationRefused as err:  # e.g. Krum with too few replies: nothing was changed
                refused = f"aggregation refused: {err}"
        if len(replies) >= self.min_clients and refused is None:
            metrics["skipped"] = 0
            self._failed.clear()
        else:
            log.warning("round %d skipped: %s", r + 1,
                        refused or f"{len(replies)} valid replies, min_clients={self.min_clients}")
            metrics["skipped"] = 1
            self._failed.append((r, [*got.reasons, *([refused] if refused else [])]))
            if len(self._failed) >= self.max_failed_rounds:
                raise RoundsFailed(self._failure_report(f"{len(self._failed)} consecutive rounds"))
        self.strategy.load_global(model)
        if replies:
            n = sum(rp.num_examples for rp in replies)
            for key in sorted({k for rp in replies for k in rp.metrics}):
                vals = [(rp.metrics[key], rp.num_examples) for rp in replies if key in rp.metrics]
                metrics[key] = sum(v * w for v, w in vals) / sum(w for _, w in vals)
            metrics["examples"] = n
        stats = {**got.stats, "bytes_down": down["bytes_down"], "raw_bytes_down": down["raw_bytes_down"]}
        stats["encode_s"] += down["encode_s"]
        metrics.update(stats)
        if stats["bytes_up"]:
            metrics["compression_ratio"] = stats["raw_bytes_up"] / stats["bytes_up"]
        if stats["bytes_down"]:
            metrics["compression_ratio_down"] = stats["raw_bytes_down"] / stats["bytes_down"]
        self._fed_hook("on_round_end", metrics)
        if ctx.take_model_changed():
            self.strategy.model_changed(model)
        stages = ctx.eval_stages(r)
        if self.calibration is not None and stages:
            self._calibrated, calibration_stats = self.calibration.calibrate(model, r)
            metrics.update(calibration_stats)
        for stage in stages:
            evaluated = self.evaluate_module(model, stage)
            evaluated.update(self.strategy.evaluate(lambda m, stage=stage: self.evaluate_module(m, stage)))
            if self.calibration is not None and self._calibrated is not None:
                with self.calibration.applied(model, self._calibrated):
                    evaluated.update({f"ccvr/{k}": v for k, v in self.evaluate_module(model, stage).items()})
            self._final_eval.update(evaluated)
            metrics.update(evaluated)
        if self.personal_eval is not None and ctx.is_eval_round(r):
            metrics.update(self.personal_eval.evaluate(r))
            self.ranks.barrier()  # no rank's next round writes a client's state while another still reads it
        round_stats = getattr(self.round_runner, "round_stats", None)  # a runner's own per-round numbers
        if callable(round_stats):
            metrics.update(round_stats())
        if isinstance(self.round_runner, RankRunner):
            ranks_stats = self.round_runner.round_stats()
            log.info("round %d: busy/waiting seconds per rank: %s", r + 1, ", ".join(
                f"{k}: {ranks_stats[f'rank{k}_busy_s']:.2f}/{ranks_stats[f'rank{k}_wait_s']:.2f}"
                for k in range(self.ranks.world_size)))
        metrics["seconds"] = time.perf_counter() - t0
        if self.clock is not None and self.ranks.is_zero:
            self.clock.write_csv(self.run_dir / "clock.csv")
        return metrics

    def _dispatch(self, r: int, clients: list[int], stream: bool = False
                  ) -> tuple[RoundPlan, list[ClientMessage] | Iterator[ClientMessage], list[ClientMessage]]:
        """Send ``clients`` their instructions for round ``r`` and run them: the plan, the replies of the clients
        that trained and the failure messages of those the clock kept from training (dropouts). With ``stream``
        (and no per-receiver downlink to acknowledge), the replies come as the runner's :meth:`~lightning_fed.
        runner.ClientRunner.stream`: each client runs when the server asks for its message."""
        plan = plan_round(r, clients, self.strategy, self.downlink_codec, self._downlink_state, self.uplink,
                          self.uplink_shares, lambda instructions: self._fed_hook("on_round_start", instructions),
                          self.receivers)
        self.modules.round_start([self.model, *self._prepared.values()])
        tasks, absent = plan.tasks, []
        if self.clock is not None:  # dropouts and stragglers' step caps, decided before anyone trains
            tasks, absent = self.clock.admit(r, plan.tasks, self.workload)
        if stream and self.receivers is None:
            return plan, self.round_runner.stream(tasks, self.work), absent
        messages = self.round_runner.run(tasks, self.work)
        if self.receivers is not None:
            acknowledge_downlink(self.receivers, messages)
        return plan, messages, absent

    def _macs(self, counter: MacCounter, client_id: int) -> float:
        """MACs of one sample's forward pass through the model ``client_id`` trains this round (its tier)."""
        module = self._working_module(self.strategy.client_module(client_id, self.model))
        with rng_untouched():  # the example input may come from a loader, which draws a seed
            return counter(module, model_inputs(OWNER, self.view, module, None, None))

    def _failure_report(self, what: str) -> str:
        """Why the run stops: the rounds that could not aggregate and each client's reason."""
        lines = [(f"{what} could not aggregate (fewer than min_clients={self.min_clients} valid replies, or the "
                  "aggregation rule refused them); the run stops.")]
        for r, reasons in self._failed:
            lines.append(f"round {r + 1}: " + ("; ".join(reasons) if reasons else "no client was sent an instruction"))
        return "\n".join(lines)

    def _working_module(self, module: L.LightningModule) -> L.LightningModule:
        """Put a strategy-provided module (another architecture) on the device and attach the view, once."""
        if module is self.model or id(module) in self._prepared:
            return module
        module = self.fabric.to_device(self.fabric.strategy.precision.convert_module(module))
        self._attach(module, self.view)
        self._prepared[id(module)] = module
        return module

    def _train_aside(self, module: L.LightningModule, data: Any, generator: torch.Generator, epochs: int | None,
                     max_steps: int | None, callbacks: Any) -> int:
        """``FedContext.train``: ``module`` trained on ``data`` (batches as the training loader's) by
        :func:`~lightning_fed.client.train_aside`."""
        loader = client_loader(self.train_template, data, generator)
        return train_aside(self.local, self._working_module(module), loader, epochs, max_steps, callbacks)

    def evaluate_module(self, module: L.LightningModule, stage: str = "val") -> dict[str, float]:
        """Evaluate any module (e.g. a tier's model) with the loop's evaluator: ``stage="val"`` on the validation
        loader (``val_*`` names), ``"test"`` on the test loader (``test_*``); ``{}`` when that loader is missing."""
        loader = {"val": self.val_loader, "test": self.test_loader}[stage]
        if loader is None:
            return {}
        module = self._working_module(module)
        self.view.lightning_module = module
        try:
            return self.evaluator.run(loader, stage)
        finally:
            self.view.lightning_module = self.model

    def _fed_hook(self, name: str, *args: Any) -> None:
        for cb in self.all_callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                fn(self.view, self.model, *args)

    def _chain_hook(self, name: str, value: Any) -> Any:
        """A federated hook whose result the next callback receives (``on_client_data``)."""
        for cb in self.all_callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                value = fn(self.view, self.model, value)
        return value

    # ------------------------------------------------------------------ processes
    def _close_ranks(self, ok: bool) -> None:
        senders_tmp = getattr(self, "_senders_tmp", None)
        if senders_tmp is not None:
            shutil.rmtree(senders_tmp, ignore_errors=True)
            self._senders_tmp = None
        self.ranks.close(ok)

    def _prepares(self, hooks: Any) -> bool:
        """Whether this process runs ``prepare_data`` of ``hooks`` (a module or data module): local rank 0 of each
        node, or global rank 0 when ``prepare_data_per_node`` is ``False``, as ``lightning.Trainer`` does."""
        if getattr(hooks, "prepare_data_per_node", True):
            return self.ranks.local_rank == 0
        return self.ranks.is_zero

    def _check_same_start(self, model: L.LightningModule) -> None:
        """Every rank must start from the same weights and random state (each replays the server)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(torch.get_rng_state().numpy().tobytes())
        h.update(repr(random.getstate()).encode())
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        digests = self.ranks.gather(h.digest())
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise RankFailed(
                f"ranks {differ} start from other initial weights or random state than rank 0: every process must "
                "build the same model from the same seed (call lightning.seed_everything(seed) before building "
                "the model; the CLI does)")

    def _check_shared_folder(self, run_dir: Path) -> None:
        """Every rank must see the run folder rank 0 made: the client store lives there."""
        ranks = self.ranks
        token = ranks.agree(f"{random.Random().getrandbits(64):016x}" if ranks.is_zero else None)
        marker = run_dir / ".ranks"
        if ranks.is_zero:
            marker.mkdir(exist_ok=True)
            (marker / "token").write_text(token)
        ranks.barrier()
        try:
            seen = (marker / "token").read_text() == token
        except OSError:
            seen = False
        blind = [r for r, ok in enumerate(ranks.gather(b"1" if seen else b"0")) if ok != b"1"]
        if blind:
            raise RankFailed(
                f"rank(s) {blind} cannot see the run folder {run_dir} that rank 0 created: the client store lives "
                "there, so output_dir must be on a file system every process sees (e.g. a shared network drive)")

    def _fabric(self) -> Fabric:
        """This process's one-device Fabric. Under ``fabric run`` (which sets ``LT_*`` variables for a Fabric of N
        devices) the loop's own settings must agree with the command line's; the variables are then hidden from
        the one-device Fabric each rank builds."""
        ours = {"devices": self.devices, "num_nodes": self.num_nodes, "accelerator": self.accelerator,
                "precision": self.precision}
        cli = {k: os.environ[f"LT_{k.upper()}"] for k in ours if f"LT_{k.upper()}" in os.environ}
        for k, v in cli.items():
            if k == "accelerator" and v == "auto":
                continue
            said = PRECISION_ALIASES.get(v, v) if k == "precision" else v  # `--precision=16`: 16-mixed
            need(OWNER, str(ours[k]) == said, k, ours[k], f"{v!r}, as `fabric run --{k}={v}` says")
        hidden = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("LT_")}
        try:
            return Fabric(accelerator=self._accelerator(), devices=self._fabric_devices(), precision=self.precision)
        finally:
            os.environ.update(hidden)

    def _accelerator(self) -> str:
        if self.accelerator == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.accelerator

    def _fabric_devices(self) -> Any:
        """This process's device for its one-device Fabric: ``1`` on CPU; on GPUs the local rank's share."""
        acc = self._accelerator()
        if not self.ranks.distributed or acc == "cpu":
            return 1
        if acc not in ("cuda", "gpu"):
            raise ValueError(f"{OWNER}: devices={self.devices} with accelerator={self.accelerator!r} is not "
                             "supported; use accelerator='cpu' or 'cuda'")
        index = self.ranks.local_rank // self.processes_per_device
        available = torch.cuda.device_count()
        need(OWNER, index < available, "devices", self.devices,
             f"at most {available * self.processes_per_device} processes per node with {available} GPU(s) and "
             f"processes_per_device={self.processes_per_device}")
        return [index]

    # ------------------------------------------------------------------ data and outputs
    def _setup_data(self, dm: L.LightningDataModule) -> list[list[Any]]:
        """Split the training set among the clients and find the validation and test loaders; return the partition
        table's rows. Writes nothing: an impossible split fails before the run folder is touched."""
        if self._prepares(dm):
            with rng_untouched():  # it runs on some processes only, and draws only when nothing is cached
                dm.prepare_data()
        self.ranks.barrier()  # what prepare_data writes is there before any rank reads it
        dm.setup("fit")
        self.datamodule = dm
        where = "FedLoop.fit" if isinstance(dm, LoadersModule) else f"{type(dm).__name__}.train_dataloader()"
        self.train_template = training_template(dm.train_dataloader(), where)
        dataset = self.train_template.dataset
        labels = self.partition.dataset_labels(dataset)  # None: labels unknown and the partition needs none
        self.shards = self.partition.split_dataset(dataset, labels, self.num_clients, self.seed)
        self.val_loader = _loader(dm, "val_dataloader")
        dm.setup("test")
        self.test_loader = _loader(dm, "test_dataloader")
        if self.personal_eval is not None:  # "shard" holds part of each shard out of training
            test_data = self.test_loader.dataset if isinstance(self.test_loader, DataLoader) else None
            self.shards, self.holdouts = self.personal_eval.split(self.shards, labels, test_data)
        self.uplink_shares = uplink_shares(self.uplink_allocation, [len(s) for s in self.shards])
        if self.val_loader is None:
            log.info("%s has no val_dataloader: no validation metrics (val_*); the test set is evaluated after the "
                     "last round only%s", type(dm).__name__, f" and every {self.test_every} rounds" if self.test_every else "")
        if self.test_loader is None:
            log.info("%s has no test_dataloader: no test metrics (test_*)", type(dm).__name__)
        return summary_rows(self.shards, labels)

    def _steps_per_epoch(self) -> list[int]:
        """Each client's optimizer steps in one local epoch: its shard's batches (the training loader's batch size
        and ``drop_last``) over ``accumulate_grad_batches``, rounded up (Lightning steps on an epoch's last batch)."""
        bs = self.train_template.batch_size or 1
        drop = bool(getattr(self.train_template, "drop_last", False))
        batches = [len(s) // bs if drop else -(-len(s) // bs) for s in self.shards]
        return [-(-b // self.accumulate_grad_batches) for b in batches]

    # ------------------------------------------------------------------ checkpoints
    def _resume_hint(self, last_round: int | None) -> str:
        """How to go on when a rank dies, given the round (0-based) of this run's last checkpoint, ``None`` when it
        has none yet: ``--resume last`` only when there is one (without one it would pick up an earlier run's)."""
        if last_round is not None:
            return (f"Continue it from its last checkpoint (after round {last_round + 1}) with `--resume last` "
                    "(FedLoop.fit(resume='last')), with any number of processes.")
        if not self.checkpoint_every:
            return "This run writes no checkpoints (checkpoint_every=0): start it again."
        return (f"No checkpoint has been written yet (one every {self.checkpoint_every} rounds): start the run "
                "again, not with `--resume last` (which would continue an earlier run's last checkpoint, if any).")

    def save_checkpoint(self, r: int) -> Path:
        """Atomically checkpoint the state after round ``r`` (0-based); rank 0 writes it, every rank waits for it.
        Returns the checkpoint folder (other ranks: the run's checkpoints folder)."""
        if not self.ranks.is_zero:
            self.ranks.barrier()  # no rank writes the client store while rank 0 snapshots it
            return self.run_dir / "checkpoints"
        state = {
            "round": r,
            "num_clients": self.num_clients,
            "seed": self.seed,
            "identity": self.identity,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "strategy": self.strategy.state_dict(),
            "codec": self.uplink.state_dict(),
            "server": self.server.state_dict(),
            "downlink_codec": self.downlink_codec.state_dict(),
            "downlink_state": self._downlink_state,
            "downlink_receiver_state": self.work.downlink_state,
            "failed_rounds": [[r, list(reasons)] for r, reasons in self._failed],
            "clock": self.clock.state_dict() if self.clock is not None else None,
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.all_callbacks},
            "history": self.history,
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
        }
        stores = {"clients": self.store, "senders": self.senders}
        if self.receivers is not None:
            stores["receivers"] = self.receivers
        path = save_checkpoint(self.run_dir, r, state, stores, self.keep_checkpoints)
        self.ranks.barrier()
        return path

    def _restore(self, ckpt_dir: Path, state: dict[str, Any]) -> int:
        """Load the checkpoint ``state`` (read from ``ckpt_dir`` by ``resolve_resume``); return the next round."""
        for cb in self.all_callbacks:  # callbacks first: they may rebuild the model's structure (pruning)
            if cb.state_key in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][cb.state_key])
        self.model.load_state_dict(state["model"])
        self.strategy.setup(self.model)
        self.strategy.load_state_dict(state["strategy"])
        self.uplink.load_state_dict(state["codec"])
        if "server" in state:  # the norm check's reference (checkpoints from before it: judged as a first round)
            self.server.load_state_dict(state["server"])
        self.downlink_codec.load_state_dict(state["downlink_codec"])
        self._downlink_state = state["downlink_state"]
        self.work.downlink_state = state["downlink_receiver_state"]
        self._failed = [(int(r), list(reasons)) for r, reasons in state["failed_rounds"]]
        if self.clock is not None and state.get("clock") is not None:
            self.clock.load_state_dict(state["clock"])
        if self.schedule is not None and state.get("schedule") is not None:
            self.schedule.load_state_dict(state["schedule"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate((3, tuple(state["rng"]["python"]), None))
        if self.ranks.is_zero:
            self.store.restore(ckpt_dir / "clients")
        self.senders.restore(ckpt_dir / "senders")
        if self.receivers is not None:
            self.receivers.restore(ckpt_dir / "receivers")
        self.ranks.barrier()  # the client store is back before any rank reads it
        log.info("resumed from %s after round %d", ckpt_dir, state["round"] + 1)
        return state["round"] + 1

    # ------------------------------------------------------------------ module attachment
    @staticmethod
    def _attach(model: L.LightningModule, view: TrainerView) -> None:
        """Route ``self.log``, ``self.trainer`` and ``self.optimizers()`` of the module (and of the LightningModules
        inside it) to the view, through Lightning's public setters."""
        model.trainer = view  # type: ignore[assignment]
        model.fabric = view  # type: ignore[assignment]

    @staticmethod
    def _detach(model: L.LightningModule) -> None:
        model.trainer = None
        model.fabric = None
        for m in model.modules():
            if isinstance(m, L.LightningModule):
                m._fabric_optimizers = []  # no public setter: what ``optimizers()`` returns under Fabric


def _overrides(callback: Any, hook: str) -> bool:
    """Whether ``callback`` has its own ``hook`` (not :class:`FedCallback`'s no-op, nor none at all)."""
    fn = getattr(type(callback), hook, None)
    return fn is not None and fn is not getattr(FedCallback, hook)


def _loader(dm: L.LightningDataModule, name: str) -> Any:
    """``dm.<name>()``, or ``None`` when the data module does not provide it (Lightning's base hooks raise
    ``MisconfigurationException``; an empty list or ``None`` also means no loader, as for ``lightning.Trainer``)."""
    try:
        loader = getattr(dm, name)()
    except MisconfigurationException:
        return None
    if loader is None or (isinstance(loader, (list, tuple)) and len(loader) == 0):
        return None
    if isinstance(loader, (list, tuple, dict)):
        if len(loader) > 1:
            raise ValueError(f"{type(dm).__name__}.{name}() returned {len(loader)} loaders; FedLoop evaluates one "
                             "(a dataloader_idx is not passed): concatenate their datasets (torch.utils.data."
                             "ConcatDataset) into one loader, or give the others to a callback")
        return next(iter(loader.values() if isinstance(loader, dict) else loader))
    return loader


__all__ = ["FED_HOOKS", "UPLINK_ALLOCATIONS", "FedLoop", "FitResult", "uplink_shares"]
