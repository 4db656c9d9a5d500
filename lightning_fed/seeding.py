"""Seeds of a federated run: every random choice depends only on (seed, round, client), so a resumed run
repeats an uninterrupted one exactly."""

from __future__ import annotations

import hashlib
import random

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (used per round and per client)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_rngs(seed: int) -> None:
    """Seed torch's CPU generator (and CUDA's, once initialised) and Python's ``random``.

    Cheaper than ``torch.manual_seed``, which formats a stack trace to queue a lazy CUDA seeding on every
    call before CUDA is initialised (milliseconds, once per client per round).
    """
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    random.seed(seed)


__all__ = ["derive_seed", "seed_rngs"]
