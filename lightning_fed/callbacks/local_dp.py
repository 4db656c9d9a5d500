"""Local differential privacy: each client clips its own update and adds Gaussian noise before encoding, so the
server (untrusted) only ever sees a privatised update.

The Gaussian mechanism on a client's whole update (Dwork & Roth 2014, Appendix A; the local model of Kasiviswanathan
et al. 2011): the update is clipped to an L2 bound ``C`` and ``N(0, (z C)^2)`` is added to every coordinate. Any two
updates a client could send differ by at most ``2 C``, so one release is a Gaussian mechanism with noise multiplier
``z / 2``, without amplification by sampling (the server knows who sent it); ``k`` releases compose. Each client
counts its releases in its own state, and the guarantee after them (epsilon at ``delta``, from an Opacus accountant)
travels in its reply's metrics as ``ldp_epsilon`` (FedLoop logs the mean over the round's clients; absent without
noise, where it is infinite) and ``ldp_releases``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from lightning_fed.accounting import PrivacyAccountant, check_privacy_args
from lightning_fed.callbacks.base import FedCallback
from lightning_fed.context import fed_context
from lightning_fed.errors import ClientError
from lightning_fed.protocol import Instruction, Payload, Reply
from lightning_fed.validation import need

log = logging.getLogger("lightning_fed")

OWNER = "LocalDP"


def clip_and_noise(
    payload: Payload, clip_norm: float, std: float, generator: torch.Generator
) -> tuple[Payload, float]:
    """``payload`` scaled to L2 norm at most ``clip_norm`` (all entries together) plus ``N(0, std^2)`` per entry;
    returns the new payload (the entries given are not written) and the norm before clipping."""
    norm = float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in payload.values()]))
    )
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out = {}
    for k, t in payload.items():
        x = t.float() * scale
        if std > 0:
            x = x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        out[k] = x.to(t.dtype)
    return out, norm


class LocalDP(FedCallback):
    """Clip and noise every client's reply payload before it is encoded (local DP, per-client guarantee).

    Example::

        FedLoop(num_clients=100, clients_per_round=10, callbacks=[LocalDP(clip_norm=0.5, noise_multiplier=1.0)])

    Args:
        clip_norm: L2 bound of a client's whole update (> 0).
        noise_multiplier: noise standard deviation over ``clip_norm`` (>= 0).
        delta: delta of the per-client epsilon, in (0, 1).
        target_epsilon: each client's budget (``None``: none): a client whose next release would spend more is
            dropped before it trains (a logged client failure), so it never exceeds the budget; once every sampled
            client is spent the rounds cannot aggregate and the run stops.
        accountant: ``"rdp"`` or ``"prv"`` (Opacus' accountants).
    """

    def __init__(
        self,
        *,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        delta: float = 1e-5,
        target_epsilon: float | None = None,
        accountant: str = "rdp",
    ) -> None:
        need(OWNER, clip_norm > 0, "clip_norm", clip_norm, "> 0")
        check_privacy_args(OWNER, noise_multiplier, delta, target_epsilon, accountant)
        self.clip_norm, self.noise_multiplier = float(clip_norm), float(noise_multiplier)
        self.delta, self.accountant, self.target_epsilon = delta, accountant, target_epsilon

    def epsilon(self, releases: int) -> float:
        """A client's epsilon at ``delta`` after ``releases`` privatised updates (noise multiplier ``z / 2``)."""
        return PrivacyAccountant.planned(
            self.accountant, self.noise_multiplier / 2, 1.0, releases, self.delta
        )

    def on_client_start(self, trainer: Any, pl_module: Any, instruction: Instruction) -> None:
        """Drop the client (before it trains) when its next release would exceed ``target_epsilon``."""
        ctx = fed_context(trainer)
        if self.target_epsilon is None or ctx is None:
            return
        releases = int(ctx.client_state.get("ldp_releases", 0)) + 1
        eps = self.epsilon(releases)
        if eps > self.target_epsilon:
            raise ClientError(
                f"LocalDP: client {ctx.client_id} has spent its budget: release {releases} would reach epsilon "
                f"{eps:.3f} > target_epsilon={self.target_epsilon} at delta={self.delta}; it sends no more updates"
            )

    def on_client_end(self, trainer: Any, pl_module: Any, reply: Reply) -> None:
        """Replace the reply's payload by its clipped, noised copy; count the release and report the epsilon."""
        ctx = fed_context(trainer)
        # the client's own stream: FedLoop seeds it from (seed, round, client) before the client runs
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        reply.payload, _ = clip_and_noise(
            reply.payload, self.clip_norm, self.noise_multiplier * self.clip_norm, gen
        )
        releases = 1
        if ctx is not None:
            releases = int(ctx.client_state.get("ldp_releases", 0)) + 1
            ctx.client_state["ldp_releases"] = releases
        reply.metrics["ldp_releases"] = float(releases)
        eps = self.epsilon(releases)
        if math.isfinite(eps):  # without noise it is infinite, and a reply's metrics must be finite
            reply.metrics["ldp_epsilon"] = eps

    def __repr__(self) -> str:
        return f"LocalDP(clip_norm={self.clip_norm}, noise_multiplier={self.noise_multiplier}, delta={self.delta})"


__all__ = ["LocalDP", "clip_and_noise"]
