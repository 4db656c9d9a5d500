"""Structured (channel) pruning on torch-pruning's ``DependencyGraph``, under ``lightning.Trainer`` and FedLoop.

Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023: coupled layers (a convolution's output
channels and the next layer's input channels) are grouped by a dependency graph and removed together, so
the pruned network is a smaller dense network (fewer MACs, faster on any hardware).

The pruning *history* (which channels of which layer were removed, in order) is the state: it is a list of
``[layer_name, is_output_channels, [indices]]`` (plain Python, so checkpoints load with
``weights_only=True``), and replaying it on a freshly built model (:func:`replay_pruning`) rebuilds the
pruned structure before the weights are loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_fed.callbacks._compress import (
    BatchToInputs,
    ForwardFn,
    ModelInputs,
    as_inputs,
    example_from_batch,
    has_forward,
    in_fedloop,
    model_inputs,
    no_forward_message,
    on_server,
    parse_schedule,
    rebuild_optimizers,
    reset_stale_client_state,
    torch_pruning,
    tracing_forward_fn,
    warn_once,
)
from lightning_fed.callbacks.base import FedCallback
from lightning_fed.context import fed_context
from lightning_fed.protocol import Instruction, Reply
from lightning_fed.validation import need

if TYPE_CHECKING:
    import torch_pruning as tp

log = logging.getLogger("lightning_fed")

IMPORTANCES = ("magnitude", "l1", "taylor", "lamp", "fpgm", "random")
History = list[list[Any]]


def make_importance(name: str) -> tp.importance.Importance:
    """torch-pruning's importance criterion called ``name`` (one of :data:`IMPORTANCES`)."""
    importance = torch_pruning().importance
    if name == "magnitude":
        return importance.GroupMagnitudeImportance(p=2)
    if name == "l1":
        return importance.GroupMagnitudeImportance(p=1)
    if name == "taylor":
        return importance.GroupTaylorImportance()
    if name == "lamp":
        return importance.LAMPImportance(p=2)
    if name == "fpgm":
        return importance.FPGMImportance(p=2)
    if name == "random":
        return importance.RandomImportance()
    raise ValueError(f"unknown importance {name!r}; allowed: {IMPORTANCES}")


def replay_pruning(model: nn.Module, history: History, example_inputs: Tensor | ModelInputs,
                   forward_fn: ForwardFn | None = None) -> None:
    """Re-apply a pruning history to ``model`` in place (e.g. a fresh model before ``load_state_dict``).

    ``example_inputs`` is one input tensor or a :class:`~lightning_fed.callbacks._compress.ModelInputs` (several
    positional / keyword inputs); ``forward_fn(model, *args, **kwargs)`` replaces ``model(...)`` in the trace.

    Example::

        model = MNIST1DCNN()
        replay_pruning(model, ckpt["callbacks"]["StructuredPruning"]["history"], torch.zeros(1, 40))
        model.load_state_dict(ckpt["state_dict"])
    """
    if not history:
        return
    with torch.enable_grad(), kept_modes(model):  # the dependency graph is traced through autograd
        inp = as_inputs(example_inputs)
        dg = torch_pruning().DependencyGraph().build_dependency(
            model, example_inputs=inp.for_tracing(), forward_fn=tracing_forward_fn(inp, forward_fn), verbose=False)
        dg.load_pruning_history([[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in history])


@contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval mode afterwards (tracing switches the model to eval)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _resolve(model: nn.Module, names: list[str], what: str) -> list[nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"StructuredPruning: {what} {missing} are not modules of {type(model).__name__}; "
                         f"modules are {[n for n in modules if n][:20]}")
    return [modules[n] for n in names]


def _width(m: nn.Module) -> int | None:
    """Output channels of a prunable layer (convolution or linear), else ``None``."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    return None


class StructuredPruning(FedCallback):
    """Iterative structured pruning of channels; works under ``lightning.Trainer`` and inside ``FedLoop``.

    Under ``lightning.Trainer`` a pruning step runs at the end of each epoch listed in ``at`` and the
    optimizers are rebuilt from ``configure_optimizers`` (the new, smaller parameters; fresh optimizer state).
    Inside ``FedLoop`` the *server* prunes the global model at the end of each round in ``at`` (importance from
    the aggregated model, or Taylor scores aggregated from the round's clients), tells the loop the model
    changed, and broadcasts the pruning history in every instruction's config (``pruning_history``); clients
    whose stored state (optimizer state, codec residuals) predates a pruning step get it reset.

    The target ``ratio`` is reached in equal increments over the steps of ``at``: after step ``i`` of ``n``,
    ``round(C0 * ratio * i / n)`` of a layer's ``C0`` original channels are gone (layer-wise pruning; global pruning
    removes ``ratio * i / n`` of all channels, spread by importance).

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=100,
                       callbacks=[StructuredPruning(ratio=0.36, at=[20, 30, 40], importance="magnitude")])
        trainer = L.Trainer(max_epochs=10, callbacks=[StructuredPruning(ratio=0.5, at=[2, 4])])

    Args:
        ratio: fraction of channels removed in the end, in ``[0, 1)`` (torch-pruning's ``pruning_ratio``).
        layer_ratios: per-layer final ratios by module name (override ``ratio`` for those layers).
        importance: channel importance: ``"magnitude"`` (L2), ``"l1"``, ``"taylor"`` (|w * grad|, grads of the
            epoch / round that ends in the pruning step), ``"lamp"``, ``"fpgm"`` or ``"random"``.
        at: 0-based epoch (Trainer) or round (FedLoop) at whose end a pruning step runs; one int or a list.
        global_pruning: rank channels across layers instead of removing ``ratio`` of every layer.
        ignored_layers: module names never pruned; ``None`` ignores the last ``nn.Linear`` (the classifier head,
            whose outputs are the classes).
        round_to: keep channel counts multiples of this (hardware-friendly widths); ``None`` = no rounding.
        max_layer_ratio: no layer loses more than this fraction of its channels (for global pruning).
        example_input_shape: shape of the tracing input, e.g. ``[1, 40]``; ``None`` uses the module's
            ``example_input_array`` (a tensor, a tuple of positional inputs or a dict of keyword inputs) or the
            first training batch's inputs (see ``batch_to_inputs``).
        reset_client_state: per-client state entries reset when a client first trains after a pruning step.
        batch_to_inputs: ``batch_to_inputs(batch) -> (args, kwargs)``, the model inputs of a batch; ``None`` = the
            module's ``batch_to_inputs`` method if it has one, else ``(x,)`` of ``(x, y, ...)`` batches or the
            batch itself for a tensor batch. See docs/models.md.
        forward_fn: ``forward_fn(module, *args, **kwargs) -> Tensor``, run instead of ``module(...)`` when tracing
            (for modules without ``forward``, e.g. a recurrent cell loop). Torch-pruning must be able to trace
            through it (autograd); if it cannot, pruning fails at its first step with torch-pruning's error.
    """

    def __init__(
        self,
        *,
        ratio: float = 0.5,
        layer_ratios: dict[str, float] | None = None,
        importance: str = "magnitude",
        at: int | list[int] = 0,
        global_pruning: bool = False,
        ignored_layers: list[str] | None = None,
        round_to: int | None = None,
        max_layer_ratio: float = 1.0,
        example_input_shape: list[int] | None = None,
        reset_client_state: list[str] | None = None,
        batch_to_inputs: BatchToInputs | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        need("StructuredPruning", 0.0 <= ratio < 1.0, "ratio", ratio, "in [0, 1)")
        for name, r in (layer_ratios or {}).items():
            need("StructuredPruning", isinstance(r, (int, float)) and 0.0 <= r < 1.0,
                 f"layer_ratios[{name!r}]", r, "in [0, 1)")
        need("StructuredPruning", importance in IMPORTANCES, "importance", importance,
             f"one of {IMPORTANCES}")
        need("StructuredPruning", round_to is None or round_to >= 1, "round_to", round_to, ">= 1 or None")
        need("StructuredPruning", 0.0 < max_layer_ratio <= 1.0, "max_layer_ratio", max_layer_ratio,
             "in (0, 1]")
        need("StructuredPruning",
             example_input_shape is None
             or (len(example_input_shape) >= 1 and all(d >= 1 for d in example_input_shape)),
             "example_input_shape", example_input_shape, "None or a list of sizes >= 1")
        self.ratio = float(ratio)
        self.layer_ratios = dict(layer_ratios or {})
        self.importance = importance
        self.at = parse_schedule("StructuredPruning", "at", at)
        self.global_pruning = global_pruning
        self.ignored_layers = ignored_layers
        self.round_to = round_to
        self.max_layer_ratio = max_layer_ratio
        self.example_input_shape = list(example_input_shape) if example_input_shape is not None else None
        self.reset_client_state = ["optimizer", "codec"] if reset_client_state is None else list(reset_client_state)
        self.batch_to_inputs = batch_to_inputs
        self.forward_fn = forward_fn
        self.history: History = []
        self.steps_done = 0
        self.original_widths: dict[str, int] = {}  # output channels of each prunable layer before pruning
        self._applied = 0  # history entries applied to the working model
        self._model: nn.Module | None = None
        self._seen: Tensor | ModelInputs | None = None
        self._grad_sum: dict[str, Tensor] = {}
        self._grad_batches = 0
        self._client_grads: dict[int, tuple[dict[str, Tensor], int]] = {}
        self._accepted: set[int] | None = None

    # ------------------------------------------------------------------ the pruning step
    def _cumulative(self, base: float, step: int) -> float:
        return base * step / len(self.at)

    def _relative(self, base: float, step: int) -> float:
        """Fraction of the *current* channels to remove at step ``step`` (1-based) to reach the cumulative target."""
        before, after = self._cumulative(base, step - 1), self._cumulative(base, step)
        return (after - before) / (1.0 - before)

    def _layer_ratios(self, model: nn.Module, ignored: list[nn.Module], step: int) -> dict[nn.Module, float]:
        """Per-layer ratios of this step, from each layer's *original* width so that rounding does not add up over
        steps: after step ``i`` a layer keeps ``round(C0 * (1 - cumulative_ratio))`` of its ``C0`` channels
        (torch-pruning keeps ``int(C * (1 - ratio))`` of the current ``C``). Global pruning uses one ratio."""
        explicit = dict(zip(_resolve(model, list(self.layer_ratios), "layer_ratios keys"), self.layer_ratios.values()))
        if self.global_pruning:
            return {m: self._relative(r, step) for m, r in explicit.items()}
        out = {}
        for name, m in model.named_modules():
            width = _width(m)
            if width is None or any(m is i for i in ignored):
                continue
            c0 = self.original_widths.setdefault(name, width)
            keep = round(c0 * (1.0 - self._cumulative(explicit.get(m, self.ratio), step)))
            out[m] = min(max(1.0 - (keep + 0.5) / width, 0.0), 0.999)
        return out

    def _example(self, trainer: Any, pl_module: nn.Module) -> ModelInputs:
        inp = model_inputs("StructuredPruning", trainer, pl_module, self.example_input_shape, self._seen,
                           self.batch_to_inputs)
        x = inp.single
        if self.example_input_shape is None and x is not None and x.is_floating_point():
            self.example_input_shape = list(x.shape)  # a float tensor input is rebuilt as zeros(shape) on resume
        return inp

    def _criterion(self, name: str) -> tp.importance.Importance:
        """The torch-pruning importance a pruning step ranks channels with (a subclass may score otherwise)."""
        return make_importance(name)

    def _check_runnable(self, pl_module: nn.Module) -> None:
        if self.forward_fn is None and not has_forward(pl_module):
            raise ValueError(no_forward_message("StructuredPruning", pl_module))

    def prune(self, trainer: Any, pl_module: nn.Module, grads: dict[str, Tensor] | None = None) -> int:
        """Run the next pruning step on ``pl_module`` now; return the number of parameters removed.

        ``grads`` (by parameter name) are what Taylor importance multiplies the weights with; without them a
        Taylor step falls back to magnitude importance (logged)."""
        step = self.steps_done + 1
        self._check_runnable(pl_module)
        example = self._example(trainer, pl_module)
        ignored = (_resolve(pl_module, self.ignored_layers, "ignored_layers") if self.ignored_layers is not None
                   else [m for m in pl_module.modules() if isinstance(m, nn.Linear)][-1:])
        per_layer = self._layer_ratios(pl_module, ignored, step)
        prunable = [m for m in pl_module.modules() if _width(m) is not None and not any(m is i for i in ignored)]
        if not prunable:
            warn_once(self, "nothing", "StructuredPruning: nothing to prune in %s: every Linear/Conv layer is in the "
                      "ignored layers (%s); the last nn.Linear is skipped as the classifier head when "
                      "ignored_layers=None: set ignored_layers=[...] to the layers to keep, or add prunable layers",
                      type(pl_module).__name__, "the head" if self.ignored_layers is None else self.ignored_layers)
        before = sum(p.numel() for p in pl_module.parameters())
        importance = self.importance
        if importance == "taylor" and grads is None:
            log.warning("pruning step %d: no gradients for Taylor importance; using magnitude", step)
            importance = "magnitude"
        with torch.enable_grad(), kept_modes(pl_module):
            if grads is not None:
                for name, p in pl_module.named_parameters():
                    p.grad = grads[name].to(p) if name in grads else None
            pruner = torch_pruning().pruner.MetaPruner(
                pl_module, example.for_tracing(), forward_fn=tracing_forward_fn(example, self.forward_fn),
                importance=self._criterion(importance), global_pruning=self.global_pruning,
                pruning_ratio=self._relative(self.ratio, step), pruning_ratio_dict=per_layer or None,
                max_pruning_ratio=self.max_layer_ratio, ignored_layers=ignored, round_to=self.round_to,
            )
            pruner.step()
        pl_module.zero_grad(set_to_none=True)
        new = [[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in pruner.pruning_history()]
        self.history.extend(new)
        self._applied = len(self.history)
        self.steps_done = step
        removed = before - sum(p.numel() for p in pl_module.parameters())
        if prunable and removed == 0:
            warn_once(self, "none_removed", "StructuredPruning: pruning step %d removed no channel of %s: ratio=%s "
                      "is too small for its layer widths (or round_to=%s / max_layer_ratio=%s forbid it); raise "
                      "ratio or lower round_to", step, type(pl_module).__name__, self.ratio, self.round_to,
                      self.max_layer_ratio)
        log.info("pruning step %d/%d: %d -> %d parameters", step, len(self.at), before, before - removed)
        return removed

    # ------------------------------------------------------------------ shared hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Remember the model (a FedLoop resume replays into it); under ``lightning.Trainer`` make a resumed fit
        rebuild the pruned structure before Lightning loads the checkpoint's weights."""
        self._model = pl_module
        self._check_runnable(pl_module)
        if in_fedloop(trainer) or getattr(pl_module.on_load_checkpoint, "_pruning_replay", False):
            return
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:  # runs before the module's weights load
            state = checkpoint.get("callbacks", {}).get(self.state_key)
            if state:
                self.load_state_dict(state)
            original(checkpoint)

        on_load_checkpoint._pruning_replay = True  # type: ignore[attr-defined]
        pl_module.on_load_checkpoint = on_load_checkpoint

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Remove the checkpoint hook installed by :meth:`setup`."""
        if getattr(pl_module.__dict__.get("on_load_checkpoint"), "_pruning_replay", False):
            del pl_module.on_load_checkpoint

    @property
    def single_process_reason(self) -> str | None:
        """Why this callback needs a one-process FedLoop, or ``None``: Taylor importance reads the clients' mean
        gradients from this object's memory, not from their messages, so a process sees only its own clients."""
        if self.importance == "taylor":
            return ("importance='taylor' collects the clients' gradients in the callback's memory, which a "
                    "multi-process run does not share; use importance='magnitude', 'l1', 'lamp' or 'fpgm'")
        return None

    def _collecting(self, trainer: Any) -> bool:
        step = trainer.current_round if in_fedloop(trainer) else trainer.current_epoch
        return self.importance == "taylor" and step in self.at and self.steps_done < len(self.at)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Start accumulating gradients for Taylor importance in an epoch that ends in a pruning step."""
        if not in_fedloop(trainer):
            self._grad_sum, self._grad_batches = {}, 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Keep a small example input for tracing."""
        if self._seen is None:
            self._seen = example_from_batch(batch, pl_module, self.batch_to_inputs)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        """Accumulate gradients (Taylor importance) during the epoch / round that ends in a pruning step."""
        if not self._collecting(trainer):
            return
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                g = p.grad.detach().float()
                self._grad_sum[name] = self._grad_sum[name].add_(g) if name in self._grad_sum else g.clone()
        self._grad_batches += 1

    def _mean_grads(self) -> dict[str, Tensor] | None:
        if self.importance != "taylor" or not self._grad_batches:
            return None
        return {k: v / self._grad_batches for k, v in self._grad_sum.items()}

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """``lightning.Trainer``: prune at the end of the scheduled epochs and rebuild the optimizers."""
        if in_fedloop(trainer) or trainer.current_epoch not in self.at or self.steps_done >= len(self.at):
            return
        if self.at.index(trainer.current_epoch) != self.steps_done:
            return  # resumed past this step
        removed = self.prune(trainer, pl_module, self._mean_grads())
        self._grad_sum, self._grad_batches = {}, 0
        rebuild_optimizers(trainer)
        pl_module.log("pruned_params", float(removed))

    # ------------------------------------------------------------------ federated hooks
    def on_round_start(self, trainer: Any, pl_module: Any, instructions: list[Instruction]) -> None:
        """Server: broadcast the pruning history so that any client can rebuild the current structure."""
        for instr in instructions:
            instr.config["pruning_history"] = self.history
        self._client_grads, self._accepted = {}, None

    def on_client_follow(self, trainer: Any, pl_module: Any, config: dict[str, Any]) -> None:
        """Client on its own machine: replay the pruning steps its model lacks before the pruned weights load."""
        history = config.get("pruning_history", self.history)
        if len(history) > self._applied:  # a remote client's own model: bring it to the server's structure
            replay_pruning(trainer.lightning_module, history[self._applied:], self._example(trainer, pl_module),
                           self.forward_fn)
            self._applied = len(history)

    def on_client_start(self, trainer: Any, pl_module: Any, instruction: Instruction) -> None:
        """Client: replay pruning steps this client's model lacks; reset state made for an older structure."""
        self.on_client_follow(trainer, pl_module, instruction.config)
        history = instruction.config.get("pruning_history", self.history)
        reset_stale_client_state(trainer, "pruning_version", len(history), self.reset_client_state)
        self._grad_sum, self._grad_batches = {}, 0

    def on_client_end(self, trainer: Any, pl_module: Any, reply: Reply) -> None:
        """Client: keep this client's mean gradient for Taylor importance (pruning rounds only)."""
        grads = self._mean_grads() if self._collecting(trainer) else None
        if grads is not None:
            self._client_grads[reply.client_id] = (grads, reply.num_examples)
        self._grad_sum, self._grad_batches = {}, 0

    def on_aggregate_start(self, trainer: Any, pl_module: Any, replies: list[Reply]) -> None:
        """Server: only clients whose replies were accepted contribute Taylor scores."""
        self._accepted = {r.client_id for r in replies}

    def on_round_end(self, trainer: Any, pl_module: Any, metrics: dict[str, float]) -> None:
        """Server: prune the aggregated global model at the scheduled rounds."""
        r = trainer.current_round
        if not on_server(trainer) or r not in self.at or self.steps_done >= len(self.at):
            return
        if self.at.index(r) != self.steps_done:
            return
        grads = None
        if self.importance == "taylor":
            good = [(g, n) for cid, (g, n) in self._client_grads.items() if self._accepted is None or cid in self._accepted]
            total = sum(n for _, n in good)
            if total:
                grads = {k: sum(g[k] * (n / total) for g, n in good) for k in good[0][0]}
        self._client_grads = {}
        metrics["pruned_params"] = float(self.prune(trainer, pl_module, grads))
        fed_context(trainer).model_changed()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The pruning history, steps done and the tracing input shape (plain Python: ``weights_only`` safe)."""
        return {"history": self.history, "steps_done": self.steps_done, "example_input_shape": self.example_input_shape,
                "original_widths": dict(self.original_widths)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the history and replay the steps the working model lacks (before its weights are loaded)."""
        self.history = [[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in state["history"]]
        self.steps_done = int(state["steps_done"])
        self.original_widths = {str(k): int(v) for k, v in state.get("original_widths", {}).items()}
        if state.get("example_input_shape") is not None:
            self.example_input_shape = [int(d) for d in state["example_input_shape"]]
        if self._model is not None and len(self.history) > self._applied:
            if self.example_input_shape is not None:
                device = next((p.device for p in self._model.parameters()), torch.device("cpu"))
                example: Tensor | ModelInputs = torch.zeros(*self.example_input_shape, device=device)
            elif getattr(self._model, "example_input_array", None) is not None or self._seen is not None:
                example = model_inputs("StructuredPruning", None, self._model, None, self._seen, self.batch_to_inputs)
            else:
                raise ValueError("StructuredPruning: the checkpoint has no example_input_shape to replay pruning with; "
                                 "set the module's example_input_array (models with several or integer inputs)")
            replay_pruning(self._model, self.history[self._applied:], example, self.forward_fn)
            self._applied = len(self.history)


__all__ = ["IMPORTANCES", "StructuredPruning", "make_importance", "replay_pruning"]
