"""Central differential privacy for averaging strategies: DP-FedAvg with fixed or adaptive clipping.

McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018: the server clips each
client's decoded update to an L2 bound ``C``, sums the clipped updates, adds Gaussian noise of standard deviation
``z * C`` to the sum and divides by the expected number of clients per round ``m`` (a fixed denominator, so one
client changes the estimate by at most ``C / m``). Andrew et al., "Differentially Private Learning with Adaptive
Clipping", NeurIPS 2021: the bound follows a target quantile ``gamma`` of the update norms,
``C <- C * exp(-lr * (b - gamma))`` where ``b`` is the fraction of updates within the bound, counted with its own
Gaussian noise; the update noise is lowered so that both releases together cost exactly noise multiplier ``z``.

:class:`DPFedAvg` wraps an averaging strategy (anything with an ``aggregator``, e.g. :class:`FedAvg` with any server
optimizer): its aggregator is wrapped by :class:`ClipNoise`, which clips, hands the clipped updates to the inner
rule with uniform weights, rescales to the fixed denominator and adds the noise. The server optimizer then steps
with the noised update as usual. The privacy loss of each round is a sampled Gaussian mechanism (sample rate
``clients_per_round / num_clients``, noise multiplier ``z``), accounted by
:class:`~lightning_fed.accounting.PrivacyAccountant` (Opacus): ``dp_epsilon`` is logged every round. Opacus'
analysis assumes Poisson sampling (``FedLoop(sampling="poisson")``); with the default fixed-size sampling it is
the customary approximation. The guarantee is formal for sum-based inner rules (:class:`WeightedMean`,
:class:`UniformMean`); a robust rule (median, Krum) sees clipped updates and its output is noised the same way, but
its sensitivity is not ``C / m``.

Noise: drawn from a generator seeded by the server's random stream of the round, which FedLoop seeds from
``(seed, round)`` before the server side runs: resumed runs and every process of a multi-process run draw the same
noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_fed.accounting import PrivacyAccountant, check_privacy_args, default_delta
from lightning_fed.protocol import Instruction, Payload, PayloadSpec, Reply
from lightning_fed.strategies.aggregators import Aggregator, UniformMean, WeightedMean
from lightning_fed.strategies.base import Strategy
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.validation import need

log = logging.getLogger("lightning_fed")

OWNER = "DPFedAvg"


SUM_RULES = (WeightedMean, UniformMean)
"""Inner rules whose output is a sum of the clipped updates: the accounting is formal for them."""


def adaptive_noise_multiplier(noise_multiplier: float, count_std: float) -> float:
    """Andrew et al. 2021, Theorem 1: the update's noise multiplier ``(z^-2 - (2 sigma_b)^-2)^-1/2`` that, together
    with the clipped count's noise ``sigma_b`` (on bits centred to +-1/2), costs noise multiplier ``z`` in all."""
    return (noise_multiplier**-2 - (2.0 * count_std) ** -2) ** -0.5


class ClipNoise(Aggregator):
    """An aggregator wrapper: clip each update to ``bound``, aggregate the clipped updates with ``base`` (uniform
    weights), scale to the fixed denominator ``n / divisor`` and add ``N(0, std^2)`` to every coordinate.

    :class:`DPFedAvg` installs it and sets :attr:`bound`, :attr:`divisor`, :attr:`std` and :attr:`generator`
    before each round; it records the update norms of the call in :attr:`norms`.

    Args:
        base: the inner rule (the wrapped strategy's aggregator).
    """

    def __init__(self, base: Aggregator) -> None:
        self.base = base
        self.streaming = base.streaming
        self.bound = 1.0
        self.divisor = 1.0
        self.std = 0.0
        self.generator: torch.Generator | None = None
        self.norms: list[float] = []

    @property
    def last(self) -> Any:
        """The inner rule's record of its latest call (robust rules), ``None`` otherwise."""
        return getattr(self.base, "last", None)

    def _clipped(self, flats: Iterable[Tensor]) -> Iterable[Tensor]:
        for flat in flats:  # read-only views: a clipped update is a new tensor
            norm = float(torch.linalg.vector_norm(flat))
            self.norms.append(norm)
            yield flat * (self.bound / norm) if norm > self.bound else flat

    def __call__(self, out: Tensor, flats: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
        """``out = n / divisor * base(clipped flats, uniform weights) + N(0, std^2)``."""
        self.norms = []
        n = len(weights)
        clipped = self._clipped(flats) if self.base.streaming else list(self._clipped(flats))
        self.base(out, clipped, [1.0 / n] * n)
        out.mul_(n / self.divisor)
        if self.std > 0:
            out.add_(torch.randn(out.shape, generator=self.generator, dtype=out.dtype), alpha=self.std)
        return out

    def report(self) -> dict[str, float]:
        """The inner rule's metrics."""
        return self.base.report()

    def __repr__(self) -> str:
        return f"ClipNoise({self.base!r})"


class DPFedAvg(Strategy):
    """DP-FedAvg: server-side clipping of each decoded update and Gaussian noise on their sum, with fixed or
    adaptive clipping and an Opacus accountant (user-level DP).

    Example::

        strategy = DPFedAvg(strategy=FedAvg(), clip_norm=0.5, noise_multiplier=1.0, target_epsilon=8.0)
        FedLoop(num_clients=1000, clients_per_round=100, rounds=100, sampling="poisson", strategy=strategy)
        DPFedAvg(clip_norm=0.1, adaptive=True, target_quantile=0.5)   # the bound tracks the median norm

    Args:
        strategy: the averaging strategy to privatise (``None``: ``FedAvg()``); it must have an ``aggregator``.
        clip_norm: L2 bound of each client's update (> 0); the initial bound when ``adaptive``.
        noise_multiplier: noise standard deviation over the bound (>= 0; 0: clipping only, epsilon infinite).
        adaptive: let the bound track ``target_quantile`` of the update norms (Andrew et al. 2021).
        target_quantile: the quantile of update norms the adaptive bound tracks, in (0, 1).
        clip_lr: the adaptive bound's geometric step size (> 0).
        count_std: standard deviation of the noise on the clipped count (``None``: ``clients_per_round / 20``,
            the paper's choice); it must exceed ``noise_multiplier / 2``.
        delta: the delta of the reported epsilon, in (0, 1) (``None``: ``1 / num_clients^1.1``).
        target_epsilon: refuse (at ``FedLoop`` construction) a plan whose rounds would exceed this epsilon.
        accountant: ``"rdp"`` or ``"prv"`` (Opacus' accountants).
    """

    def __init__(
        self,
        *,
        strategy: Strategy | None = None,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        count_std: float | None = None,
        delta: float | None = None,
        target_epsilon: float | None = None,
        accountant: str = "rdp",
    ) -> None:
        inner = strategy if strategy is not None else FedAvg()
        need(
            OWNER,
            isinstance(getattr(inner, "aggregator", None), Aggregator),
            "strategy",
            inner,
            "an averaging strategy with an aggregator (e.g. FedAvg(), FedAvg(server_optimizer=ServerAdam()))",
        )
        need(OWNER, clip_norm > 0, "clip_norm", clip_norm, "> 0")
        check_privacy_args(OWNER, noise_multiplier, delta, target_epsilon, accountant)
        need(OWNER, 0 < target_quantile < 1, "target_quantile", target_quantile, "in (0, 1)")
        need(OWNER, clip_lr > 0, "clip_lr", clip_lr, "> 0")
        need(OWNER, count_std is None or count_std > 0, "count_std", count_std, "> 0 or None")
        if adaptive and count_std is not None and noise_multiplier > 0:
            need(
                OWNER,
                count_std > noise_multiplier / 2,
                "count_std",
                count_std,
                f"> noise_multiplier / 2 = {noise_multiplier / 2} (the update's noise takes the rest of the budget)",
            )
        self.strategy = inner
        self.clip_norm, self.noise_multiplier, self.adaptive = (
            float(clip_norm),
            float(noise_multiplier),
            adaptive,
        )
        self.target_quantile, self.clip_lr, self.count_std = target_quantile, clip_lr, count_std
        self.delta, self.target_epsilon = delta, target_epsilon
        if not isinstance(inner.aggregator, SUM_RULES):
            log.warning(
                "%s: the inner rule %r is not a sum of the clipped updates; the reported epsilon assumes "
                "one (sensitivity clip_norm / clients_per_round)",
                OWNER,
                inner.aggregator,
            )
        self.clip = ClipNoise(inner.aggregator)
        inner.aggregator = self.clip
        self.accountant = PrivacyAccountant(accountant)
        self.bound = float(clip_norm)
        self.plan: tuple[int, int, int, str] | None = None

    # ------------------------------------------------------------------ plan and budget
    def check_plan(self, num_clients: int, clients_per_round: int, rounds: int, sampling: str) -> None:
        """Keep the loop's plan (sample rate, expected clients per round, delta) and refuse it when its rounds would
        exceed ``target_epsilon``, or when the adaptive count's noise leaves nothing for the update."""
        self.plan = (num_clients, clients_per_round, rounds, sampling)
        self.strategy.check_plan(num_clients, clients_per_round, rounds, sampling)
        if self.adaptive and self.noise_multiplier > 0:
            need(
                OWNER,
                self.count_noise_std > self.noise_multiplier / 2,
                "count_std",
                self.count_noise_std,
                f"> noise_multiplier / 2 = {self.noise_multiplier / 2} (default: clients_per_round / 20)",
            )
        if self.target_epsilon is None:
            return
        planned = self.planned_epsilon(rounds)
        if planned > self.target_epsilon:
            most = self._max_rounds()
            raise ValueError(
                f"{OWNER}: target_epsilon={self.target_epsilon} is not allowed with rounds={rounds}: the plan spends "
                f"epsilon={planned:.3f} at delta={self.resolved_delta:.3g} (noise_multiplier={self.noise_multiplier}, "
                f"sample rate {self.sample_rate:.4g}); target_epsilon must be >= {planned:.3f}, or use at most "
                f"rounds={most} or a larger noise_multiplier"
            )

    def _require_plan(self) -> tuple[int, int, int, str]:
        if self.plan is None:
            raise RuntimeError(
                f"{OWNER} needs the loop's plan: use it as FedLoop(strategy=...) (or call check_plan)"
            )
        return self.plan

    @property
    def sample_rate(self) -> float:
        """``clients_per_round / num_clients``."""
        n, m, _, _ = self._require_plan()
        return m / n

    @property
    def resolved_delta(self) -> float:
        """``delta``, or ``1 / num_clients^1.1``."""
        return self.delta if self.delta is not None else default_delta(self._require_plan()[0])

    @property
    def count_noise_std(self) -> float:
        """The clipped count's noise standard deviation: ``count_std`` or ``clients_per_round / 20``."""
        return self.count_std if self.count_std is not None else self._require_plan()[1] / 20.0

    def planned_epsilon(self, rounds: int) -> float:
        """Epsilon at :attr:`resolved_delta` after ``rounds`` rounds of this mechanism."""
        return PrivacyAccountant.planned(
            self.accountant.kind, self.noise_multiplier, self.sample_rate, rounds, self.resolved_delta
        )

    def _max_rounds(self) -> int:
        lo, hi = 0, self._require_plan()[2]  # planned(hi) exceeds the target
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.planned_epsilon(mid) <= self.target_epsilon else (lo, mid)
        return lo

    def epsilon(self) -> float:
        """Epsilon spent so far at :attr:`resolved_delta`."""
        return self.accountant.epsilon(self.resolved_delta)

    # ------------------------------------------------------------------ aggregation
    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """Clip, aggregate, noise (the wrapped strategy steps its server optimizer with the result), then update the
        adaptive bound and the accountant."""
        _, m, _, _ = self._require_plan()
        z = self.noise_multiplier
        z_update = adaptive_noise_multiplier(z, self.count_noise_std) if self.adaptive and z > 0 else z
        seed = int(torch.randint(0, 2**62, (1,)))  # the server's stream, seeded by FedLoop from (seed, round)
        gen = torch.Generator().manual_seed(seed)
        clip = self.clip
        clip.bound, clip.divisor, clip.std, clip.generator = (
            self.bound,
            float(m),
            z_update * self.bound / m,
            gen,
        )
        metrics = self.strategy.aggregate(server_round, replies)
        norms = torch.tensor(clip.norms, dtype=torch.float64)
        used = self.bound
        if self.adaptive:
            self.bound = self.next_bound(norms, m, gen)
        self.accountant.step(z, self.sample_rate)
        eps = self.epsilon()
        log.info(
            "round %d: DP bound %.4g, %d of %d updates clipped, noise std %.4g, epsilon %.4f at delta %.3g",
            server_round + 1,
            used,
            int((norms > used).sum()),
            len(norms),
            clip.std,
            eps,
            self.resolved_delta,
        )
        metrics.update(
            {
                "dp_clip": used,
                "dp_clipped": float((norms > used).float().mean()) if len(norms) else 0.0,
                "dp_noise_std": clip.std,
                "dp_epsilon": eps,
            }
        )
        return metrics

    def next_bound(self, norms: Tensor, m: int, gen: torch.Generator) -> float:
        """Andrew et al.'s geometric update from the noised fraction of updates within the bound (bits centred to
        +-1/2, noise ``count_std`` on their sum, divided by ``m``)."""
        centred = float(((norms <= self.bound).double() - 0.5).sum())
        noise = (
            float(torch.randn((), generator=gen, dtype=torch.float64)) * self.count_noise_std
            if self.noise_multiplier > 0
            else 0.0
        )
        below = (centred + noise) / m + 0.5
        return self.bound * math.exp(-self.clip_lr * (below - self.target_quantile))

    # ------------------------------------------------------------------ delegated to the wrapped strategy
    def setup(self, model: nn.Module) -> None:
        """The wrapped strategy's set-up."""
        self.strategy.setup(model)

    def configure_round(self, server_round: int, clients: list[int]) -> list[Instruction]:
        """The wrapped strategy's instructions."""
        return self.strategy.configure_round(server_round, clients)

    def client_receive(self, model: nn.Module, instruction: Instruction) -> None:
        """The wrapped strategy's client side."""
        self.strategy.client_receive(model, instruction)

    def client_reply(self, model: nn.Module, instruction: Instruction) -> Payload:
        """The wrapped strategy's reply."""
        return self.strategy.client_reply(model, instruction)

    def reply_spec(self, instruction: Instruction) -> PayloadSpec:
        """The wrapped strategy's reply spec."""
        return self.strategy.reply_spec(instruction)

    def load_global(self, model: nn.Module) -> None:
        """The wrapped strategy's global model."""
        self.strategy.load_global(model)

    def model_changed(self, model: nn.Module) -> None:
        """The wrapped strategy re-reads the model."""
        self.strategy.model_changed(model)

    def client_module(self, client_id: int, default: nn.Module) -> nn.Module:
        """The wrapped strategy's working module."""
        return self.strategy.client_module(client_id, default)

    def evaluate(self, evaluate_module: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
        """The wrapped strategy's extra evaluation."""
        return self.strategy.evaluate(evaluate_module)

    def client_callbacks(self) -> list[Callback]:
        """The wrapped strategy's client callbacks."""
        return self.strategy.client_callbacks()

    def state_dict(self) -> dict[str, Any]:
        """The wrapped strategy's state, the clipping bound and the accountant's history."""
        return {
            "strategy": self.strategy.state_dict(),
            "bound": self.bound,
            "accountant": self.accountant.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.strategy.load_state_dict(state["strategy"])
        self.bound = float(state["bound"])
        self.accountant.load_state_dict(state["accountant"])

    def __repr__(self) -> str:
        return (
            f"DPFedAvg(strategy={self.strategy!r}, clip_norm={self.clip_norm}, noise_multiplier="
            f"{self.noise_multiplier}, adaptive={self.adaptive})"
        )


__all__ = ["SUM_RULES", "ClipNoise", "DPFedAvg", "adaptive_noise_multiplier"]
