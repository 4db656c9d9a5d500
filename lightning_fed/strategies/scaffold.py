"""SCAFFOLD: stochastic controlled averaging, control variates against client drift.

Karimireddy, Kale, Mohri, Reddi, Stich & Suresh, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, Algorithm 1 with option II. The server keeps a control variate ``c`` (one value per trainable
weight), each client ``i`` its own ``c_i`` (zero at first). A sampled client receives the global weights ``x`` and
``c``, and corrects every local gradient::

    g <- g - c_i + c                           (after backward, before the optimizer step)

After its ``K`` local optimizer steps with learning rate ``lr`` it ends at ``y_i`` and updates (option II)::

    c_i+ = c_i - c + (x - y_i) / (K * lr)

then sends ``Δy_i = y_i - x`` and ``Δc_i = c_i+ - c_i``. The server, with ``S`` the replies and ``N`` the clients::

    x <- x + lr_g * mean(Δy_i)                 (the aggregator, a plain mean by default, and the server optimizer)
    c <- c + |S| / N * mean(Δc_i)              (a plain mean: c stays the mean of every c_i)

Settings (the paper's experiments): plain SGD on the clients, ``lr_g = 1``, and option II, which costs no extra
gradient. ``K * lr`` generalises to the client's actual steps: ``(x - y_i) / K lr`` is meant to be the mean of the
corrected gradients the client stepped with, and for ``torch.optim.SGD`` the displacement is linear in those
gradients, ``x - y_i = sum_j w_j (g_j - c_i + c)``, so the denominator used is ``sum_j w_j``: the displacement the
same optimizer, with the same per-step learning rates, would make under a constant unit gradient. Plain SGD gives
``sum_k lr_k`` (``K * lr`` at a constant rate; a scheduler's decay is followed step by step). Momentum ``m`` (with
torch's ``dampening`` and ``nesterov``) gives ``sum_k lr_k * (1 - m^k) / (1 - m)`` without dampening: about
``1 / (1 - m)`` times ``sum_k lr_k``, the factor by which dividing by ``K * lr`` alone would overstate the gradient.
With that denominator ``c_i+`` is exactly the ``w``-weighted mean of the client's raw gradients (the corrections
cancel), as option II's is the plain mean under SGD. The client's momentum buffer must start at zero (FedLoop's
default; ``keep_optimizer_state=True`` carries a stale one in, which is warned about). For other optimizers (Adam,
...) the update is not linear in the gradients: the sum of the learning rates is used and a warning says the
estimate is not exact.

Both means are plain, as in the paper: the corrections pull every client towards the gradient of the unweighted
objective ``(1/N) sum_i f_i`` that ``c`` estimates, so ``x`` averages the same way (default aggregator
:class:`~lightning_fed.strategies.UniformMean`). FedAvg's example-weighted mean for ``x`` (``aggregator=
WeightedMean()``) mixes two objectives; on MNIST-1D at Dirichlet(0.1), where shard sizes differ most, it trained
far worse (benchmarks/RESULTS.md, "Server optimizers and SCAFFOLD").

Where things live: ``c`` is server state (:meth:`Scaffold.state_dict`); ``c_i`` is in the client's store
(``trainer.fed.client_state["scaffold_c"]``), checkpointed with it; the correction is the client callback
:class:`ScaffoldClient`, so the module's ``training_step`` is unchanged. ``c`` travels in the instruction payload
(``c/<name>`` entries, encoded by the downlink codec) and ``Δc_i`` in the reply (``dc/<name>``, encoded by the
uplink codec): both are counted in ``bytes_down`` / ``bytes_up``, twice FedAvg's traffic as in the paper. Variates
exist for trainable float parameters only (not buffers such as BatchNorm statistics, which have no gradient).

A reply the server drops (validation, a callback) leaves that client's new ``c_i`` stored while ``c`` misses its
``Δc_i``, as a lost message would in a deployment. A change of the model's structure on the server (pruning)
resets ``c``, and clients reset a stored ``c_i`` of another shape.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.context import fed_context
from lightning_fed.flat import FlatSpec
from lightning_fed.protocol import Instruction, Payload, PayloadSpec, Reply, TensorSpec
from lightning_fed.strategies.aggregate import flat_norm
from lightning_fed.strategies.aggregators import Aggregator, UniformMean
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.weights import delta, float_state, load_into

VARIATE = "c/"  # the server variate's entries in the instruction payload
VARIATE_DELTA = "dc/"  # the client's variate change in the reply payload
STATE_KEY = "scaffold_c"  # the client's own variate in its store

log = logging.getLogger("lightning_fed")


class ScaffoldClient(FedCallback):
    """Client side of SCAFFOLD: adds ``c - c_i`` to every gradient before the optimizer steps; after local
    training puts ``Δc_i`` in the reply and stores ``c_i+`` in the client's state (option II).

    Installed by :class:`Scaffold` (``Scaffold.client_callbacks()``); it reads the server variate from the
    instruction's ``c/<name>`` entries, so it does nothing for an instruction without them, or under a plain
    ``lightning.Trainer`` (no ``trainer.fed``).

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=50, strategy=Scaffold())  # installs it
    """

    def __init__(self) -> None:
        self._active = False
        self._names: list[str] = []
        self._params: list[Tensor] = []
        self._x: list[Tensor] = []
        self._c: list[Tensor] = []
        self._ci: list[Tensor] = []
        self._corr: list[Tensor] = []
        self._lr_sum: list[float] = []
        self._unit: list[float | None] = []  # per parameter: SGD's momentum buffer under a unit gradient
        self.steps = 0
        self._warned = False

    def on_client_start(self, trainer: Any, pl_module: Any, instruction: Instruction) -> None:
        """Read ``c`` and ``x`` from the instruction and ``c_i`` from the client's store (zero at first, or when
        its shapes no longer match the model's); precompute the correction ``c - c_i``."""
        ctx = fed_context(trainer)
        payload = instruction.payload
        self._names = [k[len(VARIATE):] for k in payload if k.startswith(VARIATE)]
        self._active = ctx is not None and bool(self._names)
        if not self._active or ctx is None:
            return
        params = dict(trainer.lightning_module.named_parameters())  # the working module (tiers: not pl_module)
        self._params = [params[n] for n in self._names]
        self._x = [payload[n] for n in self._names]  # what the working model was loaded with (read-only)
        self._c = [payload[VARIATE + n].detach().float().cpu() for n in self._names]
        stored = ctx.client_state.get(STATE_KEY) or {}
        fits = list(stored) == self._names and all(stored[n].shape == c.shape for n, c in zip(self._names, self._c))
        self._ci = [stored[n].float() for n in self._names] if fits else [torch.zeros_like(c) for c in self._c]
        self._corr = [(c - ci).to(device=p.device, dtype=p.dtype) for c, ci, p in zip(self._c, self._ci, self._params)]
        self._lr_sum = [0.0] * len(self._names)
        self._unit = [None] * len(self._names)
        self.steps = 0

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        """``g <- g - c_i + c`` for every variate parameter this optimizer steps; add the step's weight (see the
        module docstring) to the parameter's denominator."""
        if not self._active:
            return
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        sgd = isinstance(optimizer, torch.optim.SGD)
        if not sgd:
            self._warn(f"SCAFFOLD's option II estimate (x - y_i) / (K * lr) is exact for torch.optim.SGD (with or "
                       f"without momentum) only; with {type(optimizer).__name__} it is approximate")
        self.steps += 1
        for i, (p, corr) in enumerate(zip(self._params, self._corr)):
            group = groups.get(id(p))
            if group is None:  # another optimizer's parameter (manual optimization with several optimizers)
                continue
            lr = float(group["lr"])
            if sgd:
                if self._unit[i] is None and optimizer.state.get(p, {}).get("momentum_buffer") is not None:
                    self._warn("SCAFFOLD: the client's SGD momentum buffer is carried over from an earlier round "
                               "(keep_optimizer_state=True), so (x - y_i) / sum(w) mixes in stale steps")
                lr *= self._unit_step(i, group)
            self._lr_sum[i] += lr
            if p.grad is None:  # unused in this step: its gradient is 0, the correction still applies
                p.grad = corr.clone()
            else:
                p.grad.add_(corr)

    def _unit_step(self, i: int, group: dict[str, Any]) -> float:
        """The factor torch's SGD applies to ``lr`` in this step when every gradient is 1: its momentum buffer
        ``b`` (``b_1 = 1``, ``b_k = m b_{k-1} + 1 - dampening``), or ``1 + m b`` with Nesterov; 1 without momentum."""
        m = float(group.get("momentum", 0.0))
        if m == 0.0:
            return 1.0
        prev = self._unit[i]
        b = 1.0 if prev is None else m * prev + 1.0 - float(group.get("dampening", 0.0))
        self._unit[i] = b
        return 1.0 + m * b if group.get("nesterov", False) else b

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(message)

    @torch.no_grad()
    def on_client_end(self, trainer: Any, pl_module: Any, reply: Reply) -> None:
        """``Δc_i = (x - y_i) / sum(w) - c`` into the reply (``dc/<name>``), with ``sum(w)`` the steps' weights (the
        sum of the learning rates under plain SGD); ``c_i+ = c_i + Δc_i`` into the store. A parameter no step
        touched (``sum(w) = 0``) keeps its ``c_i`` (``Δc_i = 0``)."""
        ctx = fed_context(trainer)
        if not self._active or ctx is None:
            return
        new_ci = {}
        for name, p, x, c, ci, lr_sum in zip(self._names, self._params, self._x, self._c, self._ci, self._lr_sum):
            if lr_sum > 0:
                dc = (x.detach().float().cpu() - p.detach().float().cpu()).div_(lr_sum).sub_(c)
            else:
                dc = torch.zeros_like(c)
            reply.payload[VARIATE_DELTA + name] = dc
            new_ci[name] = ci + dc
        ctx.client_state[STATE_KEY] = new_ci
        self._active = False
        self._params, self._x, self._corr = [], [], []  # no reference to the working model after the client


class _FederationSize(FedCallback):
    """Server side, at set-up: hands FedLoop's ``num_clients`` (``N`` of the variate update) to the strategy."""

    def __init__(self, strategy: Scaffold) -> None:
        self.strategy = strategy

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Read ``trainer.fed.num_clients``."""
        ctx = fed_context(trainer)
        if ctx is not None:
            self.strategy.num_clients = ctx.num_clients


class Scaffold(FedAvg):
    """SCAFFOLD (option II): the plain mean of the weight deltas plus control variates correcting the local gradients.

    ``N``, the number of clients in ``c += |S| / N * mean(Δc_i)``, is FedLoop's ``num_clients`` (read at set-up;
    set ``num_clients`` yourself to use the strategy outside FedLoop).

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=50, local_epochs=5, strategy=Scaffold())
        loop.fit(MNIST1DCNN(optimizer="sgd", momentum=0.0), MNIST1DDataModule())

    Args:
        server_lr: the global step size ``lr_g`` on the averaged weight delta (the paper: 1.0); shorthand for
            ``server_optimizer=ServerSGD(lr=server_lr)``.
        aggregator: averages the weight deltas (``None``: the plain mean
            :class:`~lightning_fed.strategies.UniformMean`, the paper's); the variate deltas always take the plain
            mean.
        server_optimizer: applies the averaged weight delta (``None``: ``ServerSGD(lr=server_lr)``).
    """

    def __init__(self, *, server_lr: float = 1.0, aggregator: Aggregator | None = None,
                 server_optimizer: ServerOptimizer | None = None) -> None:
        super().__init__(server_lr=server_lr, aggregator=UniformMean() if aggregator is None else aggregator,
                         server_optimizer=server_optimizer)
        self.num_clients: int | None = None
        self.client = ScaffoldClient()
        self.variate_spec: FlatSpec | None = None
        self.variate: Tensor | None = None
        self._variate_views: Payload = {}
        self._variate_tmp: Tensor | None = None

    def setup(self, model: nn.Module) -> None:
        """FedAvg's global buffer, and ``c = 0`` for every trainable float parameter.

        Raises:
            ValueError: a state entry's name starts with ``c/`` or ``dc/`` (the protocol's variate prefixes).
        """
        state = float_state(model)
        clash = [k for k in state if k.startswith((VARIATE, VARIATE_DELTA))]
        if clash:
            raise ValueError(f"Scaffold: the model's state entries {clash[:3]} start with {VARIATE!r} or "
                             f"{VARIATE_DELTA!r}, the prefixes of SCAFFOLD's control variates; rename the submodule")
        super().setup(model)
        names = [n for n, p in model.named_parameters() if p.requires_grad and n in state]
        self.variate_spec = FlatSpec.build(names, [tuple(state[n].shape) for n in names])
        self.variate = torch.zeros(self.variate_spec.numel)
        self._variate_views = self.variate_spec.unflatten(self.variate)
        self._variate_tmp = torch.empty(self.variate_spec.numel)

    def _require_variate(self) -> tuple[FlatSpec, Tensor]:
        if self.variate_spec is None or self.variate is None:
            raise RuntimeError("Scaffold.setup(model) must be called before use")
        return self.variate_spec, self.variate

    def client_callbacks(self) -> list[Any]:
        """The gradient correction on the clients; the federation's size for the server."""
        return [self.client, _FederationSize(self)]

    def configure_round(self, server_round: int, clients: list[int]) -> list[Instruction]:
        """Every client gets the global weights and ``c`` (``c/<name>``): one shared payload."""
        self._require_variate()
        payload = self.global_payload()
        payload.update({VARIATE + k: v for k, v in self._variate_views.items()})
        return [Instruction(cid, payload) for cid in clients]

    def client_receive(self, model: nn.Module, instruction: Instruction) -> None:
        """Load the global weights (the ``c/`` entries are the callback's)."""
        load_into(model, _weights(instruction.payload))

    def client_reply(self, model: nn.Module, instruction: Instruction) -> Payload:
        """The float32 weight delta ``y_i - x`` (the callback adds ``Δc_i``)."""
        return delta(model, _weights(instruction.payload))

    def reply_spec(self, instruction: Instruction) -> PayloadSpec:
        """FedAvg's weight deltas and a float32 ``dc/<name>`` per variate."""
        spec, _ = self._require_variate()
        out = super().reply_spec(instruction)
        out.update({VARIATE_DELTA + n: TensorSpec(s, torch.float32) for n, s in zip(spec.names, spec.shapes)})
        return out

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """``x`` as FedAvg (aggregator, server optimizer), then ``c += (1/N) * sum(Δc_i)``.

        Raises:
            RuntimeError: ``num_clients`` is unknown (the strategy runs outside FedLoop and it was not set).
        """
        spec, c = self._require_variate()
        n = self.num_clients
        if n is None:
            raise RuntimeError("Scaffold.num_clients is not set: FedLoop sets it at set-up; set it to the number of "
                               "clients when using the strategy on its own")
        metrics = super().aggregate(server_round, replies)
        assert self._variate_tmp is not None
        for r in replies:
            dc = spec.flatten({k: r.payload[VARIATE_DELTA + k] for k in spec.names}, out=self._variate_tmp)
            c.add_(dc, alpha=1.0 / n)
        metrics["variate_norm"] = flat_norm(c)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """FedAvg's state and the server variate ``c``."""
        spec, c = self._require_variate()
        return {**super().state_dict(), "variate": c.clone(), "variate_names": list(spec.names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: the checkpoint's variate does not match the model's trainable parameters.
        """
        spec, c = self._require_variate()
        super().load_state_dict(state)
        if list(state["variate_names"]) != list(spec.names) or state["variate"].numel() != c.numel():
            raise ValueError("Scaffold checkpoint's control variate does not match the model's trainable parameters")
        c.copy_(state["variate"])


def _weights(payload: Payload) -> Payload:
    return {k: v for k, v in payload.items() if not k.startswith(VARIATE)}


__all__ = ["Scaffold", "ScaffoldClient"]
