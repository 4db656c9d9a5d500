"""Atomic checkpoints of the whole federated state, and finding the one to resume from.

Layout under a run folder::

    checkpoints/round-000010/state.pt     # loop, strategy, codec, callbacks, RNG, history
    checkpoints/round-000010/clients/     # snapshot of the client store (each client's own state)
    checkpoints/round-000010/senders/     # snapshot of the server's per-sender state (codec references)
    checkpoints/last                      # text file naming the newest complete checkpoint

A checkpoint is written into ``round-XXXXXX.partial`` and renamed when complete; ``last`` is replaced
atomically afterwards. A process killed at any moment leaves either the old or the new checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lightning_fed.store import ClientStore, atomic_torch_save


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
    """Resolve a run folder, its ``checkpoints`` folder or a checkpoint folder to a checkpoint folder."""
    path = Path(path)
    candidates = [path, path / "checkpoints"]
    for c in candidates:
        if (c / "state.pt").is_file():
            return c
        last = c / "last"
        if last.is_file():
            ckpt = c / last.read_text().strip()
            if (ckpt / "state.pt").is_file():
                return ckpt
    raise CheckpointError(f"no checkpoint found at {path} (looked for state.pt and checkpoints/last)")


def load_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Load a checkpoint's state with ``weights_only=True`` (no arbitrary code from the file)."""
    return torch.load(Path(ckpt) / "state.pt", weights_only=True)
