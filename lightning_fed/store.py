"""Per-client state (codec residuals, optimizer state, callback state) kept on disk between rounds.

Only the clients active in the current round are in memory: 10,000 clients cost disk, not RAM. Files are
written atomically (temp file + ``os.replace``), so a checkpoint can snapshot the store with hard links:
later writes replace the directory entry and never touch the snapshot's inode.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one writer per process, even on a shared folder
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ClientStore:
    """A folder of per-client state files, ``client-<id>.pt``, loaded only while a client is active.

    Args:
        root: the folder; created if missing.
        shared: other processes write to the folder too (a multi-process run: each rank saves the clients it
            trained): look for a client's file on every load instead of trusting this process's index.
    """

    def __init__(self, root: str | Path, shared: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.shared = shared
        self._stored = self._scan()  # ids with a file: saves a stat per client per round

    def _scan(self) -> set[int]:
        return {int(p.stem.split("-", 1)[1]) for p in self.root.glob("client-*.pt")}

    def _path(self, client_id: int) -> Path:
        return self.root / f"client-{int(client_id)}.pt"

    def load(self, client_id: int) -> dict[str, Any]:
        """The client's state (an empty dict for a client never seen); loaded with ``weights_only=True``."""
        if self.shared:
            try:
                return torch.load(self._path(client_id), weights_only=True)
            except FileNotFoundError:
                return {}
        if client_id not in self._stored:
            return {}
        return torch.load(self._path(client_id), weights_only=True)

    def save(self, client_id: int, state: dict[str, Any]) -> None:
        """Persist the client's state (atomically); an empty state removes the file."""
        if state:
            atomic_torch_save(state, self._path(client_id))
            self._stored.add(client_id)
        elif client_id in self._stored or self.shared:
            self._path(client_id).unlink(missing_ok=True)
            self._stored.discard(client_id)

    def ids(self) -> list[int]:
        """Clients that have stored state."""
        return sorted(self._scan() if self.shared else self._stored)

    def snapshot(self, dest: str | Path) -> None:
        """Hard-link (or copy, across file systems) every state file into ``dest``."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for p in self.root.glob("client-*.pt"):
            try:
                os.link(p, dest / p.name)
            except OSError:
                shutil.copy2(p, dest / p.name)

    def restore(self, src: str | Path) -> None:
        """Replace the store's content with the snapshot in ``src``."""
        for p in self.root.glob("client-*.pt"):
            p.unlink()
        src = Path(src)
        if src.exists():
            for p in src.glob("client-*.pt"):
                shutil.copy2(p, self.root / p.name)
        self._stored = self._scan()
