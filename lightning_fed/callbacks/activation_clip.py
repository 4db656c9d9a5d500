"""Activation clipping (after Wang et al., "Improved Activation Clipping for Universal Backdoor Mitigation and
Test-Time Detection", 2023) as a server-side FedLoop callback.

A trigger backdoor fires by driving some internal activations far above anything clean inputs produce. On the
server's clean records the defence measures, for each named layer (a Conv / Linear whose output feeds a ReLU), an
upper bound of its output: the ``quantile`` of the clean outputs, one bound per output channel **and position**
(``per_position=True``: the quantile over records) or one per channel (the quantile over records and positions);
the layers are measured in order, each with the earlier ones already clipped. From then on the layer's output is
clamped at its bound whenever the model runs in eval mode (inference, evaluation), through a forward hook; training
(in train mode) is left as it was. The weights are not changed: the bounds are the defence's state, checkpointed
and re-installed on resume, and written next to ``final.safetensors`` as ``activation_clip.safetensors`` (rank 0;
one tensor per layer name): :func:`install_clips` puts them on a deployed copy of the model.

The paper optimises the bounds further, to shrink the classification margin on clean data; here they are the clean
outputs' quantiles, without that optimisation. On MNIST-1D's backdoored CNN, bounds per position remove the
benchmark's trigger (the last 4 values set to +-3) but not other triggers: the middle 4 values set to +3 survive
every setting that keeps the model usable, and the same 4 values at a constant +3, or the first 4, survive in part
(benchmarks/RESULTS.md, "Activation clipping"). No trigger knowledge is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_fed.callbacks._defence import CleanDataDefence, accuracy, layer_outputs
from lightning_fed.context import fed_context
from lightning_fed.data.public import PublicData
from lightning_fed.seeding import Stream
from lightning_fed.validation import need

Bounds = dict[str, Tensor]
BOUNDS_FILE = "activation_clip.safetensors"


class ClipHook:
    """A forward hook clamping a module's output at ``bound`` (broadcast over the batch) in eval mode."""

    def __init__(self, bound: Tensor) -> None:
        self.bound = bound

    def __call__(self, module: nn.Module, _inputs: Any, output: Tensor) -> Tensor | None:
        """The output clamped from above (eval mode); ``None`` (unchanged) in train mode."""
        if module.training:
            return None
        return torch.minimum(output, self.bound.to(device=output.device, dtype=output.dtype))


def remove_clips(model: nn.Module) -> None:
    """Remove every :class:`ClipHook` from ``model``'s submodules."""
    for module in model.modules():
        for key in [k for k, h in module._forward_hooks.items() if isinstance(h, ClipHook)]:
            del module._forward_hooks[key]


def install_clips(model: nn.Module, bounds: Bounds) -> None:
    """Clamp the output of each submodule named in ``bounds`` at its bound (eval mode), replacing earlier clips."""
    remove_clips(model)
    for name, bound in bounds.items():
        model.get_submodule(name).register_forward_hook(ClipHook(bound))


def save_bounds(bounds: Bounds, path: Path) -> None:
    """Write ``bounds`` to ``path`` as safetensors (a temporary file, then a rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in bounds.items()}, str(tmp))
    os.replace(tmp, path)


@torch.no_grad()
def layer_output(model: nn.Module, layer: str, x: Tensor, batch_size: int = 512) -> Tensor:
    """The output of ``model``'s submodule ``layer`` on the records ``x`` (eval mode; the mode is restored), on CPU."""
    return torch.cat([out.cpu() for out in layer_outputs(model, layer, x, batch_size)])


def clip_bounds(out: Tensor, quantile: float, per_position: bool) -> Tensor:
    """The upper bound of a layer's outputs ``out`` (``[records, channels, ...]``): the ``quantile`` over records,
    per channel and position (``per_position``), or over records and positions, per channel (shaped to broadcast
    against one record's output)."""
    out = out.double()
    if per_position or out.ndim <= 2:
        return torch.quantile(out, quantile, dim=0).float()
    flat = out.transpose(0, 1).reshape(out.shape[1], -1)
    return torch.quantile(flat, quantile, dim=1).float().view(-1, *([1] * (out.ndim - 2)))


class ActivationClip(CleanDataDefence):
    """Activation clipping on the server at the end of the rounds in ``at`` (module docstring). FedLoop only: under
    ``lightning.Trainer`` it does nothing.

    Round metrics at a step: ``clip_acc_before`` and ``clip_acc_after`` (clean held-out accuracy of the global model
    in eval mode before and after clipping). Each step re-measures the bounds on the current global model, replaces
    the previous step's and writes them to the run folder (``activation_clip.safetensors``).

    Example::

        clean = PublicData(num_samples=500, seed=7, labeled=True)
        clip = ActivationClip(clean=clean, layers=["conv1", "conv2", "conv3"], quantile=0.995)
        loop = FedLoop(..., callbacks=[clip, Backdoor(...)])
        result = loop.fit(model, dm)  # model now clips in eval mode; clip.bounds holds the bounds
        deployed = MNIST1DCNN()
        deployed.load_state_dict(load_file(result.run_dir / "final.safetensors"))
        install_clips(deployed, load_file(result.run_dir / "activation_clip.safetensors"))

    Args:
        clean: the server's clean data, a labelled :class:`~lightning_fed.data.PublicData`.
        layers: the submodules whose outputs are clipped, in forward order (typically every Conv / Linear followed
            by a ReLU).
        quantile: the clean outputs' quantile each bound is, in ``(0, 1]`` (1: the clean maximum).
        per_position: one bound per channel and position (``False``: per channel, over all positions).
        at: 0-based rounds at whose end a step runs (an int or a list); ``None``: the run's last round.
        holdout: share of the clean data held out to measure clean accuracy on (the bounds come from the rest), in
            ``[0, 1)``.
        seed: seed of the clean split.
    """

    owner = "ActivationClip"
    stream = Stream.ACTIVATION_CLIP
    prefix = "clip"

    def __init__(
        self,
        clean: PublicData,
        layers: list[str],
        quantile: float = 1.0,
        per_position: bool = True,
        at: int | list[int] | None = None,
        holdout: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(clean, at, holdout, 0, 0.01, 0.0, 1, seed)
        need(
            "ActivationClip",
            isinstance(layers, list | tuple)
            and bool(layers)
            and all(isinstance(n, str) and n for n in layers),
            "layers",
            layers,
            "a non-empty list of submodule names (e.g. ['conv1', 'conv2', 'conv3'])",
        )
        need(
            "ActivationClip",
            len(set(layers)) == len(layers),
            "layers",
            layers,
            "a list without repeated names",
        )
        need(
            "ActivationClip",
            0 < quantile <= 1,
            "quantile",
            quantile,
            "in (0, 1]",
        )
        self.layers = list(layers)
        self.quantile = float(quantile)
        self.per_position = per_position
        self.bounds: Bounds = {}
        self._model: nn.Module | None = None

    def _check_layers(self, model: nn.Module) -> None:
        names = dict(model.named_modules())
        bad = [n for n in self.layers if n not in names or n == ""]
        need(
            "ActivationClip",
            not bad,
            "layers",
            self.layers,
            f"names of submodules of {type(model).__name__} ({bad} are not): one of "
            f"{[n for n, m in names.items() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear)]}",
        )

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check that ``layers`` name submodules; keep the model to re-install restored bounds on."""
        self._check_layers(pl_module)
        self._model = pl_module

    def measure(self, model: nn.Module, x: Tensor) -> Bounds:
        """The bounds of ``model``'s layers on the records ``x``, measured layer by layer with the earlier layers
        clipped (installed on ``model`` as they are found; the previous clips are removed first)."""
        self._check_layers(model)
        remove_clips(model)
        bounds: Bounds = {}
        for name in self.layers:
            bounds[name] = clip_bounds(layer_output(model, name, x), self.quantile, self.per_position)
            install_clips(model, bounds)
        return bounds

    def defend(self, trainer: Any, pl_module: nn.Module, server_round: int) -> dict[str, Any]:
        """Measure the bounds on the clean training part and clip ``pl_module`` with them."""
        xt, _, _, _ = self.data()
        xe, ye = self.eval_part()
        remove_clips(pl_module)
        before = accuracy(pl_module, xe, ye)
        self.bounds = self.measure(pl_module, xt)
        fed = fed_context(trainer)
        if fed is not None and getattr(trainer, "is_global_zero", True):  # every rank replays; rank 0 writes
            save_bounds(self.bounds, Path(fed.run_dir) / BOUNDS_FILE)
        return {"acc_before": before, "acc_after": accuracy(pl_module, xe, ye), "quantile": self.quantile}

    def install(self, model: nn.Module) -> None:
        """Clip ``model`` (e.g. a deployed copy of the global model) with the bounds found."""
        self._check_layers(model)
        install_clips(model, self.bounds)

    def state_dict(self) -> dict[str, Any]:
        """The rounds done, their records and the bounds."""
        return {**super().state_dict(), "bounds": {k: v.clone() for k, v in self.bounds.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rounds done, their records and the bounds; re-install the bounds on the run's model."""
        super().load_state_dict(state)
        self.bounds = {str(k): v.clone() for k, v in state.get("bounds", {}).items()}
        if self._model is not None and self.bounds:
            install_clips(self._model, self.bounds)


__all__ = [
    "BOUNDS_FILE",
    "ActivationClip",
    "ClipHook",
    "clip_bounds",
    "install_clips",
    "layer_output",
    "remove_clips",
    "save_bounds",
]
