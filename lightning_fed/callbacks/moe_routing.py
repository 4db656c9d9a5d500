"""MoERouting: mixture-of-experts training for an unchanged LightningModule.

The callback (1) optionally converts named feed-forward blocks into :class:`~lightning_fed.moe.MoELayer`s
in ``setup`` (sparse upcycling), before the optimizers are configured and, in ``FedLoop``, before the
strategy reads the global weights; (2) adds the weighted Switch load-balancing loss and router z-loss of
every MoE layer to the loss the module's ``training_step`` returns; (3) logs per-expert load, router
entropy, the dropped fraction and the auxiliary losses with ``pl_module.log``; (4) optionally anneals the
capacity factor and ``k`` linearly over epochs (``lightning.Trainer``) or rounds (``FedLoop``).

The loss is added by wrapping the module instance's ``training_step`` (the class is untouched): Lightning's
``on_before_backward`` sees the loss but cannot replace it, while the wrapped step's return value is the
loss that both ``lightning.Trainer`` and FedLoop's local trainer differentiate.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.callbacks.step_hook import TrainingStepHook
from lightning_fed.context import fed_context
from lightning_fed.moe.convert import convert_to_moe
from lightning_fed.moe.layer import MoELayer, moe_layers
from lightning_fed.validation import need

log = logging.getLogger("lightning_fed")


class MoERouting(FedCallback):
    """Mixture-of-experts routing losses, logging, annealing and (optionally) conversion.

    Example::

        cb = MoERouting(convert=["ffn"], num_experts=4, k=1, capacity_factor=1.25,
                        balance_weight=0.01, z_weight=0.001)
        L.Trainer(callbacks=[cb]).fit(model, dm)            # or FedLoop(callbacks=[cb], strategy=FedMoE())

    Args:
        convert: names of blocks to turn into MoE layers at setup (``named_modules`` names); ``None`` or
            ``[]`` uses the model's existing MoE layers.
        num_experts: experts per converted block.
        k: experts per token of converted blocks (the start value when ``k_final`` anneals it).
        capacity_factor: training capacity factor of converted blocks (``None`` = dropless).
        eval_capacity_factor: evaluation capacity factor of converted blocks (``None`` = dropless).
        noisy_gating: noisy top-k gating in converted blocks.
        normalize_gates: gates of converted blocks sum to 1 over the chosen experts.
        upcycle: converted experts start as copies of the block (False: re-initialised copies).
        balance_weight: weight of the load-balancing loss (Switch uses 0.01).
        z_weight: weight of the router z-loss (ST-MoE uses 0.001).
        log_stats: log ``moe/balance_loss``, ``moe/z_loss``, ``moe/entropy``, ``moe/dropped`` (means over
            layers) and, with ``log_load``, ``moe/<layer>/load_<e>`` every training step.
        log_load: also log each expert's share of the kept assignments.
        capacity_final: anneal every MoE layer's training capacity factor linearly to this value.
        k_final: anneal every MoE layer's ``k`` linearly (rounded) to this value.
        anneal_periods: epochs (``lightning.Trainer``) or rounds (``FedLoop``) the annealing takes.
        warn_dropped: warn (once per layer) when a training step of an MoE layer drops more than this share of its
            token assignments to the capacity limit (raise ``capacity_factor`` or use ``None``, dropless);
            ``None`` = never warn.
    """

    def __init__(
        self,
        *,
        convert: list[str] | None = None,
        num_experts: int = 4,
        k: int = 1,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = None,
        noisy_gating: bool = False,
        normalize_gates: bool = True,
        upcycle: bool = True,
        balance_weight: float = 0.01,
        z_weight: float = 0.001,
        log_stats: bool = True,
        log_load: bool = True,
        capacity_final: float | None = None,
        k_final: int | None = None,
        anneal_periods: int = 10,
        warn_dropped: float | None = 0.1,
    ) -> None:
        need("MoERouting",
             num_experts >= 2,
             "num_experts", num_experts, "an int >= 2")
        need("MoERouting", 1 <= k <= num_experts, "k", k, f"an int in [1, num_experts={num_experts}]")
        need("MoERouting", capacity_factor is None or capacity_factor > 0, "capacity_factor", capacity_factor,
             "> 0 or None")
        need("MoERouting", eval_capacity_factor is None or eval_capacity_factor > 0, "eval_capacity_factor",
             eval_capacity_factor, "> 0 or None")
        need("MoERouting", balance_weight >= 0, "balance_weight", balance_weight, ">= 0")
        need("MoERouting", z_weight >= 0, "z_weight", z_weight, ">= 0")
        need("MoERouting", capacity_final is None or capacity_final > 0, "capacity_final", capacity_final,
             "> 0 or None")
        need("MoERouting", k_final is None or k_final >= 1, "k_final", k_final, "an int >= 1 or None")
        need("MoERouting", k_final is None or not convert or k_final <= num_experts, "k_final", k_final,
             f"<= num_experts={num_experts}")
        need("MoERouting", warn_dropped is None or 0.0 <= warn_dropped <= 1.0, "warn_dropped", warn_dropped,
             "in [0, 1] or None")
        need("MoERouting", anneal_periods >= 1, "anneal_periods", anneal_periods, ">= 1")
        need("MoERouting", convert is None or len(set(convert)) == len(convert), "convert", convert,
             "a list of distinct names")
        self.convert = list(convert or [])
        self.num_experts, self.k = num_experts, k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.noisy_gating, self.normalize_gates, self.upcycle = noisy_gating, normalize_gates, upcycle
        self.balance_weight, self.z_weight = balance_weight, z_weight
        self.log_stats, self.log_load = log_stats, log_load
        self.capacity_final, self.k_final, self.anneal_periods = capacity_final, k_final, anneal_periods
        self._start: dict[str, tuple[int, float | None]] = {}
        self._warned = False
        self.warn_dropped = warn_dropped
        self._warned_dropped: set[str] = set()
        self._hook = TrainingStepHook(lambda original, *a, **kw: self._training_step(self._hook.module, original, *a, **kw))

    # ------------------------------------------------------------------ setup / teardown
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Convert the named blocks (once) and wrap the module's ``training_step``."""
        if self.convert:
            missing = [n for n in self.convert if not isinstance(_get(pl_module, n), MoELayer)]
            if missing:
                convert_to_moe(
                    pl_module, missing, num_experts=self.num_experts, k=self.k, capacity_factor=self.capacity_factor,
                    eval_capacity_factor=self.eval_capacity_factor, noisy_gating=self.noisy_gating,
                    normalize_gates=self.normalize_gates, upcycle=self.upcycle,
                )
        layers = moe_layers(pl_module)
        if not layers:
            raise ValueError(f"MoERouting: {type(pl_module).__name__} has no MoE layers; name the blocks to convert "
                             "in convert=[...] or add MoELayer modules to the model")
        if self.k_final is not None and any(self.k_final > m.num_experts for m in layers.values()):
            raise ValueError(f"MoERouting: k_final={self.k_final} is larger than an MoE layer's num_experts")
        for name, m in layers.items():
            self._start.setdefault(name, (m.k, m.capacity_factor))
        self._hook.install(pl_module)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Unwrap ``training_step`` (the converted layers stay)."""
        self._hook.remove()

    # ------------------------------------------------------------------ the loss
    def _training_step(self, pl_module: Any, original: Any, *args: Any, **kwargs: Any) -> Any:
        layers = moe_layers(pl_module)
        for m in layers.values():
            m.pop_stats()
            m.keep_all_stats = True
        try:
            out = original(*args, **kwargs)
        finally:
            for m in layers.values():
                m.keep_all_stats = False
        stats = {name: m.pop_stats() for name, m in layers.items()}
        flat = [s for lst in stats.values() for s in lst]
        if not flat:
            return out
        if self.warn_dropped is not None:
            self._check_dropped(stats, layers)
        balance = torch.stack([s.balance_loss for s in flat]).mean()
        z = torch.stack([s.z_loss for s in flat]).mean()
        aux = self.balance_weight * balance + self.z_weight * z
        if self.log_stats:
            self._log(pl_module, stats, balance, z)
        if isinstance(out, Tensor):
            return out + aux.to(out.dtype)
        if isinstance(out, dict) and isinstance(out.get("loss"), Tensor):
            return {**out, "loss": out["loss"] + aux.to(out["loss"].dtype)}
        if not self._warned:
            log.warning("MoERouting: training_step returned %s, not a loss; auxiliary losses not added "
                        "(with manual optimization add them yourself)", type(out).__name__)
            self._warned = True
        return out

    def _check_dropped(self, stats: dict[str, list[Any]], layers: dict[str, MoELayer]) -> None:
        for name, lst in stats.items():
            if not lst or name in self._warned_dropped:
                continue
            dropped = float(torch.stack([s.dropped for s in lst]).mean())
            if dropped > self.warn_dropped:
                self._warned_dropped.add(name)
                log.warning("MoERouting: MoE layer %r dropped %.1f%% of its token assignments in a training step "
                            "(more than warn_dropped=%.2f): its experts are over capacity; raise capacity_factor "
                            "(now %s) or set it to None (dropless)", name, 100 * dropped, self.warn_dropped,
                            layers[name].capacity_factor)

    def _log(self, pl_module: Any, stats: dict[str, list[Any]], balance: Tensor, z: Tensor) -> None:
        flat = [s for lst in stats.values() for s in lst]
        values: dict[str, Tensor] = {
            "moe/balance_loss": balance.detach(),
            "moe/z_loss": z.detach(),
            "moe/entropy": torch.stack([s.entropy for s in flat]).mean(),
            "moe/dropped": torch.stack([s.dropped for s in flat]).mean(),
        }
        if self.log_load:
            for name, lst in stats.items():
                if lst:
                    load = torch.stack([s.load for s in lst]).mean(0)
                    for e, v in enumerate(load):
                        values[f"moe/{name}/load_{e}"] = v
        pl_module.log_dict(values, on_step=True, on_epoch=False, prog_bar=False)

    # ------------------------------------------------------------------ annealing
    def _period(self, trainer: Any) -> int:
        ctx = fed_context(trainer)
        return int(ctx.round if ctx is not None else trainer.current_epoch)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Apply the annealed settings before the first step (of the fit, or of a client's round)."""
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Set ``k`` and the capacity factor of every MoE layer for this epoch or round."""
        if self.capacity_final is None and self.k_final is None:
            return
        t = min(1.0, self._period(trainer) / self.anneal_periods)
        for name, m in moe_layers(pl_module).items():
            k0, c0 = self._start.get(name, (m.k, m.capacity_factor))
            k = round(k0 + (self.k_final - k0) * t) if self.k_final is not None else None
            if self.capacity_final is not None and c0 is not None:
                m.set_routing(k=k, capacity_factor=c0 + (self.capacity_final - c0) * t)
            else:
                m.set_routing(k=k)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The start values of the annealing per layer."""
        return {"start": {n: [k, c] for n, (k, c) in self._start.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._start = {n: (int(k), None if c is None else float(c)) for n, (k, c) in state_dict.get("start", {}).items()}


def _get(module: Any, name: str) -> Any:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


__all__ = ["MoERouting"]
