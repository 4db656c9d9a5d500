"""Knowledge distillation from a frozen teacher, as a callback (teacher hooks).

Hinton et al., "Distilling the Knowledge in a Neural Network", 2015; feature hints after FitNets (Romero
et al. 2015); attention transfer as in Neural Attention Distillation (Li et al., ICLR 2021).

The callback wraps the student's ``training_step`` while training runs: the module's own loss is the task
loss, the teacher runs on the same batch under ``torch.no_grad`` and the loss becomes::

    alpha * task + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))
          + hint_weight * sum MSE(student_layer, teacher_layer)
          + attention_weight * sum MSE(attention(student_layer), attention(teacher_layer))

Layer outputs are read with forward hooks on named submodules. The teacher is held by the callback, not
registered in the student: it never receives gradients and is never part of a federated payload.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fed.callbacks._compress import (
    BatchToInputs,
    ForwardFn,
    ModelInputs,
    call_model,
    has_forward,
    inputs_from_batch,
    model_inputs,
    no_forward_message,
)
from lightning_fed.callbacks.base import FedCallback
from lightning_fed.callbacks.kd_losses import attention_loss, hint_loss, kd_loss
from lightning_fed.callbacks.step_hook import TrainingStepHook, step_loss, with_loss

log = logging.getLogger("lightning_fed")


def _parse_layers(specs: list[str] | None, key: str) -> list[tuple[str, str]]:
    out = []
    for spec in specs or []:
        parts = spec.split(":")
        if len(parts) > 2 or not all(parts):
            raise ValueError(f"Distillation: {key} entry {spec!r} is not allowed; use 'layer' or 'student_layer:teacher_layer'")
        out.append((parts[0], parts[-1]))
    return out


def load_weights(module: nn.Module, path: str) -> None:
    """Load a state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``) into ``module``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"teacher_weights={path!r} is not a file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(p, weights_only=True, map_location="cpu")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    module.load_state_dict(state, strict=False)


class _Capture:
    """Forward hooks that keep the latest output of named submodules."""

    def __init__(self) -> None:
        self.out: dict[str, Tensor] = {}
        self.handles: list[Any] = []

    def add(self, module: nn.Module, name: str, key: str) -> None:
        try:
            sub = module.get_submodule(name) if name else module
        except AttributeError as err:
            raise ValueError(f"Distillation: {type(module).__name__} has no submodule {name!r}") from err

        def hook(_m: nn.Module, _inp: Any, output: Any) -> None:
            self.out[key] = output[0] if isinstance(output, (tuple, list)) else output

        self.handles.append(sub.register_forward_hook(hook))

    def clear(self) -> None:
        self.out.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.out.clear()


OutputsFn = Callable[[nn.Module, Any], Tensor]


def as_class_logits(owner: str, out: Any, who: str) -> Tensor:
    """The logits the soft-target loss compares: ``[B, C]`` class logits as they are, ``[B, T, V]`` token logits
    (a language model) flattened to ``[B * T, V]`` (one distribution per token; the class dimension is last).

    Raises:
        ValueError: not a tensor, or fewer than 2 dimensions (e.g. a forward that returns the loss).
    """
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        out = out[0]
    if not isinstance(out, Tensor) or out.ndim < 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{owner}: the {who}'s output {shape} is not logits ([B, C] class logits or [B, T, V] token "
                         "logits); set logits_layer / teacher_logits_layer to the submodule that produces the logits, "
                         "or give outputs_fn(module, batch) -> logits")
    if out.shape[-1] < 2:
        raise ValueError(f"{owner}: the {who}'s output {tuple(out.shape)} has one output per sample (a regression "
                         "model?); soft-target distillation compares class distributions and needs >= 2 logits")
    return out if out.ndim == 2 else out.reshape(-1, out.shape[-1])


class Distillation(FedCallback):
    """Distil a frozen teacher into the trained module (under ``lightning.Trainer`` and inside FedLoop).

    Example::

        teacher = MNIST1DCNN(channels=64)            # trained; or give teacher_weights=
        cb = Distillation(teacher=teacher, alpha=0.5, temperature=4.0, attention=["conv3"])
        L.Trainer(callbacks=[cb]).fit(MNIST1DCNN(channels=8), dm)
        FedLoop(callbacks=[cb], ...).fit(MNIST1DCNN(channels=8), dm)

    In a recipe::

        loop:
          callbacks:
            - class_path: lightning_fed.callbacks.Distillation
              init_args:
                teacher: {class_path: lightning_fed.models.MNIST1DCNN, init_args: {channels: 64}}
                teacher_weights: runs/teacher/final.safetensors

    Args:
        teacher: the teacher network; called as ``teacher(x)`` and returning logits.
        alpha: weight of the module's own (task) loss; ``1 - alpha`` weighs the soft-target term.
        temperature: softmax temperature ``T`` of the soft targets.
        teacher_weights: optional ``.safetensors`` / ``torch.save`` state dict loaded into the teacher.
        hints: layers whose outputs the student matches (MSE); ``"name"`` or ``"student:teacher"``.
        hint_weight: weight of the hint terms.
        attention: layers for attention transfer (NAD's attention-map loss); same naming as ``hints``.
        attention_weight: weight of the attention terms.
        attention_p: exponent ``p`` of the attention map ``sum_c |a_c|^p``.
        input_index: position of the input in a batch tuple/list (the teacher is called on ``batch[i]``) when
            there is no ``batch_to_inputs``.
        logits_layer: submodule whose output is the student's logits; ``""`` = the module's own forward.
        teacher_logits_layer: submodule of the teacher whose output is its logits; ``None`` = the teacher's own
            output (e.g. ``"head"`` when the forward returns a loss).
        batch_to_inputs: ``batch_to_inputs(batch) -> (args, kwargs)``: what the teacher is called with
            (``teacher(*args, **kwargs)``); ``None`` = the student module's ``batch_to_inputs`` method if it has
            one, else ``batch[input_index]``. See docs/models.md.
        outputs_fn: ``outputs_fn(module, batch) -> Tensor`` giving the logits to compare for the student and the
            teacher (the student's is computed again, with gradients); ``None`` = the captured outputs.
        forward_fn: ``forward_fn(module, *args, **kwargs) -> Tensor`` run instead of ``module(...)`` for the teacher
            and, when the student has no ``forward``, for the student's logits (a second forward, with gradients).

    The compared outputs are ``[B, C]`` class logits, or ``[B, T, V]`` token logits (language models), compared per
    token (flattened to ``[B * T, V]``). Other outputs (one per sample, or a loss) are refused with a ``ValueError``
    at setup when the module has an ``example_input_array`` (the teacher runs once on it), else at the first
    training step.
    """

    def __init__(
        self,
        teacher: nn.Module,
        alpha: float = 0.5,
        temperature: float = 4.0,
        teacher_weights: str | None = None,
        hints: list[str] | None = None,
        hint_weight: float = 1.0,
        attention: list[str] | None = None,
        attention_weight: float = 1000.0,
        attention_p: float = 2.0,
        input_index: int = 0,
        logits_layer: str = "",
        teacher_logits_layer: str | None = None,
        batch_to_inputs: BatchToInputs | None = None,
        outputs_fn: OutputsFn | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"Distillation: teacher={type(teacher).__name__} is not allowed; it must be an nn.Module")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Distillation: alpha={alpha} is not allowed; alpha must be in [0, 1]")
        if not temperature > 0:
            raise ValueError(f"Distillation: temperature={temperature} is not allowed; temperature must be > 0")
        for key, val in (("hint_weight", hint_weight), ("attention_weight", attention_weight)):
            if val < 0:
                raise ValueError(f"Distillation: {key}={val} is not allowed; {key} must be >= 0")
        if not attention_p > 0:
            raise ValueError(f"Distillation: attention_p={attention_p} is not allowed; attention_p must be > 0")
        if input_index < 0:
            raise ValueError(f"Distillation: input_index={input_index} is not allowed; input_index must be >= 0")
        self.hints = _parse_layers(hints, "hints")
        self.attention = _parse_layers(attention, "attention")
        if teacher_weights is not None:
            try:
                load_weights(teacher, teacher_weights)
            except (ValueError, RuntimeError) as err:
                raise ValueError(f"Distillation: teacher_weights: {err}") from err
        self.teacher = teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.alpha = alpha
        self.temperature = temperature
        self.hint_weight = hint_weight
        self.attention_weight = attention_weight
        self.attention_p = attention_p
        self.input_index = input_index
        self.logits_layer = logits_layer
        self.teacher_logits_layer = teacher_logits_layer
        self.batch_to_inputs = batch_to_inputs
        self.outputs_fn = outputs_fn
        self.forward_fn = forward_fn
        self._hook = TrainingStepHook(self._step)
        self._student = _Capture()
        self._teacher = _Capture()
        self._module: nn.Module | None = None

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse a teacher whose outputs cannot be distilled (one output per sample, or not logits) before any
        training, by running it once on the module's ``example_input_array``. Without one (the inputs would come
        from data) the same check runs at the first training step; it is also skipped with ``outputs_fn`` (which
        needs a batch) and for a teacher that cannot be run without ``forward_fn`` (refused in ``on_train_start``).
        """
        if stage != "fit" or self.outputs_fn is not None or getattr(pl_module, "example_input_array", None) is None:
            return
        if self.forward_fn is None and self.teacher_logits_layer is None and not has_forward(self.teacher):
            return
        device = next((p.device for p in self.teacher.parameters()), torch.device("cpu"))
        inputs = model_inputs("Distillation", trainer, pl_module, None, None, self.batch_to_inputs).to(device)
        capture = _Capture()
        if self.teacher_logits_layer is not None:
            capture.add(self.teacher, self.teacher_logits_layer, "__logits__")
        self.teacher.eval()
        try:
            with torch.no_grad():
                out = call_model(self.teacher, inputs, self.forward_fn, "Distillation")
            if self.teacher_logits_layer is not None:
                out = capture.out.get("__logits__")
        except Exception as err:  # noqa: BLE001 - the first training step runs it again and raises for real
            log.debug("Distillation: the teacher did not run on example_input_array at setup (%s); the first "
                      "training step checks its outputs", err)
            return
        finally:
            capture.remove()
        as_class_logits("Distillation", out, "teacher")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Freeze the teacher on the module's device, register the layer hooks, wrap ``training_step``."""
        self.teacher.to(pl_module.device)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        if self.outputs_fn is None and self.forward_fn is None:
            for who, m, layer in (("module", pl_module, self.logits_layer),
                                  ("teacher", self.teacher, self.teacher_logits_layer)):
                if not layer and not has_forward(m):
                    raise ValueError(no_forward_message("Distillation", m) + f" (or name the {who}'s logits submodule "
                                     "in logits_layer / teacher_logits_layer, or give outputs_fn(module, batch))")
        if self.outputs_fn is None:
            self._student.add(pl_module, self.logits_layer, "__logits__")
            if self.teacher_logits_layer is not None:
                self._teacher.add(self.teacher, self.teacher_logits_layer, "__logits__")
        for s, t in self.hints:
            self._student.add(pl_module, s, f"hint:{s}")
            self._teacher.add(self.teacher, t, f"hint:{s}")
        for s, t in self.attention:
            self._student.add(pl_module, s, f"at:{s}")
            self._teacher.add(self.teacher, t, f"at:{s}")
        self._module = pl_module
        self._hook.install(pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Remove the hooks."""
        self._hook.remove()
        self._student.remove()
        self._teacher.remove()
        self._module = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Remove the hooks if training stopped early."""
        self.on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------ the loss
    def _teacher_inputs(self, batch: Any) -> ModelInputs:
        if self.batch_to_inputs is not None or callable(getattr(self._module, "batch_to_inputs", None)):
            inp = inputs_from_batch(batch, self._module, self.batch_to_inputs)
            if inp is None:
                raise ValueError(f"Distillation: batch_to_inputs gave no inputs for a batch of type {type(batch).__name__}")
            return inp
        return ModelInputs((self._input(batch),), {})

    def _input(self, batch: Any) -> Tensor:
        if isinstance(batch, Tensor):
            return batch
        if isinstance(batch, (tuple, list)):
            return batch[self.input_index]
        raise ValueError(f"Distillation: cannot find the input in a batch of type {type(batch).__name__}; "
                         "batches must be tensors or tuples/lists (see input_index), or give batch_to_inputs="
                         "(a function batch -> (args, kwargs))")

    def distillation_terms(self, task: Tensor, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The combined loss from the task loss and the captured student outputs of this step."""
        self._teacher.clear()
        if self.outputs_fn is not None:
            with torch.no_grad():
                t_out = self.outputs_fn(self.teacher, batch)
            s_out = self.outputs_fn(self._module, batch)
        else:
            inputs = self._teacher_inputs(batch)
            with torch.no_grad():
                t_out = call_model(self.teacher, inputs, self.forward_fn, "Distillation")
            if self.teacher_logits_layer is not None:
                t_out = self._teacher.out.get("__logits__")
            s_out = self._student.out.get("__logits__")
            if s_out is None and self.forward_fn is not None and self._module is not None:
                s_out = call_model(self._module, inputs, self.forward_fn, "Distillation")
            if s_out is None:
                raise RuntimeError("Distillation: the student's forward was not called in training_step; "
                                   "set logits_layer to the submodule that produces the logits")
        s_logits = as_class_logits("Distillation", s_out, "student")
        t_logits = as_class_logits("Distillation", t_out, "teacher")
        kd = kd_loss(s_logits, t_logits.detach(), self.temperature)
        loss = self.alpha * task + (1.0 - self.alpha) * kd
        parts = {"kd_loss": kd.detach()}
        if self.hints:
            h = sum(hint_loss(self._student.out[f"hint:{s}"], self._teacher.out[f"hint:{s}"].detach())
                    for s, _ in self.hints)
            loss = loss + self.hint_weight * h
            parts["hint_loss"] = h.detach()
        if self.attention:
            a = sum(attention_loss(self._student.out[f"at:{s}"], self._teacher.out[f"at:{s}"].detach(),
                                   self.attention_p) for s, _ in self.attention)
            loss = loss + self.attention_weight * a
            parts["attention_loss"] = a.detach()
        return loss, parts

    def _step(self, original: Any, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
        self._student.clear()
        out = original(batch, batch_idx, *args, **kwargs)
        task = step_loss(out)
        if task is None:
            return out
        loss, parts = self.distillation_terms(task, batch)
        module = self._module
        if module is not None:
            for name, value in parts.items():
                module.log(f"distill/{name}", value, on_step=False, on_epoch=True)
        return with_loss(out, loss)

    def state_dict(self) -> dict[str, Any]:
        """The settings (the teacher is configuration, rebuilt from the recipe, and is not checkpointed)."""
        return {"alpha": self.alpha, "temperature": self.temperature}


__all__ = ["Distillation", "load_weights"]
