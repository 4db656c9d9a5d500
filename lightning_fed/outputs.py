"""Where a run writes: the ``version_N`` run folder, the checkpoint to resume from, the Lightning loggers,
and the final outputs (weights, history, plot, summary table)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from safetensors.torch import save_file
from torch import nn

from lightning_fed.checkpoint import CheckpointError, find_intact_checkpoint
from lightning_fed.identity import LEGACY_KEYS, check_identity
from lightning_fed.report import plot_history, summary_table, write_history
from lightning_fed.weights import float_state

log = logging.getLogger("lightning_fed")

LOGGERS = ("csv", "tensorboard")


def new_run_dir(output_dir: str | Path) -> Path:
    """The next unused ``output_dir/version_N``."""
    root = Path(output_dir)
    versions = [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return root / f"version_{max(versions, default=-1) + 1}"


def resolve_resume(output_dir: str | Path, resume: str | Path | None,
                   identity: Mapping[str, Any] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint folder ``resume`` names, and its loaded state (read once: the caller restores from it):
    ``None`` for no resume; ``"last"`` (the newest run under ``output_dir`` that has a checkpoint), a run folder
    or a checkpoint folder. In a run folder the newest intact checkpoint is used (damaged ones are skipped with a
    warning).

    Nothing is written: when ``identity`` (:func:`lightning_fed.identity.run_identity` of the run being started)
    is given, it is compared with the checkpoint's, so that a mismatched run is refused before it touches the
    run folder.

    Raises:
        CheckpointError: no (intact) checkpoint where ``resume`` points.
        ResumeMismatch: the checkpoint was made by a run with other settings (each difference named).
    """
    if resume is None:
        return None
    if str(resume) == "last":
        root = Path(output_dir)
        runs = sorted(
            (p for p in root.glob("version_*")
             if re.fullmatch(r"version_\d+", p.name) and _has_checkpoints(p / "checkpoints")),
            key=lambda p: int(p.name.split("_")[1]),
        )
        if not runs:
            raise CheckpointError(f"resume='last': no run with a checkpoint under {root}")
        resume = runs[-1]
    ckpt, state = find_intact_checkpoint(resume)
    if identity is not None:
        saved = state.get("identity")
        if saved is None:  # written before identities were recorded: only what it kept can be compared
            log.warning("checkpoint %s records no run identity: only %s are checked", ckpt, ", ".join(LEGACY_KEYS))
            saved = {k: state[k] for k in LEGACY_KEYS if k in state}
        check_identity(saved, identity, ckpt)
    return ckpt, state


def _has_checkpoints(root: Path) -> bool:
    return (root / "last").is_file() or any(p.is_dir() and not p.name.endswith(".partial")
                                            for p in root.glob("round-*"))


def make_loggers(names: list[str], run_dir: Path) -> list[Any]:
    """Lightning loggers for ``names`` (any of :data:`LOGGERS`) writing under ``run_dir``; TensorBoard is
    skipped with a debug message when it is not installed. The CSV logger is ``lightning.Trainer``'s (its
    ``log_hyperparams``, which a module may call as ``self.logger.log_hyperparams``, writes ``hparams.yaml``;
    Fabric's raises ``NotImplementedError``)."""
    out: list[Any] = []
    if "csv" in names:
        from lightning.pytorch.loggers import CSVLogger

        out.append(CSVLogger(save_dir=str(run_dir), name="logs"))
    if "tensorboard" in names:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            log.debug("tensorboard not installed: TensorBoard logging skipped")
        else:
            from lightning.fabric.loggers import TensorBoardLogger

            out.append(TensorBoardLogger(root_dir=str(run_dir), name="tensorboard"))
    return out


def save_weights(model: nn.Module, path: Path) -> None:
    """Write the model's float state entries (float32, on the CPU) as safetensors at ``path`` (a temporary file
    renamed over it: a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in float_state(model).items()}, str(tmp))
    os.replace(tmp, path)


def write_outputs(model: nn.Module, history: list[dict[str, float]], run_dir: Path, console: Console,
                  plot: bool) -> None:
    """Write ``final.safetensors``, ``history.json`` and (``plot``) ``accuracy.png``; print the summary."""
    save_weights(model, run_dir / "final.safetensors")
    write_history(history, run_dir / "history.json")
    if plot:
        plot_history(history, run_dir / "accuracy.png", title=type(model).__name__)
    if not console.quiet:  # a quiet console still renders what it is given
        console.print(summary_table(history))
        console.print(f"outputs in [bold]{run_dir}[/bold]")


__all__ = ["LOGGERS", "make_loggers", "new_run_dir", "resolve_resume", "save_weights", "write_outputs"]
