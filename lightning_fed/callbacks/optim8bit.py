"""8-bit optimizers for memory-poor clients: bitsandbytes ``Adam8bit`` / ``AdamW8bit`` in place of the module's
optimizer, with the optimizer-state memory reported.

Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022: Adam's two moment tensors are kept
as 8-bit block-wise quantized values (one byte per parameter per moment, plus a float32 scale per block of
2,048) instead of float32, cutting optimizer-state memory about 4x. bitsandbytes 0.50 runs these optimizers on
the CPU. Lightning's ``BitsandbytesPrecision`` (8-bit *weights*) refuses CPU and is a different thing.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.validation import need

log = logging.getLogger("lightning_fed")

OPTIMIZERS = ("adam8bit", "adamw8bit")


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of an optimizer's state (moments, quantization maps and scales)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def adam_fp32_state_bytes(params: list[nn.Parameter]) -> int:
    """What float32 Adam's state (two moments) takes for ``params``."""
    return sum(2 * 4 * p.numel() for p in params)


class EightBitOptimizer(FedCallback):
    """Give the module a bitsandbytes 8-bit Adam/AdamW instead of the optimizer its ``configure_optimizers`` builds.

    The module's ``configure_optimizers`` is wrapped (on the instance, at ``setup``): every optimizer it returns is
    replaced by the 8-bit one over the same parameter groups, with this callback's ``lr`` (or the group's own),
    betas, eps and weight decay; LR schedulers are re-pointed at the new optimizer. Works the same under
    ``lightning.Trainer`` and for every FedLoop client. At each epoch end it logs ``optim_state_bytes`` and
    ``optim_state_bytes_fp32`` (what float32 Adam would hold), which FedLoop averages into the round metrics.

    Example::

        loop = FedLoop(..., callbacks=[EightBitOptimizer(optimizer="adamw8bit", lr=5e-3, min_8bit_size=256)])

    Args:
        optimizer: ``"adam8bit"`` or ``"adamw8bit"``.
        lr: learning rate; ``None`` keeps each parameter group's own.
        betas: Adam betas.
        eps: Adam epsilon.
        weight_decay: weight decay; ``None`` keeps each group's own.
        min_8bit_size: tensors with fewer elements keep 32-bit state (bitsandbytes' default is 4096; small
            models need a lower value to benefit).
    """

    def __init__(
        self,
        *,
        optimizer: str = "adam8bit",
        lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        min_8bit_size: int = 4096,
    ) -> None:
        need("EightBitOptimizer", optimizer in OPTIMIZERS, "optimizer", optimizer, f"one of {OPTIMIZERS}")
        need("EightBitOptimizer", lr is None or lr > 0, "lr", lr, "> 0 or None")
        need("EightBitOptimizer", len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), "betas", betas,
             "two values in [0, 1)")
        need("EightBitOptimizer", eps > 0, "eps", eps, "> 0")
        need("EightBitOptimizer", weight_decay is None or weight_decay >= 0, "weight_decay", weight_decay,
             ">= 0 or None")
        need("EightBitOptimizer", min_8bit_size >= 1, "min_8bit_size", min_8bit_size, ">= 1")
        self.optimizer = optimizer
        self.lr = lr
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = eps
        self.weight_decay = weight_decay
        self.min_8bit_size = min_8bit_size
        self.last_report: dict[str, float] = {}

    def make(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The 8-bit optimizer over ``optimizer``'s parameter groups."""
        import bitsandbytes as bnb

        cls = bnb.optim.Adam8bit if self.optimizer == "adam8bit" else bnb.optim.AdamW8bit
        groups = []
        for g in optimizer.param_groups:
            groups.append({
                "params": list(g["params"]),
                "lr": self.lr if self.lr is not None else g["lr"],
                "weight_decay": self.weight_decay if self.weight_decay is not None else g.get("weight_decay", 0.0),
            })
        return cls(groups, betas=self.betas, eps=self.eps, min_8bit_size=self.min_8bit_size)

    def _swap(self, conf: Any) -> Any:
        if isinstance(conf, torch.optim.Optimizer):
            return self.make(conf)
        if isinstance(conf, dict) and "optimizer" in conf:
            out = dict(conf)
            out["optimizer"] = self.make(conf["optimizer"])
            sched = conf.get("lr_scheduler")
            s = sched.get("scheduler") if isinstance(sched, dict) else sched
            if s is not None:
                s.optimizer = out["optimizer"]
                for g, base in zip(out["optimizer"].param_groups, getattr(s, "base_lrs", [])):
                    g.setdefault("initial_lr", base)
            return out
        if isinstance(conf, (list, tuple)):
            if len(conf) == 2 and isinstance(conf[0], (list, tuple)) and isinstance(conf[1], (list, tuple)):
                opts = [self.make(o) for o in conf[0]]
                for s in conf[1]:
                    s = s.get("scheduler") if isinstance(s, dict) else s
                    for old, new in zip(conf[0], opts):
                        if getattr(s, "optimizer", None) is old:
                            s.optimizer = new
                return opts, list(conf[1])
            return type(conf)(self._swap(c) for c in conf)
        return conf

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Wrap the module's ``configure_optimizers`` (idempotent)."""
        current = pl_module.configure_optimizers
        if getattr(current, "_eight_bit", False):
            return

        def configure_optimizers() -> Any:
            return self._swap(current())

        configure_optimizers._eight_bit = True  # type: ignore[attr-defined]
        pl_module.configure_optimizers = configure_optimizers

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Remove the wrapper installed by :meth:`setup`."""
        if getattr(pl_module.__dict__.get("configure_optimizers"), "_eight_bit", False):
            del pl_module.configure_optimizers

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Log the optimizer-state bytes and what float32 Adam would take."""
        opts = [getattr(o, "optimizer", o) for o in trainer.optimizers]
        params = [p for o in opts for g in o.param_groups for p in g["params"]]
        self.last_report = {"optim_state_bytes": float(sum(state_bytes(o) for o in opts)),
                            "optim_state_bytes_fp32": float(adam_fp32_state_bytes(params))}
        for k, v in self.last_report.items():
            pl_module.log(k, v)


__all__ = ["EightBitOptimizer", "adam_fp32_state_bytes", "state_bytes"]
