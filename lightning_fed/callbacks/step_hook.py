"""Wrapping a LightningModule's ``training_step`` from a callback, without changing the module's code.

A callback that must change the training loss (distillation terms, FedGen's regulariser) installs a
:class:`TrainingStepHook` in ``on_train_start`` and removes it in ``on_train_end``. It works the same under
``lightning.Trainer`` (which looks ``training_step`` up on the module instance) and inside FedLoop. Several
hooks stack; removing one that is not the outermost turns it into a pass-through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn


class TrainingStepHook:
    """Replace ``module.training_step`` by ``fn(original_step, batch, batch_idx, *args)`` while installed.

    Example::

        hook = TrainingStepHook(lambda step, batch, i, *a: step(batch, i, *a) * 2.0)
        hook.install(pl_module)      # in on_train_start
        ...
        hook.remove()                # in on_train_end
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.module: nn.Module | None = None
        self._original: Callable[..., Any] | None = None
        self._wrapped: Callable[..., Any] | None = None
        self._active = False

    def install(self, module: nn.Module) -> None:
        """Wrap ``module.training_step`` (idempotent for the same module)."""
        if self._active and self.module is module:
            return
        self.remove()
        original = module.training_step

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not self._active:
                return original(*args, **kwargs)
            return self.fn(original, *args, **kwargs)

        self.module, self._original, self._wrapped, self._active = module, original, wrapped, True
        module.training_step = wrapped  # type: ignore[method-assign]

    def remove(self) -> None:
        """Restore the original step (or become a pass-through if another wrapper sits on top)."""
        if not self._active or self.module is None:
            return
        self._active = False
        if self.module.__dict__.get("training_step") is self._wrapped:
            if getattr(self._original, "__self__", None) is self.module and \
                    getattr(self._original, "__func__", None) is getattr(type(self.module), "training_step", None):
                del self.module.__dict__["training_step"]
            else:
                self.module.training_step = self._original  # type: ignore[method-assign]
        self.module = None


class ForwardCapture:
    """Keep the last output of a module's ``forward`` while installed (a forward hook), e.g. the logits a
    ``training_step`` computed, so a :class:`TrainingStepHook` can add a loss on them without a second pass.

    Example::

        capture = ForwardCapture()
        capture.install(pl_module)   # in on_train_start
        logits = capture.value       # after the module's forward ran
        capture.remove()             # in on_train_end
    """

    def __init__(self) -> None:
        self.value: Any = None
        self._handle: Any = None

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self.value = output

    def install(self, module: nn.Module) -> None:
        """Start capturing ``module``'s outputs (replacing an earlier installation)."""
        self.remove()
        self._handle = module.register_forward_hook(self._hook)

    def remove(self) -> None:
        """Stop capturing and forget the last output."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.value = None


def step_loss(out: Any) -> Tensor | None:
    """The loss tensor of a ``training_step`` output (a tensor, a dict with ``"loss"``, or ``None``)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        return out.get("loss")
    return None


def with_loss(out: Any, loss: Tensor) -> Any:
    """``out`` with its loss replaced by ``loss`` (same form as ``out``)."""
    if isinstance(out, dict):
        return {**out, "loss": loss}
    return loss


__all__ = ["ForwardCapture", "TrainingStepHook", "step_loss", "with_loss"]
