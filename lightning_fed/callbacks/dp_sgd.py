"""Record-level differential privacy inside local training: DP-SGD (Abadi et al., "Deep Learning with Differential
Privacy", CCS 2016) through Opacus, on the user's own module and optimizer.

At set-up the module is checked with Opacus' ``ModuleValidator``: layers Opacus cannot train privately (BatchNorm
mixes the records of a batch) refuse the run with Opacus' own reason, or, with ``fix=True``, are replaced in place
by Opacus' fixers (BatchNorm -> GroupNorm) before the server reads the global weights. Opacus' ``GradSampleModule``
hooks give per-example gradients, and every optimizer the module's ``configure_optimizers`` returns is wrapped in
Opacus' ``DPOptimizer`` (per-example clipping to ``max_grad_norm``, Gaussian noise ``noise_multiplier *
max_grad_norm`` on the sum). The loader is the loop's shuffled one, so each step is accounted as Opacus does for a
loader of ``B`` batches: a sampled Gaussian mechanism with sample rate ``1 / B``, the customary approximation of
shuffled batches by Poisson sampling. Each client keeps its accountant history in its own state (a client that
trains in many rounds spends more); its epsilon at ``delta`` travels in its reply's metrics as ``dpsgd_epsilon``.
Works under ``lightning.Trainer`` too (the epsilon is then in :attr:`DPSGD.last_epsilon`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from lightning_fed.accounting import PrivacyAccountant, check_privacy_args, default_delta
from lightning_fed.callbacks.base import FedCallback
from lightning_fed.context import fed_context
from lightning_fed.protocol import Reply
from lightning_fed.validation import need

log = logging.getLogger("lightning_fed")

OWNER = "DPSGD"


def incompatible_layers(module: nn.Module) -> list[str]:
    """Opacus' reasons why ``module`` cannot be trained with DP-SGD (empty when it can)."""
    from opacus.validators import ModuleValidator

    return [str(err) for err in ModuleValidator.validate(module, strict=False)]


def fix_in_place(module: nn.Module) -> list[str]:
    """Replace, inside ``module``, every layer Opacus has a fixer for (BatchNorm -> GroupNorm) by the fixer's
    module; returns the names replaced. In place: the caller's module object stays the same."""
    from opacus.validators import ModuleValidator

    replaced = []
    for name, sub in list(module.named_modules()):
        fixer = ModuleValidator.FIXERS.get(type(sub))
        if not name or fixer is None:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, fixer(sub).to(next(sub.parameters(), torch.empty(0)).device))
        replaced.append(name)
    return replaced


class DPSGD(FedCallback):
    """DP-SGD in every client's local training through Opacus (record-level DP).

    Example::

        FedLoop(..., callbacks=[DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)])
        DPSGD(noise_multiplier=1.0, fix=True)   # a model with BatchNorm: converted to GroupNorm at start-up

    Args:
        noise_multiplier: noise standard deviation over ``max_grad_norm`` (>= 0).
        max_grad_norm: per-example gradient L2 bound (> 0).
        delta: delta of the per-client epsilon, in (0, 1) (``None``: ``1 / n^1.1`` for a client with ``n`` records).
        fix: replace the layers Opacus refuses by its fixes (BatchNorm -> GroupNorm) instead of refusing the run.
        loss_reduction: how the module's loss reduces over a batch: ``"mean"`` or ``"sum"``.
        accountant: ``"rdp"`` or ``"prv"`` (Opacus' accountants).
    """

    def __init__(
        self,
        *,
        noise_multiplier: float = 1.0,
        max_grad_norm: float = 1.0,
        delta: float | None = None,
        fix: bool = False,
        loss_reduction: str = "mean",
        accountant: str = "rdp",
    ) -> None:
        check_privacy_args(OWNER, noise_multiplier, delta, None, accountant)
        need(
            OWNER,
            max_grad_norm > 0,
            "max_grad_norm",
            max_grad_norm,
            "> 0",
        )
        need(
            OWNER,
            loss_reduction in ("mean", "sum"),
            "loss_reduction",
            loss_reduction,
            "one of ('mean', 'sum')",
        )
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.delta, self.fix, self.loss_reduction, self.accountant = delta, fix, loss_reduction, accountant
        self.last_epsilon: float | None = None
        self._grad_sample: Any = None
        self._optimizers: list[Any] = []
        self._records = 0

    # ------------------------------------------------------------------ start-up
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check (or fix) the module with Opacus' validator, hook per-example gradients, wrap the optimizers."""
        from opacus import GradSampleModule

        reasons = incompatible_layers(pl_module)
        if reasons and self.fix:
            log.info("DPSGD: replaced %s with Opacus' fixes", fix_in_place(pl_module))
            reasons = incompatible_layers(pl_module)
        if reasons:
            raise ValueError(
                f"{OWNER}: the module cannot be trained with DP-SGD; Opacus says: "
                + " | ".join(reasons)
                + " (DPSGD(fix=True) replaces the layers Opacus can fix)"
            )
        if self._grad_sample is None:
            self._grad_sample = GradSampleModule(
                pl_module, batch_first=True, loss_reduction=self.loss_reduction, strict=True
            )
        current = pl_module.configure_optimizers
        if getattr(current, "_dp_sgd", False):
            return

        def configure_optimizers() -> Any:
            return self._wrap(current())

        configure_optimizers._dp_sgd = True  # type: ignore[attr-defined]
        pl_module.configure_optimizers = configure_optimizers

    def _make(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        from opacus.optimizers import DPOptimizer

        dp = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=1,
            loss_reduction=self.loss_reduction,
        )
        self._optimizers.append(dp)
        return dp

    def _wrap(self, conf: Any) -> Any:
        self._optimizers = []
        if isinstance(conf, torch.optim.Optimizer):
            return self._make(conf)
        if isinstance(conf, dict) and "optimizer" in conf:
            return {**conf, "optimizer": self._make(conf["optimizer"])}
        if (
            isinstance(conf, (list, tuple))
            and conf
            and all(isinstance(o, torch.optim.Optimizer) for o in conf)
        ):
            return type(conf)(self._make(o) for o in conf)
        if isinstance(conf, (list, tuple)) and len(conf) == 2 and isinstance(conf[0], (list, tuple)):
            return [self._make(o) for o in conf[0]], list(conf[1])
        raise ValueError(f"{OWNER}: cannot wrap what configure_optimizers returned ({type(conf).__name__})")

    # ------------------------------------------------------------------ local training
    def _dataset_size(self, trainer: Any) -> int:
        ctx = fed_context(trainer)
        if ctx is not None and ctx.shard is not None:
            return len(ctx.shard)
        return len(trainer.train_dataloader.dataset)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Set the expected batch size as Opacus does for a loader: ``records / batches``."""
        self._records = self._dataset_size(trainer)
        batches = max(int(trainer.num_training_batches), 1)
        for opt in self._optimizers:
            opt.expected_batch_size = max(self._records // batches, 1)
        self._batches = batches

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Account this training's steps (sample rate ``1 / batches``) in the client's own history."""
        ctx = fed_context(trainer)
        state = ctx.client_state if ctx is not None and ctx.client_id is not None else {}
        acc = PrivacyAccountant(self.accountant)
        if "dpsgd_accountant" in state:
            acc.load_state_dict(state["dpsgd_accountant"])
        steps = int(trainer.global_step)
        if steps:
            acc.step(self.noise_multiplier, 1.0 / self._batches, steps)
        state["dpsgd_accountant"] = acc.state_dict()
        delta = self.delta if self.delta is not None else default_delta(self._records)
        self.last_epsilon = acc.epsilon(delta)

    def on_client_end(self, trainer: Any, pl_module: Any, reply: Reply) -> None:
        """Report the client's epsilon after this round's training (not when infinite, without noise: a reply's
        metrics must be finite)."""
        if self.last_epsilon is not None and math.isfinite(self.last_epsilon):
            reply.metrics["dpsgd_epsilon"] = self.last_epsilon

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Remove Opacus' hooks from the module."""
        if self._grad_sample is not None:
            self._grad_sample._close()
            self._grad_sample = None

    def __repr__(self) -> str:
        return f"DPSGD(noise_multiplier={self.noise_multiplier}, max_grad_norm={self.max_grad_norm}, fix={self.fix})"


__all__ = ["DPSGD", "fix_in_place", "incompatible_layers"]
