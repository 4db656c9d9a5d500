"""Seeds of a federated run: every random choice depends only on (seed, round, client), so a resumed run
repeats an uninterrupted one exactly."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum, unique

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (used per round and per client)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@unique
class Stream(IntEnum):
    """Tags of the private random streams, the second part of every :func:`generator` call.

    ``generator(seed, Stream.X, *keys)``: the tag keeps two uses of the same (seed, round) apart, and one list
    keeps the tags unique across the package. Give a stream at least one key: the client sampler seeds round ``r``
    with the untagged ``(seed, r)``, so a key-less ``(seed, Stream.X)`` is round ``X``'s sample seed (the fixed
    malicious set once was, and round 13 then sampled the malicious clients first).
    """

    FEDMD_SUBSET = 1
    """FedMD's public subset of a round (keys: round)."""
    FEDMD_TRANSFER = 2
    """FedMD's transfer-learning batches (keys: tier)."""
    NFDP_SUBSET = 3
    """FedMD-NFDP: a client's private subset (keys: client id)."""
    FEDDF_PROXY = 4
    """FedDF's proxy subset of a round (keys: round)."""
    FEDDF_DISTILL = 5
    """FedDF's distillation batches (keys: round, tier)."""
    FEDGKT_SERVER = 6
    """FedGKT's server-side training batches (keys: round)."""
    FEDGEN_GENERATOR = 7
    """FedGen's generator training draws (keys: round)."""
    DDIST_GRAPH = 8
    """D-Dist's random regular graph (keys: number of clients, degree)."""
    DIGEST = 9
    """ConsensusDigest's batch order on a client (keys: round)."""
    WEAK_DP = 10
    """WeakDP's noise on the aggregate (keys: a fingerprint of the round's updates)."""
    FLAME_NOISE = 11
    """FLAME's noise on the aggregate (keys: a fingerprint of the round's updates)."""
    ATTACK_CLIENTS = 12
    """Which clients are malicious (keys: none for a fixed set, round when drawn per round)."""
    ATTACK_NOISE = 13
    """A Gaussian attacker's update (keys: round, client id)."""
    ATTACK_DIRECTION = 14
    """The direction shared by the malicious clients of a round ("a little is enough"; keys: round)."""
    BACKDOOR_POISON = 15
    """Which records of a malicious client carry the backdoor trigger (keys: round, client id)."""
    FINE_PRUNING = 16
    """Fine-pruning's split of the clean data (no keys) and its fine-tuning batches (keys: round)."""
    NAD = 17
    """Neural attention distillation's split of the clean data (no keys) and its batches (keys: round)."""
    MCR = 18
    """Mode connectivity repair's split of the clean data (no keys), its batches and curve points (keys: round)."""
    PERSONAL_SPLIT = 19
    """A client's held-out split for personalized evaluation (keys: client)."""
    PERSONAL_FT = 20
    """Fine-tuning batches of personalized evaluation (keys: round, client)."""
    DITTO = 21
    """Ditto's personal-model batches (keys: round, client)."""
    STRAGGLERS = 22
    """Which of a round's clients straggle, and how much work each does (keys: round)."""
    FLTRUST_ROOT = 23
    """FLTrust's server update: its root batches and torch's generator during it (keys: round)."""
    IBAU = 24
    """I-BAU's split of the clean data (no keys) and its batches (keys: round)."""
    ANP = 25
    """Adversarial neuron pruning's split of the clean data (no keys), its batches and perturbations (keys: round)."""
    ACTIVATION_CLIP = 26
    """Activation clipping's split of the clean data (no keys)."""
    TRIGGER_UNLEARN = 28
    """Trigger inversion and unlearning's split of the clean data (no keys), its inversions' starting points and
    its unlearning batches (keys: round)."""
    FRESH_DISTILL = 29
    """Distillation into a fresh model: the split of the clean data (no keys), the batches and augmentations, the
    student's initialisation (keys: round)."""
    SEAM = 30
    """SEAM's split of the clean data (no keys), its random labels and batches (keys: round)."""
    SYSTEMS_PROFILES = 41
    """Client device and network profiles drawn from a preset (keys: number of clients)."""
    SYSTEMS_DROPOUT = 42
    """Whether a sampled client drops out of a round (keys: round, client id)."""
    CCVR = 43
    """CCVR's virtual features and head-training batches (keys: round)."""


def generator(*parts: int) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``parts``.

    The one way lightning_fed keys a private stream of randomness (a public subset, a proxy batch, a client's
    own draw) by what it is for: ``generator(seed, Stream.FEDDF_PROXY, server_round)``. The numbers depend only
    on the parts, never on the global RNG state or on who asks first.

    Args:
        parts: integers identifying the stream: the run seed, a :class:`Stream` tag, then its keys (round,
            client id, tier...).

    Returns:
        A new generator; two calls with the same parts give the same sequence.
    """
    return torch.Generator().manual_seed(derive_seed(*(int(p) for p in parts)))


def seed_rngs(seed: int) -> None:
    """Seed torch's CPU generator (and CUDA's, once initialised) and Python's ``random``.

    Cheaper than ``torch.manual_seed``, which formats a stack trace to queue a lazy CUDA seeding on every
    call before CUDA is initialised (milliseconds, once per client per round).
    """
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    random.seed(seed)


@contextmanager
def rng_untouched() -> Iterator[None]:
    """Restore torch's CPU generator, Python's ``random`` and NumPy's global state on exit.

    ``prepare_data`` runs on one process per node and may draw from the global generators when it generates data
    (and not when a cache exists): around it, the training's random state stays the same on every process and
    in every run.
    """
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


__all__ = ["Stream", "derive_seed", "generator", "rng_untouched", "seed_rngs"]
