"""Quantization-aware training (QAT) under ``lightning.Trainer`` and in FedLoop, and the int8 / int4 export.

From epoch (Trainer) or round (FedLoop) ``start`` on, every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` of the
model computes with fake-quantized weights (and activations for ``"int8"``), so training adapts to the rounding
the exported integer model will do. The layers are swapped in place (see
:mod:`lightning_fed.callbacks.quantize`): the float *shadow* weights remain the model's parameters under the same
``state_dict`` keys, so FedAvg federates exactly these float weights and nothing else (the schemes are dynamic:
there are no observer buffers to federate). At the end of fit the model is exported to integer storage and its
accuracy and serialized size are reported.

One implementation: the fake-quantized layers of :mod:`lightning_fed.callbacks.quantize`. torchao's QAT was
measured as the alternative and does not cover this callback's schemes or layers (docs/compression.md, "Why
not torchao").

Order with structured pruning: prune first, then QAT. Pruning changes the channel counts that the quantization
scales are computed over, so QAT must only start after the last pruning step; this is checked when the loop
(``FedLoop``) is built and again at ``setup`` (``lightning.Trainer``).
"""

from __future__ import annotations

import logging
import numbers
from pathlib import Path
from typing import Any

import lightning as L
import safetensors.torch
import torch
from torch import Tensor, nn

from lightning_fed.callbacks._compress import (
    BatchToInputs,
    ForwardFn,
    ModelInputs,
    call_model,
    cpu_copy,
    example_from_batch,
    has_forward,
    in_fedloop,
    model_inputs,
    no_forward_message,
    on_server,
    warn_once,
)
from lightning_fed.callbacks.base import FedCallback
from lightning_fed.callbacks.footprint import (
    eval_loader,
    float_copy,
    held_out_metrics,
    log_metrics,
    serialized_bytes,
)
from lightning_fed.callbacks.pruning import StructuredPruning
from lightning_fed.callbacks.quantize import FAKE_QUANT, SCHEMES, QuantizedLayer, _FakeQuant
from lightning_fed.context import fed_context
from lightning_fed.protocol import Instruction
from lightning_fed.validation import need

log = logging.getLogger("lightning_fed")


def tensor_bytes(t: Tensor) -> int:
    """Storage bytes of a tensor."""
    return t.numel() * t.element_size()


def check_prune_then_qat(callbacks: list[Any]) -> None:
    """Raise ``ValueError`` unless every :class:`StructuredPruning` comes before every :class:`QuantizationAware`
    in ``callbacks`` and QAT starts after the last pruning step."""
    prunes = [(i, cb) for i, cb in enumerate(callbacks) if isinstance(cb, StructuredPruning)]
    qats = [(i, cb) for i, cb in enumerate(callbacks) if isinstance(cb, QuantizationAware)]
    for qi, q in qats:
        for pi, p in prunes:
            if qi < pi:
                raise ValueError(
                    f"QuantizationAware is at callbacks[{qi}], before StructuredPruning at callbacks[{pi}]: prune first, "
                    "then QAT; put StructuredPruning before QuantizationAware"
                )
            if q.start <= max(p.at):
                raise ValueError(
                    f"QuantizationAware: start={q.start} is not allowed with StructuredPruning(at={p.at}); QAT must start "
                    f"after the last pruning step (start >= {max(p.at) + 1}): prune first, then QAT"
                )


def prepare_qat(model: nn.Module, scheme: str, group_size: int | None, layers: list[str] | None = None) -> int:
    """Swap the quantizable layers of ``model`` to their fake-quantized classes in place; return how many.

    Only exact ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (zero padding) are swapped; ``layers`` restricts to
    those module names.
    """
    count = 0
    for name, m in model.named_modules():
        if layers is not None and name not in layers:
            continue
        cls = FAKE_QUANT.get(type(m))
        if cls is None or getattr(m, "padding_mode", "zeros") != "zeros":
            continue
        m.__class__ = cls
        m.qat_scheme, m.qat_group_size = scheme, group_size
        count += 1
    return count


def convert_qat(model: nn.Module, scheme: str, group_size: int | None) -> nn.Module:
    """An exported copy of a QAT-prepared ``model`` (on the CPU): every fake-quantized layer becomes a
    :class:`~lightning_fed.callbacks.quantize.QuantizedLayer` holding integer weights."""
    out = cpu_copy(model)
    for name, m in list(out.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, _FakeQuant):
                setattr(m, child_name, QuantizedLayer(child, scheme, group_size))
    return out


class QuantizationAware(FedCallback):
    """Fake-quantization during training and an integer export at the end; ``lightning.Trainer`` and ``FedLoop``.

    Example::

        callbacks = [StructuredPruning(ratio=0.36, at=[20, 30, 40]), QuantizationAware(scheme="int8", start=60)]
        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=100, callbacks=callbacks)

    After fit, :attr:`report` holds ``float_acc``, ``quant_acc`` (test accuracy), the other test metrics of both
    models (``float_test_loss``, ``quant_<what test_step logs>``…; see
    :func:`~lightning_fed.callbacks.footprint.held_out_metrics`), ``float_bytes``, ``quant_bytes``,
    ``float_weight_bytes`` and ``quant_weight_bytes`` (quantized layers' weights and scales), and
    :attr:`exported` the integer model (also written as ``quantized.safetensors`` to the run folder).

    Args:
        scheme: ``"int8"`` (int8 weights per channel + dynamic int8 activations), ``"int8_tensor"`` (the same
            with one weight scale per tensor: the smallest int8 export) or ``"int4_weight"`` (int4 weights in
            groups of ``group_size``, float activations).
        start: 0-based epoch (Trainer) or round (FedLoop) from which training is quantization-aware.
        group_size: int4 group size (input elements per scale).
        layers: module names to quantize; ``None`` = every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``.
        export: quantize, evaluate and save the model at the end of fit.
        export_dir: folder for ``quantized.safetensors``; ``None`` = the FedLoop run folder or the Trainer's
            ``default_root_dir``.
        batch_to_inputs: ``batch_to_inputs(batch) -> (args, kwargs)`` for the export check; ``None`` = the module's
            method of that name or ``(x,)`` of ``(x, y, ...)`` batches. See docs/models.md.
        forward_fn: ``forward_fn(module, *args, **kwargs) -> Tensor`` run instead of ``module(...)`` in the export
            check (models without ``forward``).

    The export is checked by running the float and the integer model on example inputs (the module's
    ``example_input_array`` or a training batch's inputs): ``report["export_max_abs_diff"]`` is the largest
    difference of their outputs. Accuracies (``float_acc``, ``quant_acc``) are computed only for classifiers
    (``model(x)`` on ``(x, y)`` records with integer labels); otherwise a warning says why they are skipped.
    """

    def __init__(
        self,
        *,
        scheme: str = "int8",
        start: int = 0,
        group_size: int = 32,
        layers: list[str] | None = None,
        export: bool = True,
        export_dir: str | None = None,
        batch_to_inputs: BatchToInputs | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        need("QuantizationAware", scheme in SCHEMES, "scheme", scheme, f"one of {SCHEMES}")
        need("QuantizationAware", start >= 0, "start", start, "an int >= 0 (epoch or round)")
        need("QuantizationAware", group_size >= 1, "group_size", group_size, ">= 1")
        need("QuantizationAware", layers is None or len(layers) > 0, "layers", layers,
             "None or a non-empty list of module names")
        self.scheme = scheme
        self.start = start
        self.group_size = group_size
        self.layers = layers
        self.export = export
        self.export_dir = export_dir
        self.batch_to_inputs = batch_to_inputs
        self.forward_fn = forward_fn
        self._seen: Tensor | ModelInputs | None = None
        self.prepared = False
        self.exported: nn.Module | None = None
        self.report: dict[str, float] = {}
        self._model: nn.Module | None = None

    def check_callbacks(self, callbacks: list[Any]) -> None:
        """Called by ``FedLoop.__init__`` (and at ``setup``): prune first, then QAT."""
        check_prune_then_qat(callbacks)

    def prepare(self, model: nn.Module) -> None:
        """Make ``model`` quantization-aware now (idempotent)."""
        if self.prepared:
            return
        n = prepare_qat(model, self.scheme, self.group_size if self.scheme == "int4_weight" else None, self.layers)
        if n == 0:
            raise ValueError(f"QuantizationAware: no quantizable layer (Linear/Conv1d/Conv2d) in {type(model).__name__}"
                             + (f" among layers={self.layers}" if self.layers else ""))
        self.prepared = True
        log.info("QAT (%s): %d layers fake-quantized", self.scheme, n)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check the order against the other callbacks and remember the model."""
        check_prune_then_qat(list(trainer.callbacks))
        self._model = pl_module

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Keep a small example input for the export check."""
        if self._seen is None and self.export:
            self._seen = example_from_batch(batch, pl_module, self.batch_to_inputs)

    def _classifier_reason(self, pl_module: nn.Module, loader: Any) -> str | None:
        """Why accuracy cannot be computed on ``loader`` (``None``: ``model(x)`` on ``(x, y)`` integer labels)."""
        if self.forward_fn is not None or not has_forward(pl_module):
            return "the model is run through forward_fn / has no forward()"
        if self.batch_to_inputs is not None or callable(getattr(pl_module, "batch_to_inputs", None)):
            return "the model's inputs come from batch_to_inputs, not x of (x, y)"
        ex = getattr(pl_module, "example_input_array", None)
        if ex is not None and not isinstance(ex, Tensor):
            return "the model takes several inputs (example_input_array is not one tensor)"
        data = getattr(loader, "dataset", None)
        try:
            record = data[0] if data is not None and len(data) else None
        except (TypeError, IndexError, KeyError):
            record = None
        if not (isinstance(record, (tuple, list)) and len(record) >= 2):
            return "held-out records are not (x, y) pairs"
        y = record[1]
        if not (isinstance(y, numbers.Integral) or (isinstance(y, Tensor) and not y.is_floating_point() and y.ndim == 0)):
            return "held-out targets are not integer class labels"
        return None

    def _check_export(self, trainer: Any, pl_module: nn.Module, float_model: nn.Module, exported: nn.Module) -> None:
        """Run the float and the exported model on example inputs; record the largest output difference."""
        if self.forward_fn is None and not has_forward(pl_module):
            warn_once(self, "no_forward", "%s; the export is saved but not checked",
                      no_forward_message("QuantizationAware", pl_module))
            return
        with torch.random.fork_rng(devices=[]):  # reading a held-out batch must not move the run's random stream
            try:
                inputs = model_inputs("QuantizationAware", trainer, pl_module, None, self._seen, self.batch_to_inputs)
            except ValueError as err:
                warn_once(self, "no_inputs", "%s; the export is saved but not checked", err)
                return
        inputs = inputs.to("cpu")
        with torch.no_grad():
            f_out = call_model(float_model, inputs, self.forward_fn, "QuantizationAware")
            q_out = call_model(exported, inputs, self.forward_fn, "QuantizationAware")
        f_out = f_out[0] if isinstance(f_out, (tuple, list)) else f_out
        q_out = q_out[0] if isinstance(q_out, (tuple, list)) else q_out
        if isinstance(f_out, Tensor) and isinstance(q_out, Tensor) and f_out.shape == q_out.shape:
            self.report["export_max_abs_diff"] = float((f_out.float() - q_out.float()).abs().max()) if f_out.numel() else 0.0
        else:
            warn_once(self, "outputs", "QuantizationAware: the exported model's outputs (%s) do not match the float "
                      "model's (%s)", type(q_out).__name__, type(f_out).__name__)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """``lightning.Trainer``: switch on fake quantization from epoch ``start``."""
        if not in_fedloop(trainer) and trainer.current_epoch >= self.start:
            self.prepare(pl_module)

    def on_round_start(self, trainer: Any, pl_module: Any, instructions: list[Instruction]) -> None:
        """Server: switch on fake quantization from round ``start``; tell clients the scheme."""
        if trainer.current_round >= self.start:
            self.prepare(pl_module)
            for instr in instructions:
                instr.config["qat_scheme"] = self.scheme

    def on_client_follow(self, trainer: Any, pl_module: Any, config: dict[str, Any]) -> None:
        """Client on its own machine: once the server sends its scheme, make the working model quantization-aware."""
        if "qat_scheme" in config:
            self.prepare(trainer.lightning_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Export, evaluate and save the integer model; log its accuracy and size."""
        if self.export and (not in_fedloop(trainer) or on_server(trainer)):
            self.export_model(trainer, pl_module)

    def export_model(self, trainer: Any, pl_module: nn.Module) -> nn.Module:
        """Convert the (prepared) model to integers, measure accuracy and bytes, save; cached per fit."""
        if self.exported is not None:
            return self.exported
        was_prepared = self.prepared
        if not was_prepared:  # a fit that ended before ``start``: export still quantizes post-training
            log.warning("QuantizationAware: training ended before start=%d; exporting without QAT", self.start)
            self.prepare(pl_module)
        exported = convert_qat(pl_module, self.scheme, self.group_size if self.scheme == "int4_weight" else None)
        float_model = float_copy(pl_module)  # the float reference: the same weights without fake quantization
        qsd = dict(exported.state_dict())
        fsd = dict(float_model.state_dict())
        qlayers = {n for n, m in exported.named_modules() if isinstance(m, QuantizedLayer)}
        qw = sum(tensor_bytes(v) for k, v in qsd.items()
                 if k.rsplit(".", 1)[0] in qlayers and k.rsplit(".", 1)[1] in ("qweight", "scale"))
        fw = sum(tensor_bytes(v) for k, v in fsd.items() if k.rsplit(".", 1)[0] in qlayers and k.endswith(".weight"))
        self.report = {"float_bytes": float(serialized_bytes(float_model)), "quant_bytes": float(serialized_bytes(exported)),
                       "float_weight_bytes": float(fw), "quant_weight_bytes": float(qw)}
        self._check_export(trainer, pl_module, float_model, exported)
        ctx = fed_context(trainer)
        in_loop_cpu = ctx is not None and ctx.test_data is not None and isinstance(pl_module, L.LightningModule) \
            and getattr(trainer, "device", torch.device("cpu")).type == "cpu"
        loader = eval_loader(trainer)
        reason = None if in_loop_cpu or loader is None else self._classifier_reason(pl_module, loader)
        if reason is not None:  # outside the loop's evaluator only class accuracy can be computed
            warn_once(self, "accuracy", "QuantizationAware: accuracy of the export is not computed: %s (it needs a "
                      "classifier model(x) over (x, y) records with integer labels); see export_max_abs_diff", reason)
        else:
            for kind, m in (("float", float_model), ("quant", exported)):  # the module's own test metrics if any
                for k, v in held_out_metrics(trainer, m).items():
                    self.report[f"{kind}_acc" if k == "test_acc" else f"{kind}_{k}"] = v
        out_dir = Path(self.export_dir) if self.export_dir else (
            ctx.run_dir if ctx is not None else Path(trainer.default_root_dir))
        if getattr(trainer, "is_global_zero", True):  # one writer in a multi-process run
            out_dir.mkdir(parents=True, exist_ok=True)
            safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in qsd.items()},
                                        str(out_dir / "quantized.safetensors"))
        log.info("QAT export (%s): %s", self.scheme, {k: round(v, 4) for k, v in self.report.items()})
        log_metrics(trainer, {f"qat/{k}": v for k, v in self.report.items()})
        self.exported = exported
        return exported

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Whether the model is quantization-aware (a resumed run re-prepares it)."""
        return {"prepared": self.prepared}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; re-prepare the model if it was prepared."""
        if state.get("prepared") and self._model is not None:
            self.prepare(self._model)


__all__ = ["QuantizationAware", "check_prune_then_qat", "convert_qat", "prepare_qat"]
