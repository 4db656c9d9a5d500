"""Atomic checkpoints of the whole federated state, and finding the one to resume from.

Layout under a run folder::

    checkpoints/round-000010/state.pt     # loop, strategy, codec, callbacks, RNG, history
    checkpoints/round-000010/clients/     # snapshot of the client store (each client's own state)
    checkpoints/round-000010/senders/     # snapshot of the server's per-sender state (codec references)
    checkpoints/last                      # text file naming the newest complete checkpoint

A checkpoint is written into ``round-XXXXXX.partial`` and renamed when complete; ``last`` is replaced
atomically afterwards. A process killed at any moment leaves either the old or the new checkpoint. A checkpoint
damaged afterwards (a truncated or garbled ``state.pt``, a missing ``clients/``, ``last`` naming a folder that is
gone) is skipped with a logged warning when resuming a run folder: the newest intact one is used.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lightning_fed.store import ClientStore, atomic_torch_save

log = logging.getLogger("lightning_fed")


class CheckpointError(FileNotFoundError):
    """No usable checkpoint where one was asked for."""


def save_checkpoint(run_dir: Path, server_round: int, state: dict[str, Any], stores: dict[str, ClientStore],
                    keep: int) -> Path:
    """Write the checkpoint for the completed ``server_round`` (0-based), with a snapshot of each store in the
    folder of its name, and prune old ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{server_round + 1:06d}"
    final = root / name
    partial = root / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    atomic_torch_save(state, partial / "state.pt")
    for folder, store in stores.items():
        store.snapshot(partial / folder)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    tmp = root / ".last.tmp"
    tmp.write_text(name)
    os.replace(tmp, root / "last")
    done = sorted(p for p in root.glob("round-*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a run folder, its ``checkpoints`` folder or a checkpoint folder to a checkpoint folder.

    A checkpoint folder named directly is returned as it is; in a run or ``checkpoints`` folder the newest
    intact checkpoint is chosen (see :func:`find_intact_checkpoint`)."""
    return find_intact_checkpoint(path)[0]


def checkpoint_problem(ckpt: Path) -> tuple[str | None, dict[str, Any] | None]:
    """Why the checkpoint folder ``ckpt`` cannot be resumed from (``None`` if it can), and its loaded state.

    A checkpoint is intact when its ``state.pt`` loads with ``weights_only=True`` into a dict with a ``round`` and
    its ``clients/`` snapshot exists."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return f"{ckpt} does not exist", None
    if not (ckpt / "state.pt").is_file():
        return f"{ckpt / 'state.pt'} is missing", None
    try:
        state = load_checkpoint(ckpt)
    except Exception as err:  # noqa: BLE001 - any unreadable file (truncated zip, garbage, refused pickle) is damage
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"{ckpt / 'state.pt'} cannot be loaded, truncated or corrupt ({type(err).__name__}: {first})", None
    if not isinstance(state, dict) or "round" not in state:
        return f"{ckpt / 'state.pt'} is not a lightning_fed checkpoint (no 'round')", None
    if not (ckpt / "clients").is_dir():
        return f"its client store snapshot {ckpt / 'clients'} is missing", None
    return None, state


def find_intact_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder ``path`` names, and its loaded state.

    ``path`` is a checkpoint folder (used as it is; damage is an error), or a run folder or its ``checkpoints``
    folder: then the checkpoint ``checkpoints/last`` names is tried first and then every ``round-*`` folder from
    the newest; each damaged one is skipped with a logged warning naming it and why.

    Raises:
        CheckpointError: nothing at ``path`` looks like a checkpoint, the named checkpoint is damaged, or no
            checkpoint of the run is intact (each one listed with its problem).
    """
    path = Path(path)
    if (path / "state.pt").is_file() or path.name.startswith("round-"):
        problem, state = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"cannot resume from {path}: {problem}")
        return path, state  # type: ignore[return-value]
    root = path if path.name == "checkpoints" else path / "checkpoints"
    candidates = _candidates(root)
    if not candidates:
        raise CheckpointError(f"no checkpoint found at {path} (looked for state.pt and checkpoints/last)")
    damaged: list[str] = []
    for ckpt in candidates:
        problem, state = checkpoint_problem(ckpt)
        if problem is None:
            if damaged:
                log.warning("resuming from %s instead", ckpt)
            return ckpt, state  # type: ignore[return-value]
        log.warning("checkpoint %s skipped: %s", ckpt.name, problem)
        damaged.append(f"{ckpt.name}: {problem}")
    raise CheckpointError(f"no intact checkpoint in {root}:\n  " + "\n  ".join(damaged))


def _candidates(root: Path) -> list[Path]:
    """Checkpoint folders of ``root`` to try, best first: the one ``last`` names, then ``round-*`` newest first."""
    out: list[Path] = []
    last = root / "last"
    if last.is_file():
        try:
            name = last.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            log.warning("checkpoint pointer %s is unreadable (%s); looking for round-* folders", last, err)
        else:
            if name and "/" not in name and "\\" not in name:
                out.append(root / name)
            else:
                log.warning("checkpoint pointer %s names %r, not a checkpoint folder", last, name)
    rounds = sorted((p for p in root.glob("round-*") if p.is_dir() and not p.name.endswith(".partial")), reverse=True)
    out += [p for p in rounds if p not in out]
    return out


def load_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Load a checkpoint's state with ``weights_only=True`` (no arbitrary code from the file)."""
    return torch.load(Path(ckpt) / "state.pt", weights_only=True)
