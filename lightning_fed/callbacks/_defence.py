"""What the server-side backdoor defences share (fine-pruning, NAD, mode connectivity repair): a small clean,
labelled dataset held by the server (a :class:`~lightning_fed.data.PublicData`), split once into a part the defence
trains on and a held-out part it measures on, seeded fine-tuning, clean accuracy, and the schedule (``at`` rounds,
or the last round) with its checkpointed record of what was done.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fed.callbacks._compress import detached, parse_schedule
from lightning_fed.callbacks.base import FedCallback
from lightning_fed.context import fed_context
from lightning_fed.data.public import PublicData
from lightning_fed.seeding import derive_seed, generator
from lightning_fed.validation import need

log = logging.getLogger("lightning_fed")

Split = tuple[Tensor, Tensor, Tensor, Tensor]


def check_clean_settings(owner: str, clean: Any, at: Any, holdout: Any, epochs: Any, lr: Any, momentum: Any,
                         batch_size: Any, seed: Any, *, need_holdout: bool = False,
                         epochs_key: str = "epochs") -> list[int] | None:
    """Validate the settings every defence shares (naming the key); return ``at`` as a sorted list or ``None``."""
    need(owner, isinstance(clean, PublicData) and bool(clean.labeled), "clean", clean,
         "a labelled PublicData (PublicData(labeled=True, ...) or PublicData.from_tensors(x, y)): the server's clean "
         "data")
    schedule = None if at is None else parse_schedule(owner, "at", at)
    low = "in (0, 1)" if need_holdout else "in [0, 1)"
    need(owner, isinstance(holdout, int | float) and not isinstance(holdout, bool)
         and (0 < holdout < 1 if need_holdout else 0 <= holdout < 1), "holdout", holdout, low)
    need(owner, isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 0, epochs_key, epochs,
         "an integer >= 0")
    need(owner, isinstance(lr, int | float) and not isinstance(lr, bool) and lr > 0, "lr", lr, "> 0")
    need(owner, isinstance(momentum, int | float) and not isinstance(momentum, bool) and 0 <= momentum < 1,
         "momentum", momentum, "in [0, 1)")
    need(owner, isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1, "batch_size",
         batch_size, "an integer >= 1")
    need(owner, isinstance(seed, int) and not isinstance(seed, bool), "seed", seed, "an integer")
    return schedule


def split_clean(owner: str, clean: PublicData, holdout: float, seed: int, stream: int) -> Split:
    """``(x_train, y_train, x_held, y_held)``: a seeded permutation of the clean data, ``round(holdout * n)`` records
    held out (at least one when ``holdout > 0``), the rest to train on (at least one).

    Raises:
        ValueError: too few clean records for the split.
    """
    x, y = clean.x, clean.y
    assert y is not None
    n = len(x)
    held = 0 if holdout == 0 else max(1, int(holdout * n + 0.5))
    if n - held < 1:
        raise ValueError(f"{owner}: clean has {n} records; holdout={holdout} leaves none to train on")
    # key-less, against Stream's rule: a permutation of the clean records, not of the clients, so sharing round
    # ``stream``'s client-sample seed draws nothing alike; a key would move every recorded defence number
    perm = torch.randperm(n, generator=generator(seed, stream))
    tr, ho = perm[held:], perm[:held]
    return x[tr], y[tr], x[ho], y[ho]


def batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Shuffled index batches covering ``range(n)`` once (the last one may be smaller)."""
    perm = torch.randperm(n, generator=gen)
    yield from perm.split(batch_size)


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter lives (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def layer_outputs(model: nn.Module, layer: str, x: Tensor, batch_size: int = 512) -> Iterator[Tensor]:
    """The output of ``model``'s submodule ``layer`` on the records ``x``, one detached tensor per batch of
    ``batch_size``, without gradients; the model runs in eval mode (its mode is restored when the batches end)."""
    got: list[Tensor] = []

    def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
        got.append((out[0] if isinstance(out, tuple | list) else out).detach())

    was = model.training
    model.eval()
    handle = model.get_submodule(layer).register_forward_hook(hook)
    dev = device_of(model)
    try:
        for i in range(0, len(x), batch_size):
            with torch.no_grad():
                model(x[i:i + batch_size].to(dev))
            yield got.pop()
    finally:
        handle.remove()
        model.train(was)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Share of ``x`` that ``model`` classifies as ``y`` (eval mode; the mode is restored); ``nan`` for no records."""
    if len(x) == 0:
        return float("nan")
    was = model.training
    model.eval()
    dev = device_of(model)
    hits = 0
    try:
        for i in range(0, len(x), batch_size):
            pred = model(x[i:i + batch_size].to(dev)).argmax(dim=1).cpu()
            hits += int((pred == y[i:i + batch_size]).sum())
    finally:
        model.train(was)
    return hits / len(x)


LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def ce_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of ``model(x)`` against ``y``."""
    return F.cross_entropy(model(x), y)


def train_epochs(params: list[Tensor], loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
                 epochs: int, lr: float, momentum: float, batch_size: int, gen: torch.Generator,
                 device: torch.device) -> None:
    """SGD (``lr``, ``momentum``) on ``params`` for ``epochs`` passes over ``(x, y)`` in seeded shuffled batches;
    ``loss_fn(xb, yb)`` gives the batch loss."""
    if epochs == 0 or not params:
        return
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in batches(len(x), batch_size, gen):
                opt.zero_grad(set_to_none=True)
                loss_fn(x[idx].to(device), y[idx].to(device)).backward()
                opt.step()
    opt.zero_grad(set_to_none=True)


def finetune(model: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float, momentum: float, batch_size: int,
             gen: torch.Generator, loss_fn: LossFn = ce_loss) -> None:
    """Train ``model`` in place on ``(x, y)`` (train mode; its mode is restored) with :func:`train_epochs`."""
    was = model.training
    model.train()
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        train_epochs(params, lambda xb, yb: loss_fn(model, xb, yb), x, y, epochs, lr, momentum, batch_size, gen,
                     device_of(model))
    finally:
        model.train(was)
        model.zero_grad(set_to_none=True)


def model_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (detached from its trainer), on the same device."""
    with detached(model):
        return copy.deepcopy(model)


class CleanDataDefence(FedCallback):
    """A server-side defence that changes the global model with the server's clean data at the end of the rounds in
    ``at`` (0-based; ``None``: the last round of the run). Subclasses implement :meth:`defend`.

    The clean data is split once (seeded by ``seed`` and the defence's stream) into a training part and a held-out
    ``holdout`` share; each defence step runs with torch's global generator seeded by (seed, stream, round) and
    restored afterwards, and with its own seeded batch generator, so that a resumed run repeats it exactly. What each
    step did is kept in ``records`` (checkpointed) and added to the round's metrics.
    """

    owner = "CleanDataDefence"
    stream = 0
    prefix = "defence"

    def __init__(self, clean: PublicData, at: int | list[int] | None, holdout: float, epochs: int, lr: float,
                 momentum: float, batch_size: int, seed: int, *, need_holdout: bool = False,
                 epochs_key: str = "epochs") -> None:
        self.at = check_clean_settings(self.owner, clean, at, holdout, epochs, lr, momentum, batch_size, seed,
                                       need_holdout=need_holdout, epochs_key=epochs_key)
        self.clean = clean
        self.holdout = float(holdout)
        self.epochs = epochs
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.batch_size = batch_size
        self.seed = seed
        self.done: list[int] = []
        self.records: list[dict[str, Any]] = []
        self._split: Split | None = None

    def data(self) -> Split:
        """``(x_train, y_train, x_held, y_held)`` of the clean data (split once)."""
        if self._split is None:
            self._split = split_clean(self.owner, self.clean, self.holdout, self.seed, self.stream)
        return self._split

    def eval_part(self) -> tuple[Tensor, Tensor]:
        """The records the defence measures clean accuracy on: the held-out part, or the training part when
        ``holdout=0``."""
        xt, yt, xh, yh = self.data()
        return (xh, yh) if len(xh) else (xt, yt)

    def batch_generator(self, server_round: int) -> torch.Generator:
        """The generator of this round's batch order (and, for MCR, curve points)."""
        return generator(self.seed, self.stream, server_round)

    def due(self, trainer: Any) -> int | None:
        """The server round if a defence step runs at its end, else ``None``."""
        fed = fed_context(trainer)
        if fed is None or not fed.on_server:
            return None
        r = fed.round
        wanted = r + 1 == fed.num_rounds if self.at is None else r in self.at
        return r if wanted and r not in self.done else None

    def defend(self, trainer: Any, pl_module: nn.Module, server_round: int) -> dict[str, Any]:
        """Change ``pl_module`` in place; return what was done (plain numbers and lists, for the record)."""
        raise NotImplementedError

    def on_round_end(self, trainer: Any, pl_module: Any, metrics: dict[str, float]) -> None:
        """Server: run the defence at the scheduled rounds, log and record what it did, tell the loop the model
        changed."""
        r = self.due(trainer)
        if r is None:
            return
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(self.seed, self.stream, r, 1))
            record = self.defend(trainer, pl_module, r)
        record = {"round": r, **record}
        self.done.append(r)
        self.records.append(record)
        for k, v in record.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "round":
                metrics[f"{self.prefix}_{k}"] = float(v)
        log.info("%s after round %d: %s", self.owner, r + 1,
                 ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                           if k != "round"))
        fed_context(trainer).model_changed()

    def state_dict(self) -> dict[str, Any]:
        """The rounds done and their records (plain Python)."""
        return {"done": list(self.done), "records": copy.deepcopy(self.records)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rounds done and their records (the defended weights are in the checkpointed model)."""
        self.done = [int(r) for r in state.get("done", [])]
        self.records = copy.deepcopy(list(state.get("records", [])))


__all__ = ["CleanDataDefence", "accuracy", "batches", "ce_loss", "check_clean_settings", "finetune", "model_copy",
           "split_clean", "train_epochs"]
