"""Model footprint: parameters, MACs (torch-pruning's counter), serialized bytes (safetensors) and measured CPU
inference latency (median of repeated runs), before and after training with compression callbacks."""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import lightning as L
import safetensors.torch
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_fed.callbacks._compress import (
    BatchToInputs,
    Bound,
    ForwardFn,
    ModelInputs,
    as_inputs,
    cpu_copy,
    example_from_batch,
    has_forward,
    in_fedloop,
    model_inputs,
    no_forward_message,
    on_server,
    torch_pruning,
)
from lightning_fed.callbacks.base import FedCallback
from lightning_fed.callbacks.quantize import FAKE_QUANT, _FakeQuant
from lightning_fed.context import fed_context

log = logging.getLogger("lightning_fed")


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of ``model.state_dict()`` serialized with safetensors (tensors made contiguous)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if isinstance(v, Tensor)}
    return len(safetensors.torch.save(sd))


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, example: Tensor | ModelInputs, *, repeats: int = 30, warmup: int = 5,
                   threads: int = 1) -> float:
    """Median wall time (ms) of ``model(example)`` on the CPU over ``repeats`` runs after ``warmup`` runs
    (``model(*args, **kwargs)`` for :class:`~lightning_fed.callbacks._compress.ModelInputs`).

    ``threads`` intra-op threads are used while timing (1 by default: an edge-like single core, and the only
    setting that gives stable numbers on a shared machine, where idle-spinning thread pools wait for
    descheduled threads)."""
    model = model.cpu().eval()
    inp = as_inputs(example).to("cpu")
    args, kwargs = inp.args, inp.kwargs
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            model(*args, **kwargs)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(*args, **kwargs)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(saved)
    return 1000.0 * statistics.median(times)


def float_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` with fake-quantized layers turned back into plain float layers."""
    m = cpu_copy(model)
    for sub in m.modules():
        if isinstance(sub, _FakeQuant):
            sub.__class__ = next(base for base in type(sub).__mro__ if base in FAKE_QUANT)
    return m


def measure_footprint(
    model: nn.Module, example: Tensor | ModelInputs, *, repeats: int = 30, batch_size: int = 1, threads: int = 1,
    forward_fn: ForwardFn | None = None,
) -> dict[str, float]:
    """Parameters, MACs, serialized bytes and median CPU latency of ``model`` on a batch of ``example`` rows
    (fake-quantized layers are measured as the float layers they train). ``example`` is one input tensor or a
    :class:`~lightning_fed.callbacks._compress.ModelInputs`; ``forward_fn(model, *args, **kwargs)`` replaces
    ``model(...)`` (models without ``forward``).

    Example::

        stats = measure_footprint(MNIST1DCNN(), torch.zeros(1, 40))
        stats["macs"], stats["latency_ms"]
    """
    _, run, inp, size = _size(model, example, forward_fn)
    batch = inp.repeat_first(batch_size)
    return {**size, "latency_ms": cpu_latency_ms(run, batch, repeats=repeats, threads=threads)}


def measure_size(model: nn.Module, example: Tensor | ModelInputs, *,
                 forward_fn: ForwardFn | None = None) -> dict[str, float]:
    """The deterministic part of :func:`measure_footprint`: parameters, MACs per sample (torch-pruning's counter
    on one row of ``example``) and serialized bytes, without the latency timing.

    Example::

        measure_size(MNIST1DCNN(channels=8), torch.zeros(1, 40))  # {"params": ..., "macs": ..., "bytes": ...}
    """
    return _size(model, example, forward_fn)[3]


def _size(model: nn.Module, example: Tensor | ModelInputs,
          forward_fn: ForwardFn | None) -> tuple[nn.Module, nn.Module, ModelInputs, dict[str, float]]:
    m = float_copy(model)
    inp = as_inputs(example).to("cpu").rows(1)
    if forward_fn is None and not has_forward(m):
        raise ValueError(no_forward_message("Footprint", m))
    run = Bound(m, forward_fn) if forward_fn is not None else m
    if inp.args and inp.kwargs:  # positional and keyword inputs: bind the keywords (the counter passes one kind)
        kw, call = inp.kwargs, (forward_fn or (lambda mod, *a, **k: mod(*a, **k)))
        run, inp = Bound(m, lambda mod, *a: call(mod, *a, **kw)), ModelInputs(inp.args, {})
    macs, params = torch_pruning().utils.count_ops_and_params(run, inp.for_tracing())
    return m, run, inp, {"params": float(params), "macs": float(macs), "bytes": float(serialized_bytes(m))}


def measure_exported(exported: nn.Module, reference: dict[str, float], example: Tensor | ModelInputs, *,
                     repeats: int = 30, batch_size: int = 1, threads: int = 1,
                     forward_fn: ForwardFn | None = None) -> dict[str, float]:
    """Bytes and latency of an exported (integer) model; parameters and MACs are the float model's
    (``reference``): the same operations, which the MAC counter does not see in integer layers."""
    batch = as_inputs(example).to("cpu").rows(1).repeat_first(batch_size)
    run = Bound(exported, forward_fn) if forward_fn is not None else exported
    return {"params": reference["params"], "macs": reference["macs"], "bytes": float(serialized_bytes(exported)),
            "latency_ms": cpu_latency_ms(run, batch, repeats=repeats, threads=threads)}


@torch.no_grad()
def classification_accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``model(x)`` over ``(x, y)`` batches (CPU)."""
    model = model.cpu().eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x.cpu()).argmax(-1) == y.cpu()).sum())
        total += len(y)
    return correct / max(total, 1)


def eval_loader(trainer: Any) -> DataLoader | None:
    """The held-out loader for end-of-fit reports: FedLoop's test data (``trainer.fed.test_data``, else its
    validation data), or the Trainer's datamodule test (else val) loader."""
    ctx = fed_context(trainer)
    if ctx is not None:
        return ctx.test_data if ctx.test_data is not None else ctx.eval_data
    dm = getattr(trainer, "datamodule", None)
    for name in ("test_dataloader", "val_dataloader"):
        try:
            if dm is not None:
                dm.setup("test")
                return getattr(dm, name)()
        except MisconfigurationException as err:  # what Lightning raises when a loader is not implemented
            log.debug("no %s: %s", name, err)
    loaders = getattr(trainer, "val_dataloaders", None)
    return loaders if isinstance(loaders, DataLoader) else None


def held_out_metrics(trainer: Any, model: nn.Module) -> dict[str, float]:
    """End-of-fit metrics of ``model`` (e.g. an exported copy) on the held-out data, named as the final test's.

    Under FedLoop on the CPU: the loop's evaluator at the test stage (``trainer.fed.evaluate(model, "test")``):
    what the module's own ``test_step`` (else ``validation_step``) logs, as ``test_*`` names, plus ``test_acc`` /
    ``test_loss`` for classifiers. Otherwise (``lightning.Trainer``, or an accelerator an exported integer model
    need not run on, or a model that is not a LightningModule): the classification accuracy of ``model(x)`` on
    :func:`eval_loader` as ``test_acc``. ``{}`` without held-out data."""
    ctx = fed_context(trainer)
    if ctx is not None and ctx.test_data is not None and isinstance(model, L.LightningModule) \
            and getattr(trainer, "device", torch.device("cpu")).type == "cpu":
        return ctx.evaluate(model, "test")
    loader = eval_loader(trainer)
    return {} if loader is None else {"test_acc": classification_accuracy(model, loader)}


def log_metrics(trainer: Any, metrics: dict[str, float]) -> None:
    """Send one-off scalars to the trainer's loggers (Lightning or Fabric loggers)."""
    step = trainer.current_round + 1 if in_fedloop(trainer) else trainer.global_step
    for lg in list(getattr(trainer, "loggers", []) or []):
        lg.log_metrics(metrics, step=step)


def footprint_table(columns: dict[str, dict[str, float]], title: str = "Model footprint") -> Table:
    """A rich table with one row per measure and one column per stage (``before``, ``after``…)."""
    table = Table(title=title)
    table.add_column("measure")
    for name in columns:
        table.add_column(name, justify="right")
    first = next(iter(columns.values()), {})
    if len(columns) >= 2:
        table.add_column("before / last", justify="right")
    fmt = {"params": "{:,.0f}", "macs": "{:,.0f}", "bytes": "{:,.0f}", "latency_ms": "{:.3f}"}
    for key in ("params", "macs", "bytes", "latency_ms"):
        cells = [fmt[key].format(c[key]) if key in c else "-" for c in columns.values()]
        last = list(columns.values())[-1]
        if len(columns) >= 2:
            cells.append(f"{first[key] / last[key]:.2f}x" if key in first and last.get(key) else "-")
        table.add_row(key, *cells)
    return table


class Footprint(FedCallback):
    """Measure the model before and after training (and the QAT export, when there is one) and report it.

    The report is a rich table on the console, an INFO log line and ``footprint/<stage>_<measure>`` scalars in
    the loggers; :attr:`results` keeps the numbers (``{"before": {...}, "after": {...}, "exported": {...}}``).

    Example::

        trainer = L.Trainer(callbacks=[StructuredPruning(ratio=0.5, at=[3]), Footprint()])
        trainer.fit(model, dm)
        footprint.results["after"]["macs"]

    Args:
        repeats: timed forward passes (the median is reported).
        batch_size: batch size of the latency measurement.
        threads: CPU threads while timing (1 gives stable numbers on shared machines).
        example_input_shape: shape of one input (e.g. ``[1, 40]``); ``None`` = the module's
            ``example_input_array`` (tensor, tuple of positional inputs or dict of keyword inputs) or the first
            training batch's inputs.
        batch_to_inputs: ``batch_to_inputs(batch) -> (args, kwargs)``; ``None`` = the module's method of that name
            or ``(x,)`` of ``(x, y, ...)`` batches. See docs/models.md.
        forward_fn: ``forward_fn(module, *args, **kwargs) -> Tensor`` measured instead of ``module(...)`` (models
            without ``forward``, e.g. a recurrent cell loop).
    """

    def __init__(
        self, *, repeats: int = 30, batch_size: int = 1, threads: int = 1, example_input_shape: list[int] | None = None,
        batch_to_inputs: BatchToInputs | None = None, forward_fn: ForwardFn | None = None,
    ) -> None:
        if repeats < 1:
            raise ValueError(f"Footprint: repeats={repeats!r} is not allowed; repeats must be >= 1")
        if batch_size < 1:
            raise ValueError(f"Footprint: batch_size={batch_size!r} is not allowed; batch_size must be >= 1")
        if example_input_shape is not None and (not example_input_shape or any(d < 1 for d in example_input_shape)):
            raise ValueError(f"Footprint: example_input_shape={example_input_shape!r} is not allowed; "
                             "it must be None or a list of sizes >= 1")
        if threads < 1:
            raise ValueError(f"Footprint: threads={threads!r} is not allowed; threads must be >= 1")
        self.repeats = repeats
        self.threads = threads
        self.batch_size = batch_size
        self.example_input_shape = example_input_shape
        self.batch_to_inputs = batch_to_inputs
        self.forward_fn = forward_fn
        self.results: dict[str, dict[str, float]] = {}
        self._seen: Tensor | ModelInputs | None = None

    def _inputs(self, trainer: Any, pl_module: nn.Module) -> ModelInputs:
        return model_inputs("Footprint", trainer, pl_module, self.example_input_shape, self._seen, self.batch_to_inputs)

    def _measure(self, trainer: Any, pl_module: nn.Module) -> dict[str, float]:
        return measure_footprint(pl_module, self._inputs(trainer, pl_module), repeats=self.repeats,
                                 batch_size=self.batch_size, threads=self.threads, forward_fn=self.forward_fn)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse a module without ``forward`` unless ``forward_fn`` is given."""
        if self.forward_fn is None and not has_forward(pl_module):
            raise ValueError(no_forward_message("Footprint", pl_module))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """FedLoop: measure the initial model (on an example from the held-out data, ``trainer.fed.eval_data``)."""
        if in_fedloop(trainer) and "before" not in self.results:
            self.results["before"] = self._measure(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """``lightning.Trainer``: measure the model as it starts training (first batch)."""
        if self._seen is None:
            self._seen = example_from_batch(batch, pl_module, self.batch_to_inputs)
        if "before" not in self.results and not in_fedloop(trainer):
            self.results["before"] = self._measure(trainer, pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Measure the trained model (and the QAT export) and report."""
        if in_fedloop(trainer) and not on_server(trainer):
            return
        self.results["after"] = self._measure(trainer, pl_module)
        for cb in trainer.callbacks:
            export = getattr(cb, "export_model", None)
            if callable(export) and getattr(cb, "export", False):
                self.results["exported"] = measure_exported(
                    export(trainer, pl_module), self.results["after"], self._inputs(trainer, pl_module),
                    repeats=self.repeats, batch_size=self.batch_size, threads=self.threads, forward_fn=self.forward_fn)
        table = footprint_table(self.results)
        ctx = fed_context(trainer)
        console = ctx.console if ctx is not None else Console(stderr=True)
        console.print(table)
        log.info("footprint: %s", self.results)
        log_metrics(trainer, {f"footprint/{stage}_{k}": v for stage, s in self.results.items() for k, v in s.items()})

    def state_dict(self) -> dict[str, Any]:
        """The measurements so far (a resumed run keeps its ``before``)."""
        return {"results": self.results}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.results = {k: dict(v) for k, v in state.get("results", {}).items()}


__all__ = [
    "Footprint",
    "classification_accuracy",
    "cpu_latency_ms",
    "float_copy",
    "held_out_metrics",
    "measure_exported",
    "measure_footprint",
    "measure_size",
    "serialized_bytes",
]
