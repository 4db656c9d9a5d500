"""Privacy accounting for the differentially private mechanisms (central DP-FedAvg, local DP, DP-SGD), through
Opacus' accountants (Rényi DP, Mironov 2017; privacy random variables, Gopi et al. 2021), never hand-written bounds.

Every mechanism here is a (sub)sampled Gaussian mechanism: per step, a noise multiplier ``z`` (noise standard
deviation over the L2 sensitivity) and a sampling rate ``q``. :class:`PrivacyAccountant` keeps the history of
``(z, q, steps)`` (Opacus' own format), reports epsilon at a delta, and checkpoints the history, so a resumed run
reports the same epsilon. Opacus is the optional extra ``privacy`` (``pip install lightning-fed[privacy]``).
"""

from __future__ import annotations

import math
from typing import Any

from lightning_fed.validation import need

ACCOUNTANTS = ("rdp", "prv")


def _opacus_accountant(kind: str) -> Any:
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "differential privacy needs Opacus: pip install 'lightning-fed[privacy]' "
            "(or pip install opacus --no-deps opt-einsum)"
        ) from err
    return RDPAccountant() if kind == "rdp" else PRVAccountant()


class PrivacyAccountant:
    """Tracks the privacy loss of a sequence of sampled Gaussian mechanisms with an Opacus accountant.

    Example::

        acc = PrivacyAccountant("rdp")
        acc.step(noise_multiplier=1.0, sample_rate=0.1, steps=100)
        acc.epsilon(delta=1e-5)                      # about 7.9, what opacus.accountants.RDPAccountant says
        PrivacyAccountant.planned("rdp", 1.0, 0.1, 100, 1e-5)  # the same, without keeping a history

    Args:
        kind: ``"rdp"`` (Opacus ``RDPAccountant``) or ``"prv"`` (``PRVAccountant``).
    """

    def __init__(self, kind: str = "rdp") -> None:
        need("PrivacyAccountant", kind in ACCOUNTANTS, "accountant", kind, f"one of {ACCOUNTANTS}")
        self.kind = kind
        self._acc = _opacus_accountant(kind)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The ``(noise_multiplier, sample_rate, steps)`` entries, as Opacus keeps them."""
        return [(float(z), float(q), int(n)) for z, q, n in self._acc.history]

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` releases of a Gaussian mechanism with ``noise_multiplier``, each on a sample drawn with
        probability ``sample_rate`` (1.0: no amplification by sampling)."""
        for _ in range(steps):
            self._acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of everything recorded (0 before any step; ``inf`` once a step had no noise)."""
        if not self._acc.history:
            return 0.0
        if any(z <= 0 for z, _, _ in self._acc.history):
            return math.inf
        return float(self._acc.get_epsilon(delta=delta))

    @staticmethod
    def planned(kind: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """Epsilon at ``delta`` after ``steps`` identical releases, from a fresh accountant."""
        acc = PrivacyAccountant(kind)
        if steps > 0:  # Opacus merges equal consecutive steps: one history entry of ``steps``
            acc._acc.history = [(noise_multiplier, sample_rate, steps)]
        return acc.epsilon(delta)

    def state_dict(self) -> dict[str, Any]:
        """The accountant kind and its history (plain numbers: loads with ``weights_only=True``)."""
        return {"kind": self.kind, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the kind must match)."""
        if state["kind"] != self.kind:
            raise ValueError(f"PrivacyAccountant: checkpoint accountant {state['kind']!r} != {self.kind!r}")
        self._acc.history = [(float(z), float(q), int(n)) for z, q, n in state["history"]]

    def __repr__(self) -> str:
        return f"PrivacyAccountant({self.kind!r})"


def check_privacy_args(
    owner: str, noise_multiplier: float, delta: float | None, target_epsilon: float | None, accountant: str
) -> None:
    """The checks every DP mechanism shares: ``noise_multiplier >= 0``, ``0 < delta < 1`` (or ``None``),
    ``target_epsilon > 0`` (or ``None``), a known accountant."""
    need(
        owner,
        isinstance(noise_multiplier, int | float) and noise_multiplier >= 0,
        "noise_multiplier",
        noise_multiplier,
        ">= 0 (0: no noise, epsilon is infinite)",
    )
    need(owner, delta is None or 0 < delta < 1, "delta", delta, "in (0, 1), or None for 1 / N^1.1")
    need(owner, target_epsilon is None or target_epsilon > 0, "target_epsilon", target_epsilon, "> 0 or None")
    need(owner, accountant in ACCOUNTANTS, "accountant", accountant, f"one of {ACCOUNTANTS}")


def default_delta(population: int) -> float:
    """``1 / N^1.1``: the customary delta for a population of ``N`` (users, or records), below ``1 / N``."""
    return 1.0 / max(population, 2) ** 1.1


__all__ = ["ACCOUNTANTS", "PrivacyAccountant", "check_privacy_args", "default_delta"]
