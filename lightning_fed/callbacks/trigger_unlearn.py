"""Trigger inversion and unlearning (after Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks
in Neural Networks", IEEE S&P 2019) as a server-side FedLoop callback.

A trigger backdoor lets a few overwritten input values move any record to the target class: for the target, a much
smaller change suffices than for any other class. On the server's clean training records the defence reverses, for
every class ``c``, the smallest trigger that does so: a mask ``m`` in ``[0, 1]`` per input value (a sigmoid of a free
parameter) and a pattern ``p`` within the clean records' value range (a scaled tanh), stamped as
``x' = (1 - m) * x + m * p``, optimised with Adam for ``steps`` steps (each on ``inversion_batch`` records drawn
from the clean training records; class ``c``'s loss counts those of the other classes) to minimise
``CE(f(x'), c) + lambda * |m|_1``. ``lambda`` follows the paper's schedule: it starts at ``cost`` and is
multiplied by 1.5 after ``patience`` consecutive steps at which the stamped records reach ``target_success``, divided
by 1.5 after ``patience`` steps below it; the kept trigger is the one of smallest ``|m|_1`` among the steps that
reached ``target_success`` (the last step's when none did). Each class is inverted from ``restarts`` random starts
(one start can settle on a larger local optimum) and keeps the smallest mask. Starts and record draws come from a
generator seeded by (seed, round), so the inversion repeats exactly; all classes and starts are optimised together
in one batch.

Detection is the paper's anomaly index: with ``d_c = |m_c|_1``, ``MAD = 1.4826 * median(|d - median(d)|)`` and
``a_c = (median(d) - d_c) / MAD``, the classes with ``a_c > threshold`` (default 2) are flagged as backdoor targets.
When none is flagged, ``fallback="none"`` (the default, the paper's rule) leaves the model unchanged,
``fallback="smallest"`` unlearns the trigger of the class with the smallest mask anyway (a backdoor below the
detection threshold is still treated, at the cost of the unlearning's fine-tuning on a model that had none), and
``fallback="all"`` unlearns every class's trigger. On MNIST-1D (40 values a record) every class can be reached by
overwriting a few values, so the anomaly index stays under 2 on every measured backdoored model (21), even where
the target's mask is the smallest: ``benchmarks/robustness.py`` uses ``fallback="smallest"`` (benchmarks/RESULTS.md,
"Trigger inversion and unlearning").

Unlearning (the paper's mitigation): ``epochs`` of SGD on the clean training records where a ``poison`` share of
each batch carries a flagged class's reversed trigger with its true label (cross-entropy), so that the model stops
obeying the trigger. The defence needs no knowledge of the trigger's position or values. The reversed triggers
(every class's mask and pattern) are the callback's checkpointed state and are written next to
``final.safetensors`` as ``trigger_unlearn.safetensors`` (rank 0; ``mask_<c>`` and ``pattern_<c>``).
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_fed.callbacks._defence import CleanDataDefence, accuracy, device_of, finetune
from lightning_fed.context import fed_context
from lightning_fed.data.public import PublicData
from lightning_fed.seeding import Stream, generator
from lightning_fed.validation import need

TRIGGERS_FILE = "trigger_unlearn.safetensors"
FALLBACKS = ("none", "smallest", "all")
MAD_SCALE = 1.4826  # the median absolute deviation's consistency constant for a normal distribution


def stamp(x: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
    """The records ``x`` with the trigger ``(mask, pattern)`` stamped: ``(1 - mask) * x + mask * pattern``."""
    return (1 - mask) * x + mask * pattern


def anomaly_index(norms: list[float]) -> list[float]:
    """Neural Cleanse's anomaly index of each class: how many scaled MADs its mask norm lies below the median
    (``(median - norm) / (1.4826 * MAD)``; ``inf`` below and ``0`` elsewhere when the MAD is 0)."""
    med = statistics.median(norms)
    mad = MAD_SCALE * statistics.median([abs(n - med) for n in norms])
    if mad == 0:
        return [math.inf if n < med else 0.0 for n in norms]
    return [(med - n) / mad for n in norms]


@torch.no_grad()
def success(
    model: nn.Module, x: Tensor, target: int, mask: Tensor, pattern: Tensor, batch_size: int = 512
) -> float:
    """Share of the records ``x`` that ``model`` (eval mode; its mode is restored) classifies as ``target`` once
    the trigger ``(mask, pattern)`` is stamped; ``nan`` for no records."""
    stamped = stamp(x, mask.to(x.device), pattern.to(x.device))
    return accuracy(model, stamped, torch.full((len(x),), target, dtype=torch.long), batch_size)


def invert_triggers(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    num_classes: int,
    low: float,
    high: float,
    steps: int,
    lr: float,
    cost: float,
    target_success: float,
    patience: int,
    gen: torch.Generator,
    batch_size: int | None = None,
    restarts: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(masks, patterns, reached)``, one row per class ``c``: the smallest trigger (module docstring) that moves the
    records of ``x`` whose label ``y`` is not ``c`` to class ``c``, the pattern within ``[low, high]``; ``reached``:
    whether any step reached ``target_success`` (the row is then the smallest-mask trigger that did, else the last
    step's). Each step stamps ``batch_size`` records drawn from ``x`` (``None``: all of them; the draws from
    ``gen``) with every class's trigger: the classes are optimised together in one batch, each with its own loss,
    ``lambda`` and Adam moments (the same as one inversion per class on the same draws). Each class is inverted
    ``restarts`` times from different random starts (mask near 0.12, pattern spread over the range) and keeps the
    smallest reversed mask (of those that reached ``target_success`` when any did): one start can settle on a larger
    local optimum. The model runs in eval mode (its mode is restored) and its parameters receive no gradient."""
    dev = device_of(model)
    k, n, shape = num_classes * restarts, len(x), tuple(x.shape[1:])
    mask_raw = (torch.randn((k, *shape), generator=gen) * 0.1 - 2.0).to(dev).requires_grad_(True)
    pattern_raw = torch.randn((k, *shape), generator=gen).to(dev).requires_grad_(True)
    xd, yd = x.to(dev), y.to(dev)
    classes = torch.arange(num_classes, device=dev).repeat(restarts)  # the class of each candidate
    b = n if batch_size is None else min(batch_size, n)
    targets = classes.repeat_interleave(b)
    col = (k, *([1] * len(shape)))  # one value per candidate, broadcast over a record
    mid, half = (high + low) / 2, (high - low) / 2
    was = model.training
    grads = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    lam = torch.full((k,), cost, device=dev)
    up = torch.zeros(k, dtype=torch.long, device=dev)
    down = torch.zeros_like(up)
    best_l1 = torch.full((k,), math.inf, device=dev)
    best_mask = torch.zeros((k, *shape), device=dev)
    best_pattern = torch.zeros_like(best_mask)
    opt = torch.optim.Adam([mask_raw, pattern_raw], lr=lr, betas=(0.5, 0.9))
    try:
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.arange(n) if b == n else torch.randperm(n, generator=gen)[:b]
                xb, yb = xd[idx.to(dev)], yd[idx.to(dev)]
                others = (
                    yb[None, :] != classes[:, None]
                ).float()  # [k, b]: the records each class is inverted on
                count = others.sum(dim=1).clamp(min=1)
                mask = torch.sigmoid(mask_raw)
                pattern = mid + half * torch.tanh(pattern_raw)
                stamped = stamp(xb[None], mask.view(k, 1, *shape), pattern.view(k, 1, *shape))
                out = model(stamped.reshape(k * b, *shape))
                ce = F.cross_entropy(out, targets, reduction="none").view(k, b)
                l1 = mask.flatten(1).sum(dim=1)
                loss = ((ce * others).sum(dim=1) / count + lam * l1).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    hit = ((out.argmax(dim=1).view(k, b) == classes[:, None]).float() * others).sum(
                        dim=1
                    ) / count
                    ok = hit >= target_success
                    better = ok & (l1 < best_l1)
                    best_l1 = torch.where(better, l1, best_l1)
                    best_mask = torch.where(better.view(col), mask, best_mask)
                    best_pattern = torch.where(better.view(col), pattern, best_pattern)
                opt.step()
                up = torch.where(ok, up + 1, 0)
                down = torch.where(ok, 0, down + 1)
                lam = torch.where(up >= patience, lam * 1.5, torch.where(down >= patience, lam / 1.5, lam))
                up = torch.where(up >= patience, 0, up)
                down = torch.where(down >= patience, 0, down)
        with torch.no_grad():
            reached = torch.isfinite(best_l1)
            keep = reached.view(col)
            masks = torch.where(keep, best_mask, torch.sigmoid(mask_raw))
            patterns = torch.where(keep, best_pattern, mid + half * torch.tanh(pattern_raw))
            # per class: the smallest mask among its reached candidates, or among all when none reached
            norms = masks.flatten(1).sum(dim=1).view(restarts, num_classes)
            rank = torch.where(reached.view(restarts, num_classes), norms, norms + 1e9)
            pick = rank.argmin(dim=0) * num_classes + torch.arange(num_classes, device=dev)
        return masks[pick].cpu(), patterns[pick].cpu(), reached.view(restarts, num_classes).any(dim=0).cpu()
    finally:
        for p, r in zip(model.parameters(), grads, strict=True):
            p.requires_grad_(r)
        model.train(was)


def save_triggers(masks: dict[int, Tensor], patterns: dict[int, Tensor], path: Path) -> None:
    """Write every class's reversed mask and pattern to ``path`` as safetensors (``mask_<c>``, ``pattern_<c>``; a
    temporary file, then a rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tensors = {f"mask_{c}": m.contiguous() for c, m in masks.items()}
    tensors.update({f"pattern_{c}": p.contiguous() for c, p in patterns.items()})
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


class TriggerUnlearn(CleanDataDefence):
    """Neural Cleanse's trigger inversion, detection and unlearning on the server at the end of the rounds in ``at``
    (module docstring). FedLoop only: under ``lightning.Trainer`` it does nothing.

    Round metrics at a step: ``nc_acc_before`` and ``nc_acc_after`` (clean held-out accuracy before and after),
    ``nc_flagged`` (how many classes were flagged), ``nc_unlearned`` (how many triggers were unlearnt) and
    ``nc_max_anomaly`` (the largest anomaly index). The step's record (``records``) also holds every class's mask
    norm, anomaly index and reversed-trigger success on the held-out records, the flagged classes, and the input
    positions where each unlearnt mask exceeds 0.5.

    Example::

        clean = PublicData(num_samples=500, seed=7, labeled=True)
        loop = FedLoop(..., callbacks=[TriggerUnlearn(clean=clean, num_classes=10), Backdoor(...)])
        result = loop.fit(model, dm)
        # result.run_dir / "trigger_unlearn.safetensors": every class's reversed mask and pattern

    Args:
        clean: the server's clean data, a labelled :class:`~lightning_fed.data.PublicData`.
        num_classes: the model's classes (every one is a candidate target).
        at: 0-based rounds at whose end a step runs (an int or a list); ``None``: the run's last round.
        holdout: share of the clean data held out to measure clean accuracy and reversed-trigger success on, in
            ``[0, 1)``.
        steps: Adam steps of the inversion (>= 1).
        inversion_batch: clean training records drawn at each inversion step (stamped with every class's trigger);
            ``None``: all of them.
        restarts: random starts of each class's inversion, the smallest reversed mask kept (>= 1).
        inversion_lr: Adam's learning rate of the inversion (> 0).
        cost: the initial weight ``lambda`` of the mask's L1 norm (> 0).
        target_success: the share of stamped records a reversed trigger must move to its class, in ``(0, 1]``.
        patience: consecutive steps above (below) ``target_success`` before ``lambda`` grows (shrinks) (>= 1).
        threshold: the anomaly index above which a class is flagged (> 0; the paper's 2).
        fallback: ``"none"``: nothing is unlearnt when no class is flagged; ``"smallest"``: the smallest-mask
            class's trigger is unlearnt then.
        poison: share of each unlearning batch that carries a reversed trigger, in ``(0, 1]`` (the paper's 0.2).
        epochs, lr, momentum, batch_size: SGD settings of the unlearning.
        seed: seed of the clean split, the inversions' starting points and the batches.
    """

    owner = "TriggerUnlearn"
    stream = Stream.TRIGGER_UNLEARN
    prefix = "nc"

    def __init__(
        self,
        clean: PublicData,
        num_classes: int,
        at: int | list[int] | None = None,
        holdout: float = 0.2,
        steps: int = 1000,
        inversion_batch: int | None = 64,
        restarts: int = 3,
        inversion_lr: float = 0.1,
        cost: float = 1e-3,
        target_success: float = 0.99,
        patience: int = 5,
        threshold: float = 2.0,
        fallback: str = "none",
        poison: float = 0.2,
        epochs: int = 10,
        lr: float = 0.01,
        momentum: float = 0.9,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(clean, at, holdout, epochs, lr, momentum, batch_size, seed)
        owner = self.owner

        need(owner, num_classes >= 2, "num_classes", num_classes, "an integer >= 2")
        need(owner, steps >= 1, "steps", steps, "an integer >= 1")
        need(
            owner,
            inversion_batch is None or inversion_batch >= 1,
            "inversion_batch",
            inversion_batch,
            "an integer >= 1 or None (every clean training record at every step)",
        )
        need(owner, restarts >= 1, "restarts", restarts, "an integer >= 1")
        need(owner, inversion_lr > 0, "inversion_lr", inversion_lr, "> 0")
        need(owner, cost > 0, "cost", cost, "> 0")
        need(
            owner,
            0 < target_success <= 1,
            "target_success",
            target_success,
            "in (0, 1]",
        )
        need(owner, patience >= 1, "patience", patience, "an integer >= 1")
        need(owner, threshold > 0, "threshold", threshold, "> 0")
        need(owner, fallback in FALLBACKS, "fallback", fallback, f"one of {FALLBACKS}")
        need(owner, 0 < poison <= 1, "poison", poison, "in (0, 1]")
        self.num_classes = num_classes
        self.steps = steps
        self.inversion_batch = inversion_batch
        self.restarts = restarts
        self.inversion_lr = float(inversion_lr)
        self.cost = float(cost)
        self.target_success = float(target_success)
        self.patience = patience
        self.threshold = float(threshold)
        self.fallback = fallback
        self.poison = float(poison)
        self.masks: dict[int, Tensor] = {}
        self.patterns: dict[int, Tensor] = {}

    def invert(
        self, model: nn.Module, server_round: int = 0
    ) -> tuple[dict[int, Tensor], dict[int, Tensor], list[bool]]:
        """Every class's reversed trigger on the clean training records of the other classes: ``(masks, patterns,
        reached)``, the pattern bounded by the clean training records' smallest and largest value."""
        xt, yt, _, _ = self.data()
        masks, patterns, reached = invert_triggers(
            model,
            xt,
            yt,
            self.num_classes,
            float(xt.min()),
            float(xt.max()),
            self.steps,
            self.inversion_lr,
            self.cost,
            self.target_success,
            self.patience,
            generator(self.seed, self.stream, server_round),
            self.inversion_batch,
            self.restarts,
        )
        return (
            {c: masks[c] for c in range(self.num_classes)},
            {c: patterns[c] for c in range(self.num_classes)},
            [bool(r) for r in reached],
        )

    def flag(self, norms: list[float]) -> tuple[list[int], list[float]]:
        """``(flagged classes, anomaly indices)`` of the classes' mask norms (module docstring)."""
        index = anomaly_index(norms)
        return [c for c, a in enumerate(index) if a > self.threshold], index

    def fallback_classes(self, norms: list[float]) -> list[int]:
        """The classes whose triggers are unlearnt when none is flagged: none, the smallest-mask class, or all."""
        if self.fallback == "smallest":
            return [min(range(self.num_classes), key=norms.__getitem__)]
        return list(range(self.num_classes)) if self.fallback == "all" else []

    def unlearn(self, model: nn.Module, classes: list[int], server_round: int = 0) -> None:
        """Fine-tune ``model`` on the clean training records, a ``poison`` share of each batch stamped with the
        reversed triggers of ``classes`` (in turn) and kept at its true label."""
        if not classes:
            return
        xt, yt, _, _ = self.data()
        dev = device_of(model)
        masks = torch.stack([self.masks[c] for c in classes]).to(dev)
        patterns = torch.stack([self.patterns[c] for c in classes]).to(dev)

        def loss(m: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
            k = min(len(xb), max(1, int(self.poison * len(xb) + 0.5)))
            which = torch.arange(k, device=dev) % len(classes)
            xb = torch.cat([stamp(xb[:k], masks[which], patterns[which]), xb[k:]])
            return F.cross_entropy(m(xb), yb)

        finetune(
            model,
            xt,
            yt,
            self.epochs,
            self.lr,
            self.momentum,
            self.batch_size,
            self.batch_generator(server_round),
            loss,
        )

    def defend(self, trainer: Any, pl_module: nn.Module, server_round: int) -> dict[str, Any]:
        """Reverse every class's trigger, flag the anomalous ones and unlearn their triggers."""
        xe, ye = self.eval_part()
        before = accuracy(pl_module, xe, ye)
        self.masks, self.patterns, reached = self.invert(pl_module, server_round)
        norms = [float(self.masks[c].sum()) for c in range(self.num_classes)]
        flagged, index = self.flag(norms)
        treat = flagged or self.fallback_classes(norms)
        asr = [
            success(pl_module, xe[ye != c], c, self.masks[c], self.patterns[c])
            for c in range(self.num_classes)
        ]
        self.unlearn(pl_module, treat, server_round)
        fed = fed_context(trainer)
        if fed is not None and getattr(trainer, "is_global_zero", True):  # every rank replays; rank 0 writes
            save_triggers(self.masks, self.patterns, Path(fed.run_dir) / TRIGGERS_FILE)
        return {
            "acc_before": before,
            "acc_after": accuracy(pl_module, xe, ye),
            "flagged": len(flagged),
            "unlearned": len(treat),
            "max_anomaly": max(index),
            "flagged_classes": flagged,
            "unlearned_classes": treat,
            "norms": norms,
            "anomaly": index,
            "reached": reached,
            "trigger_success": asr,
            "positions": {
                str(c): [int(i) for i in torch.nonzero(self.masks[c].flatten() > 0.5).flatten()]
                for c in treat
            },
        }

    def state_dict(self) -> dict[str, Any]:
        """The rounds done, their records and the reversed triggers."""
        return {
            **super().state_dict(),
            "masks": {c: m.clone() for c, m in self.masks.items()},
            "patterns": {c: p.clone() for c, p in self.patterns.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rounds done, their records and the reversed triggers (the unlearnt weights are in the
        checkpointed model)."""
        super().load_state_dict(state)
        self.masks = {int(c): m.clone() for c, m in state.get("masks", {}).items()}
        self.patterns = {int(c): p.clone() for c, p in state.get("patterns", {}).items()}


__all__ = [
    "TRIGGERS_FILE",
    "TriggerUnlearn",
    "anomaly_index",
    "invert_triggers",
    "save_triggers",
    "stamp",
    "success",
]
