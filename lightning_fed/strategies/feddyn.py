"""FedDyn: federated learning with a dynamic regularizer per client.

Acar, Zhao, Matas Navarro, Mattina, Whatmough & Saligrama, "Federated Learning Based on Dynamic Regularization",
ICLR 2021, Algorithm 1. Each client ``k`` keeps a gradient state ``h_k`` (zero at first). A sampled client starts
from the server model ``θ`` and minimises::

    L_k(w) - <h_k, w> + α/2 ||w - θ||²        so every gradient becomes  g - h_k + α (w - θ)

ending at ``θ_k``; its state then follows the first-order condition of that minimum::

    h_k <- h_k - α (θ_k - θ)

The server, with ``P`` the round's replies and ``N`` all clients, keeps ``h`` (the mean of every ``h_k``) and sets::

    h <- h - (α / N) sum_{k in P} (θ_k - θ)
    θ <- (1/|P|) sum_{k in P} θ_k - h / α

(the paper's plain mean over the replies). When the local problems are solved, the dynamic terms make a point where
clients agree a stationary point of the global loss: the clients' drift at strong heterogeneity is corrected
without sending anything but weights. The paper's ``α`` is in {0.1, 0.01, 0.001}.

The paper's analysis follows the plain mean of the round's client models ``γ = (1/|P|) sum_{k in P} θ_k = θ + h / α``
rather than ``θ``, and the authors' code reports it; ``evaluate_mean=True`` makes ``γ`` the model the loop evaluates
and returns while the clients keep training from ``θ`` (``γ`` follows from ``θ`` and ``h``, up to rounding: nothing
more is checkpointed).

Where things live: ``h`` is server state (:meth:`FedDyn.state_dict`); ``h_k`` is in the client's store
(``trainer.fed.client_state["feddyn_h"]``), checkpointed with it; the gradient term is the client callback
:class:`FedDynClient`, so the module's ``training_step`` and optimizer are unchanged (the update of ``h_k`` follows
from the minimum, whatever optimizer found it). Messages are FedAvg's: the global weights down, the weight delta
``θ_k - θ`` up. ``h`` and ``h_k`` exist for trainable float parameters only (buffers such as BatchNorm statistics
have no gradient: they are averaged as FedAvg does).

A reply the server drops (validation, a callback) leaves that client's new ``h_k`` stored while ``h`` misses its
delta, as a lost message would in a deployment. A change of the model's structure on the server (pruning) resets
``h``, and clients reset a stored ``h_k`` of another shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.context import fed_context
from lightning_fed.protocol import Instruction, Payload, Reply
from lightning_fed.strategies.aggregate import flat_norm
from lightning_fed.strategies.aggregators import UniformMean
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.validation import need
from lightning_fed.weights import load_into

STATE_KEY = "feddyn_h"  # the client's gradient state in its store


def check_alpha(owner: str, alpha: float) -> float:
    """``alpha`` as a float; ``ValueError`` (naming ``owner``) unless it is a number > 0."""
    need(
        owner,
        isinstance(alpha, int | float) and not isinstance(alpha, bool) and alpha > 0,
        "alpha",
        alpha,
        "a number > 0 (the paper: 0.1, 0.01 or 0.001)",
    )
    return float(alpha)


class FedDynClient(FedCallback):
    """Client side of FedDyn: adds ``α (w - θ) - h_k`` to every gradient before the optimizer steps; after local
    training stores ``h_k - α (θ_k - θ)`` in the client's state.

    Installed by :class:`FedDyn` (``FedDyn.client_callbacks()``); ``θ`` is the instruction's weights. It does
    nothing under a plain ``lightning.Trainer`` (no ``trainer.fed``, no client store).

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=30, strategy=FedDyn(alpha=0.01))  # installs it

    Args:
        alpha: the regularizer's coefficient ``α`` > 0.
    """

    def __init__(self, alpha: float = 0.01) -> None:
        self.alpha = check_alpha("FedDynClient", alpha)
        self._active = False
        self._names: list[str] = []
        self._params: list[Tensor] = []
        self._theta: list[Tensor] = []
        self._h: list[Tensor] = []

    def on_client_start(self, trainer: Any, pl_module: Any, instruction: Instruction) -> None:
        """Read ``θ`` (the instruction's weights of every trainable parameter) and ``h_k`` from the client's store
        (zero at first, or when its names or shapes no longer match the model's)."""
        ctx = fed_context(trainer)
        self._active = ctx is not None
        if ctx is None:
            return
        payload = instruction.payload
        params = dict(
            trainer.lightning_module.named_parameters()
        )  # the working module (tiers: not pl_module)
        self._names = [n for n, p in params.items() if p.requires_grad and n in payload]
        self._params = [params[n] for n in self._names]
        self._theta = [
            payload[n].detach().to(device=p.device, dtype=p.dtype) for n, p in zip(self._names, self._params)
        ]
        stored = ctx.client_state.get(STATE_KEY) or {}
        fits = list(stored) == self._names and all(
            stored[n].shape == p.shape for n, p in zip(self._names, self._params)
        )
        h = [stored[n] for n in self._names] if fits else [torch.zeros(p.shape) for p in self._params]
        self._h = [t.to(device=p.device, dtype=p.dtype) for t, p in zip(h, self._params)]

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer
    ) -> None:
        """``g <- g - h_k + α (w - θ)`` for every trainable parameter this optimizer steps (a parameter without a
        gradient gets the terms alone)."""
        if not self._active:
            return
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for p, theta, h in zip(self._params, self._theta, self._h):
            if id(p) not in stepped:  # another optimizer's parameter (manual optimization with several)
                continue
            term = (p.detach() - theta).mul_(self.alpha).sub_(h)
            if p.grad is None:
                p.grad = term
            else:
                p.grad.add_(term)

    @torch.no_grad()
    def on_client_end(self, trainer: Any, pl_module: Any, reply: Reply) -> None:
        """``h_k <- h_k - α (θ_k - θ)`` into the client's store (float32, on the CPU)."""
        ctx = fed_context(trainer)
        if not self._active or ctx is None:
            return
        ctx.client_state[STATE_KEY] = {
            n: (h - (p.detach() - theta).mul_(self.alpha)).float().cpu()
            for n, p, theta, h in zip(self._names, self._params, self._theta, self._h)
        }
        self._active = False
        self._params, self._theta, self._h = [], [], []  # no reference to the working model after the client

    def __repr__(self) -> str:
        return f"FedDynClient(alpha={self.alpha})"


class _FederationSize(FedCallback):
    """Server side, at set-up: hands FedLoop's ``num_clients`` (``N`` of the update of ``h``) to the strategy."""

    def __init__(self, strategy: FedDyn) -> None:
        self.strategy = strategy

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Read ``trainer.fed.num_clients``."""
        ctx = fed_context(trainer)
        if ctx is not None:
            self.strategy.num_clients = ctx.num_clients


class FedDyn(FedAvg):
    """FedDyn: the plain mean of the client models corrected by the server state ``h``, with the dynamic
    regularizer on the clients (:class:`FedDynClient`).

    ``N``, the number of clients in ``h -= (α / N) sum_k (θ_k - θ)``, is FedLoop's ``num_clients`` (read at set-up;
    set ``num_clients`` yourself to use the strategy outside FedLoop).

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=30, local_epochs=5, strategy=FedDyn(alpha=0.01))
        loop.fit(MNIST1DCNN(), MNIST1DDataModule())

    Args:
        alpha: the regularizer's coefficient ``α`` > 0 (the paper: 0.1, 0.01 or 0.001); larger keeps the clients
            nearer the server model.
        evaluate_mean: evaluate (and return) ``γ = θ + h / α``, the plain mean of the last round's client models
            (what the paper's analysis follows and its code reports), instead of the server model ``θ``.
    """

    def __init__(self, *, alpha: float = 0.01, evaluate_mean: bool = False) -> None:
        self.alpha = check_alpha("FedDyn", alpha)
        self.evaluate_mean = evaluate_mean
        self.client = FedDynClient(self.alpha)
        super().__init__(aggregator=UniformMean())
        self.num_clients: int | None = None
        self.h: Tensor | None = None
        self._mask: Tensor | None = None  # 1 on trainable entries, 0 on buffers; None when every entry trains
        self._trainable: set[str] = set()

    def setup(self, model: nn.Module) -> None:
        """FedAvg's global buffer, and ``h = 0`` (its entries for buffers stay 0)."""
        self._trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        super().setup(model)

    def setup_state(self, state: Payload) -> None:
        """FedAvg's buffers from the federated weights; ``h`` reset to 0."""
        super().setup_state(state)
        spec, _ = self._require_setup()
        self.h = torch.zeros(spec.numel)
        if all(n in self._trainable for n in spec.names):
            self._mask = None
        else:
            self._mask = torch.zeros(spec.numel)
            for view, name in zip(spec.unflatten(self._mask).values(), spec.names):
                if name in self._trainable:
                    view.fill_(1.0)

    def client_callbacks(self) -> list[Any]:
        """The dynamic regularizer on the clients; the federation's size for the server."""
        return [self.client, _FederationSize(self), *super().client_callbacks()]

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """``h -= (α / N) * |P| * mean(Δ_k)`` on the trainable entries, then ``θ += mean(Δ_k) - h / α`` (the mean
        over the replies is plain); the metrics report ``update_norm`` and ``h_norm``.

        Raises:
            RuntimeError: ``num_clients`` is unknown (the strategy runs outside FedLoop and it was not set).
        """
        spec, flat = self._require_setup()
        assert self._acc is not None and self._tmp is not None and self.h is not None
        n = self.num_clients
        if n is None:
            raise RuntimeError(
                "FedDyn.num_clients is not set: FedLoop sets it at set-up; set it to the number of "
                "clients when using the strategy on its own"
            )
        weights = [1.0 / len(replies)] * len(replies)
        update = self.aggregator.aggregate_payloads(
            self._acc, spec, (r.payload for r in replies), weights, self._tmp
        )
        scale = -self.alpha * len(replies) / n
        if self._mask is None:
            self.h.add_(update, alpha=scale)
        else:
            self.h.addcmul_(update, self._mask, value=scale)
        flat.add_(update).sub_(self.h, alpha=1.0 / self.alpha)
        return {"update_norm": flat_norm(update), "h_norm": flat_norm(self.h)}

    def load_global(self, model: nn.Module) -> None:
        """The server model ``θ``, or with ``evaluate_mean`` the mean of the last round's client models
        ``θ + h / α``, into ``model``."""
        if not self.evaluate_mean:
            super().load_global(model)
            return
        spec, flat = self._require_setup()
        assert self._tmp is not None and self.h is not None
        torch.add(flat, self.h, alpha=1.0 / self.alpha, out=self._tmp)
        load_into(model, spec.unflatten(self._tmp))

    def state_dict(self) -> dict[str, Any]:
        """FedAvg's state and the server state ``h``."""
        assert self.h is not None
        return {**super().state_dict(), "h": self.h.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (FedAvg's checks the layout)."""
        super().load_state_dict(state)
        assert self.h is not None
        if state["h"].numel() != self.h.numel():
            raise ValueError(
                "FedDyn checkpoint's server state h does not match the model's federated weights"
            )
        self.h.copy_(state["h"])


__all__ = ["FedDyn", "FedDynClient", "check_alpha"]
