"""Small pieces shared by the compression callbacks: where they run (``lightning.Trainer`` or FedLoop), schedule
parsing, example inputs, optimizer rebuilds and per-client state that goes stale when the model changes."""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from lightning_fed.context import fed_context

log = logging.getLogger("lightning_fed")


def torch_pruning() -> ModuleType:
    """The ``torch_pruning`` module, imported on first use (pruning, replaying a pruning history, counting MACs):
    ``import lightning_fed`` loads no optional heavy dependency that the run does not use."""
    return importlib.import_module("torch_pruning")


def in_fedloop(trainer: Any) -> bool:
    """Whether ``trainer`` carries FedLoop's context ``trainer.fed`` (``False`` under ``lightning.Trainer``)."""
    return fed_context(trainer) is not None


def on_server(trainer: Any) -> bool:
    """Inside FedLoop and not in a client's local work."""
    ctx = fed_context(trainer)
    return ctx is not None and ctx.on_server


def parse_schedule(owner: str, key: str, at: int | list[int]) -> list[int]:
    """Normalise an ``at`` argument (one int or a list of ints) into a sorted list of distinct ints >= 0.

    Raises:
        ValueError: empty, negative, non-integer or repeated entries.
    """
    steps = [at] if isinstance(at, int) and not isinstance(at, bool) else list(at)
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps) or len(set(steps)) != len(steps):
        raise ValueError(
            f"{owner}: {key}={at!r} is not allowed; {key} must be an int >= 0 or a non-empty list of distinct ints >= 0 "
            "(0-based epochs under lightning.Trainer, 0-based rounds in FedLoop)"
        )
    return sorted(steps)


BatchToInputs = Callable[[Any], "tuple[tuple[Any, ...], dict[str, Any]] | None"]
ForwardFn = Callable[..., Any]


@dataclass
class ModelInputs:
    """The positional and keyword arguments one forward of a model takes (``module(*args, **kwargs)``).

    Built from the module's ``example_input_array`` (:meth:`from_example`), or from a batch by a
    ``batch_to_inputs`` hook (:func:`inputs_from_batch`)."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_example(cls, ex: Any) -> ModelInputs:
        """Lightning's convention for ``example_input_array``: a tensor is the one positional argument, a tuple
        (or list) the positional arguments, a dict the keyword arguments."""
        if isinstance(ex, dict):
            return cls((), dict(ex))
        if isinstance(ex, (tuple, list)):
            return cls(tuple(ex), {})
        return cls((ex,), {})

    def tensors(self) -> list[Tensor]:
        """Every tensor argument."""
        return [v for v in (*self.args, *self.kwargs.values()) if isinstance(v, Tensor)]

    def map(self, fn: Callable[[Tensor], Tensor]) -> ModelInputs:
        """Apply ``fn`` to every tensor argument (others are kept)."""
        f = (lambda v: fn(v) if isinstance(v, Tensor) else v)
        return ModelInputs(tuple(f(a) for a in self.args), {k: f(v) for k, v in self.kwargs.items()})

    def to(self, device: torch.device | str) -> ModelInputs:
        """Every tensor argument on ``device``."""
        return self.map(lambda t: t.to(device))

    def rows(self, n: int) -> ModelInputs:
        """The first ``n`` rows (batch entries) of every tensor argument with a batch dimension, detached."""
        return self.map(lambda t: t[:n].detach().clone() if t.ndim >= 1 else t.detach().clone())

    def repeat_first(self, batch_size: int) -> ModelInputs:
        """A batch of ``batch_size`` copies of the first row of every batched tensor argument."""
        return self.map(lambda t: t[:1].expand(batch_size, *t.shape[1:]).contiguous() if t.ndim >= 1 else t)

    @property
    def single(self) -> Tensor | None:
        """The tensor when the inputs are exactly one positional tensor, else ``None``."""
        if len(self.args) == 1 and not self.kwargs and isinstance(self.args[0], Tensor):
            return self.args[0]
        return None

    def for_tracing(self) -> Any:
        """What torch-pruning's ``example_inputs`` takes: the tensor, the tuple of positional arguments or the
        dict of keyword arguments (both at once cannot be given: use :func:`tracing_forward_fn`)."""
        if self.single is not None:
            return self.single
        if self.kwargs and not self.args:
            return dict(self.kwargs)
        return tuple(self.args)


def as_inputs(x: Tensor | ModelInputs) -> ModelInputs:
    """A tensor as the one positional argument; :class:`ModelInputs` unchanged."""
    return x if isinstance(x, ModelInputs) else ModelInputs((x,), {})


def has_forward(module: nn.Module) -> bool:
    """Whether ``module`` defines ``forward`` (a module without one, or a LightningModule that inherits
    Lightning's, raises ``NotImplementedError`` when called)."""
    forward = type(module).forward
    return getattr(forward, "__name__", "") != "_forward_unimplemented" and forward is not L.LightningModule.forward


def no_forward_message(owner: str, module: nn.Module) -> str:
    """The sentence a callback raises for a module without ``forward`` and without ``forward_fn``."""
    name = type(module).__name__
    return (f"{owner}: {name} has no forward(), so {owner} cannot run it; give {owner}(forward_fn=...), a function "
            f"forward_fn(module, *args, **kwargs) -> Tensor that runs {name} on the inputs (e.g. its step loop), "
            "used instead of module(...)")


def call_model(module: nn.Module, inputs: Tensor | ModelInputs, forward_fn: ForwardFn | None = None,
               owner: str = "callback") -> Any:
    """``forward_fn(module, *args, **kwargs)`` when given, else ``module(*args, **kwargs)``.

    Raises:
        ValueError: ``module`` has no ``forward`` and no ``forward_fn`` is given.
    """
    inp = as_inputs(inputs)
    if forward_fn is not None:
        return forward_fn(module, *inp.args, **inp.kwargs)
    if not has_forward(module):
        raise ValueError(no_forward_message(owner, module))
    return module(*inp.args, **inp.kwargs)


class Bound(nn.Module):
    """``module`` behind a ``forward`` that calls ``forward_fn(module, *args, **kwargs)``: lets tools that call
    ``model(...)`` (MAC counting, latency timing) measure a model without a usable ``forward``."""

    def __init__(self, module: nn.Module, forward_fn: ForwardFn) -> None:
        super().__init__()
        self.module = module
        self.forward_fn = forward_fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``forward_fn(module, *args, **kwargs)``."""
        return self.forward_fn(self.module, *args, **kwargs)


def tracing_forward_fn(inputs: ModelInputs, forward_fn: ForwardFn | None) -> Callable[[nn.Module, Any], Any] | None:
    """torch-pruning's ``forward_fn(model, example_inputs)`` for these inputs: ``None`` (torch-pruning's own
    call) when :meth:`ModelInputs.for_tracing` suffices and no ``forward_fn`` is given."""
    if forward_fn is None and not (inputs.args and inputs.kwargs):
        return None
    return lambda model, _ex: call_model(model, inputs, forward_fn)


def default_batch_to_inputs(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The default ``batch_to_inputs``: ``((x,), {})`` for ``(x, y, ...)`` tuples/lists and ``((batch,), {})`` for
    a tensor batch; ``None`` for anything else (a dict batch does not say which keys are inputs)."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(x, Tensor):
        return (x,), {}
    return None


def batch_to_inputs_hook(pl_module: Any, override: BatchToInputs | None = None) -> BatchToInputs:
    """The ``batch_to_inputs`` in force: the callback's argument, else the module's ``batch_to_inputs`` method,
    else :func:`default_batch_to_inputs`."""
    if override is not None:
        return override
    method = getattr(pl_module, "batch_to_inputs", None)
    return method if callable(method) else default_batch_to_inputs


def inputs_from_batch(batch: Any, pl_module: Any = None, override: BatchToInputs | None = None) -> ModelInputs | None:
    """The model inputs of a batch through :func:`batch_to_inputs_hook` (all rows, not detached), or ``None``."""
    out = batch_to_inputs_hook(pl_module, override)(batch)
    if out is None:
        return None
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], (tuple, list)) and isinstance(out[1], dict)):
        raise ValueError(f"batch_to_inputs must return (args, kwargs), a tuple and a dict; it returned {type(out).__name__}")
    return ModelInputs(tuple(out[0]), dict(out[1]))


def example_from_batch(batch: Any, pl_module: Any = None, override: BatchToInputs | None = None) -> Any:
    """A small tracing example from a batch: the first two rows of its model inputs, detached. With the default
    hook and a single tensor input this is that tensor (``x`` of ``(x, y)`` or the batch itself), else a
    :class:`ModelInputs`; ``None`` when the batch gives no inputs."""
    inp = inputs_from_batch(batch, pl_module, override)
    if inp is None or not inp.tensors() or any(t.ndim >= 1 and t.shape[0] < 1 for t in inp.tensors()):
        return None
    inp = inp.rows(2)
    return inp.single if inp.single is not None else inp


def example_from_dataset(data: Any, pl_module: Any = None, override: BatchToInputs | None = None) -> Any:
    """The model inputs of the first two records of a dataset, collated into a batch (see
    :func:`example_from_batch`); ``None`` for an empty dataset or records that give no tensor inputs."""
    records = [data[i] for i in range(min(2, len(data)))]
    if not records:
        return None
    try:
        batch = default_collate(records)
    except (TypeError, RuntimeError):
        return None
    return example_from_batch(batch, pl_module, override)


def model_inputs(owner: str, trainer: Any, pl_module: nn.Module, shape: list[int] | None, seen: Any,
                 override: BatchToInputs | None = None) -> ModelInputs:
    """Example inputs for tracing, counting and checking: ``zeros(shape)``, the module's ``example_input_array``
    (tensor, tuple or dict), a seen batch's inputs, or (in FedLoop) the inputs of the first two records of the
    active client's shard (``trainer.fed.shard``) or, on the server, of the first held-out batch
    (``trainer.fed.eval_data``), in that order. Batches become inputs through ``batch_to_inputs`` (``override``,
    else the module's method, else :func:`default_batch_to_inputs`).

    Raises:
        ValueError: none of these is available; the message names ``owner`` and what to provide.
    """
    device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
    if shape is not None:
        return ModelInputs((torch.zeros(*shape, device=device),), {})
    ex = getattr(pl_module, "example_input_array", None)
    if ex is not None:
        return ModelInputs.from_example(ex).to(device)
    if seen is not None:
        return as_inputs(seen).to(device)
    ctx = fed_context(trainer)
    if ctx is not None:
        if ctx.shard is not None and len(ctx.shard):
            seen = example_from_dataset(ctx.shard, pl_module, override)
        elif ctx.eval_data is not None:
            seen = example_from_batch(next(iter(ctx.eval_data)), pl_module, override)
        if seen is not None:
            return as_inputs(seen).to(device)
    raise ValueError(
        f"{owner}: no example input to run {type(pl_module).__name__} with; set the module's example_input_array "
        "(a tensor, a tuple of positional inputs or a dict of keyword inputs), or give batch_to_inputs="
        "(a function batch -> (args, kwargs); also a module method) when batches are not (x, y, ...) tuples or "
        "tensors" + (", or example_input_shape=[batch, ...]" if owner in ("StructuredPruning", "Footprint") else "")
    )


def example_input(owner: str, trainer: Any, pl_module: nn.Module, shape: list[int] | None, seen: Tensor | None) -> Tensor:
    """:func:`model_inputs` for single-tensor models (the one positional tensor).

    Raises:
        ValueError: no example, or the model takes more than one input (use :func:`model_inputs`).
    """
    inp = model_inputs(owner, trainer, pl_module, shape, seen)
    if inp.single is None:
        raise ValueError(f"{owner}: the model takes several inputs; use model_inputs()")
    return inp.single


def warn_once(owner: Any, key: str, message: str, *args: Any) -> None:
    """Log ``message`` as a warning the first time ``owner`` (a callback) reports ``key``."""
    seen = owner.__dict__.setdefault("_warned_keys", set())
    if key not in seen:
        seen.add(key)
        log.warning(message, *args)


def rebuild_optimizers(trainer: Any) -> None:
    """After parameters were replaced (structured pruning), rebuild ``lightning.Trainer``'s optimizers and LR
    schedulers from ``configure_optimizers`` so that they hold the new parameters (their state starts afresh).
    Inside FedLoop nothing is needed: every client builds its optimizer when its local work starts."""
    if in_fedloop(trainer):
        return
    trainer.strategy.setup_optimizers(trainer)


def reset_stale_client_state(trainer: Any, version_key: str, version: int, keys: list[str]) -> list[str]:
    """Drop per-client entries (optimizer state, codec residuals…) made for an older model structure or mask.

    A client that was not sampled in the round the model changed still holds state shaped for the old model;
    this compares the version stored in ``trainer.client_state`` with the current one and removes ``keys`` if
    they differ. Returns the keys removed.
    """
    state = trainer.client_state
    removed = []
    if int(state.get(version_key, 0)) != version:
        removed = [k for k in keys if state.pop(k, None) is not None]
        if removed:
            log.info("client %s: %s changed (version %d): reset %s", trainer.client_id, version_key, version, removed)
    state[version_key] = version
    return removed


@contextmanager
def detached(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily detach every LightningModule inside ``model`` from its trainer (so it can be deep-copied)."""
    saved = []
    for m in model.modules():
        if isinstance(m, L.LightningModule):
            saved.append((m, m._trainer, getattr(m, "_fabric", None), list(getattr(m, "_fabric_optimizers", []))))
            m._trainer, m._fabric, m._fabric_optimizers = None, None, []
    try:
        yield model
    finally:
        for m, trainer, fabric, opts in saved:
            m._trainer, m._fabric, m._fabric_optimizers = trainer, fabric, opts


def cpu_copy(model: nn.Module) -> nn.Module:
    """A detached deep copy of ``model`` on the CPU in eval mode (for measurements and exports)."""
    with detached(model):
        out = copy.deepcopy(model)
    return out.cpu().eval()
