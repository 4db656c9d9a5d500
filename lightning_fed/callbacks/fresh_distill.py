"""Distillation into a freshly initialised model (after Yoshida & Fujino, "Disabling Backdoor and Identifying
Poison Data by using Knowledge Distillation in Backdoor Attacks on Deep Neural Networks", AISec 2020; the
observation behind Li et al.'s Neural Attention Distillation, ICLR 2021) as a server-side FedLoop callback.

The backdoored global model is the teacher. A **new** model of the same architecture (every parameter re-drawn from
its module's own initialiser under a seeded generator: it inherits nothing of the teacher's weights) is trained to
match the teacher's softened outputs (:func:`~lightning_fed.callbacks.kd_losses.kd_loss` at ``temperature``) on a
transfer set the server holds: the unlabelled ``proxy`` records (e.g. FedDF's ``PublicData(1000, seed=7)``) and the
clean records' training part, optionally enlarged by cheap augmentations of each batch (Gaussian noise of
``noise`` times the records' standard deviation, circular shifts of up to ``shift`` positions, mixup with up to a share ``mixup`` of another
record). With ``alpha > 0`` the clean records' true labels add a cross-entropy term
(``(1 - alpha) * KD + alpha * CE``; the labelled records of a batch only, unmixed). The trigger never appears in
the transfer set, so the teacher's backdoor is never shown to the student; the student then replaces the global
model's weights. No trigger knowledge is used.

FedDF's distillation (:class:`~lightning_fed.strategies.FedDF`) starts its student from the averaged weights and so
keeps their backdoor; starting from scratch is the difference.

On MNIST-1D's backdoored CNN (benchmarks/RESULTS.md, "Distillation into a fresh model") it removes triggers that
write an alternating +-3 pattern (under 2 % attack success at 0.8-1.9 points of clean accuracy) but not triggers that
write a constant +3 (34-94 % remain): the student learns those from the teacher's outputs on clean records alone.
With ``patches > 0`` every batch also trains the student on a copy of its records with short patches written in
(:func:`patch`), to match the teacher's output on the records as they are: overwriting a few positions must not
change the answer. Then the constant triggers go too (under 5 % on every seed measured, clean accuracy kept on the
mean: benchmarks/RESULTS.md, "Distillation into a fresh model with patched copies"), for any short trigger the
patches can cover (``patch_max`` positions, values up to ``patch_amplitude`` standard deviations).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fed.callbacks._defence import CleanDataDefence, accuracy, batches, device_of, model_copy
from lightning_fed.callbacks.kd_losses import kd_loss
from lightning_fed.data.public import PublicData
from lightning_fed.seeding import Stream, derive_seed, generator
from lightning_fed.validation import need


def fresh_model(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every parameter re-initialised: each submodule's own ``reset_parameters`` under
    torch's global generator seeded with ``seed`` (restored afterwards). Buffers are copied as they are.

    Raises:
        ValueError: a parameter of ``model`` belongs to no submodule with ``reset_parameters`` (it could not be
            re-drawn, and would carry the teacher's values).
    """
    fresh = model_copy(model)
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    reset: set[str] = set()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, module in fresh.named_modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
                reset.update(f"{name}.{n}" if name else n for n, _ in module.named_parameters(recurse=False))
    kept = [n for n in before if n not in reset]
    if kept:
        raise ValueError(
            f"FreshDistill: parameters {kept} of {type(model).__name__} belong to no submodule with "
            "reset_parameters(); the student could not be freshly initialised"
        )
    return fresh


def augment(x: Tensor, noise: float, shift: int, mixup: float, scale: float, gen: torch.Generator) -> Tensor:
    """``x`` (``[B, ...]``, the last dimension a sequence) mixed with a shuffled copy of itself (``mixup > 0``: each
    record takes a share drawn uniformly from ``[0, mixup]`` of another), circularly shifted by up to ``shift``
    positions either way, plus Gaussian noise of standard deviation ``noise * scale``; every draw from ``gen``."""
    out = x
    if mixup > 0 and len(x) > 1:
        share = mixup * torch.rand(len(x), generator=gen).view(-1, *([1] * (x.ndim - 1)))
        out = (1 - share) * out + share * out[torch.randperm(len(x), generator=gen)]
    if shift > 0:
        steps = torch.randint(-shift, shift + 1, (len(x),), generator=gen)
        out = torch.stack([torch.roll(r, int(s), dims=-1) for r, s in zip(out, steps, strict=True)])
    if noise > 0:
        out = out + noise * scale * torch.randn(out.shape, generator=gen)
    return out


PATCH_FILLS = ("constant", "alternating", "noise")


def patch(
    x: Tensor, count: int, min_len: int, max_len: int, amplitude: float, scale: float, gen: torch.Generator
) -> Tensor:
    """A copy of ``x`` (records along dimension 0) with ``count`` patches written into every record, each at a place
    and with a fill of its own: a segment of the last dimension for 1-D records, a square of the last two for
    records of two or more dimensions (every channel alike), its side drawn uniformly from ``[min_len, max_len]``.
    A patch may hang over the record's edge (its start is drawn uniformly from ``[-(side - 1), n - 1]`` and the part
    outside is cut off), so that every position is covered equally often: placed only inside, a patch would cover
    the first and last positions ``side`` times less often than the middle ones, where triggers like to sit. Each
    patch is filled, with equal chance, by a constant ``c``, by ``c`` with alternating signs (a checkerboard in
    2-D), or by Gaussian noise of standard deviation ``|c| / 2``, where ``c`` is drawn uniformly from
    ``[-amplitude, amplitude] * scale``. Every draw comes from ``gen``; the draws are the same for the same
    ``gen`` and shapes.

    Raises:
        ValueError: a record has no dimension to patch, ``min_len`` is not in ``[1, max_len]``, or ``max_len``
            exceeds a patched dimension.
    """
    if x.ndim < 2:
        raise ValueError(
            f"patch: records of shape {tuple(x.shape[1:])}: need at least one dimension to patch"
        )
    sides = tuple(x.shape[-1:]) if x.ndim == 2 else tuple(x.shape[-2:])
    if not 1 <= min_len <= max_len or max_len > min(sides):
        raise ValueError(
            f"patch: sides [{min_len}, {max_len}] do not fit records of shape {tuple(x.shape[1:])}: "
            f"need 1 <= min_len <= max_len <= {min(sides)}"
        )
    out = x.clone()
    b = len(x)
    for _ in range(count):
        side = torch.randint(min_len, max_len + 1, (b,), generator=gen)
        hit = torch.ones((b, *sides), dtype=torch.bool)
        parity = torch.zeros((b, *sides), dtype=torch.long)
        for d, n in enumerate(sides):  # the patch's extent along each patched dimension
            start = (torch.rand(b, generator=gen) * (n + side - 1)).long() - (side - 1)
            pos = torch.arange(n).view(1, *([1] * d), n, *([1] * (len(sides) - d - 1)))
            first = start.view(b, *([1] * len(sides)))
            hit &= (pos >= first) & (pos < first + side.view(b, *([1] * len(sides))))
            parity = parity + pos - first
        c = (torch.rand(b, generator=gen) * 2 - 1) * amplitude * scale
        kind = torch.randint(0, len(PATCH_FILLS), (b,), generator=gen)
        noise = torch.randn((b, *sides), generator=gen)
        cv = c.view(b, *([1] * len(sides)))
        signs = torch.where(parity % 2 == 0, 1.0, -1.0)
        fill = torch.where(
            kind.view(b, *([1] * len(sides))) == 0,
            cv.expand(b, *sides),
            torch.where(kind.view(b, *([1] * len(sides))) == 1, cv * signs, noise * cv.abs() / 2),
        )
        hit_full = hit.view(b, *([1] * (x.ndim - 1 - len(sides))), *sides).expand(x.shape)
        fill_full = fill.view(b, *([1] * (x.ndim - 1 - len(sides))), *sides).expand(x.shape).to(x.dtype)
        out = torch.where(hit_full, fill_full, out)
    return out


class FreshDistill(CleanDataDefence):
    """Distillation of the global model into a freshly initialised student on the server at the end of the rounds in
    ``at`` (module docstring); the student's weights replace the global model's. FedLoop only: under
    ``lightning.Trainer`` it does nothing.

    Round metrics at a step: ``fresh_acc_before`` (clean held-out accuracy of the global model, the teacher) and
    ``fresh_acc_after`` (of the student, now the global model), ``fresh_agreement`` (share of the held-out records
    on which they agree), ``fresh_transfer`` (records in the transfer set).

    Example::

        clean = PublicData(num_samples=500, seed=7, labeled=True)
        proxy = PublicData(num_samples=1000, seed=7)
        loop = FedLoop(..., callbacks=[FreshDistill(clean=clean, proxy=proxy, patches=2), Backdoor(...)])

    Args:
        clean: the server's clean data, a labelled :class:`~lightning_fed.data.PublicData`; its training part joins
            the transfer set, its held-out part measures clean accuracy.
        proxy: unlabelled records added to the transfer set (``None``: the clean training part only).
        at: 0-based rounds at whose end a step runs (an int or a list); ``None``: the run's last round.
        holdout: share of the clean data held out to measure clean accuracy on, in ``[0, 1)``.
        epochs: passes over the transfer set (>= 1).
        lr, momentum, batch_size: SGD settings of the student (cosine-annealed to 0 over the epochs).
        temperature: the distillation temperature (> 0).
        alpha: weight of the clean records' cross-entropy, in ``[0, 1]`` (0: distillation only).
        noise: Gaussian noise added to each transfer batch, in units of the transfer set's standard deviation
            (>= 0; 0: none).
        shift: largest circular shift of each transfer record, in positions (>= 0; 0: none).
        mixup: largest share of another record of the batch mixed into each transfer record, in ``[0, 0.5]`` (0:
            none).
        patches: patches written into a copy of each transfer record (0: none). With ``patches > 0`` every batch
            also trains the student on a patched copy of its records (:func:`patch`) to match the teacher's output on
            the records as they are: overwriting a short segment must not change the answer, so a trigger the
            student would otherwise pick up from the teacher's outputs on clean records is not learnt.
        patch_min, patch_max: the sides of the patches, drawn uniformly from ``[patch_min, patch_max]`` positions.
        patch_amplitude: the largest value a patch writes, in units of the transfer set's standard deviation (> 0).
        init_seed: seed of the student's initialisation.
        seed: seed of the clean split and of the batches and augmentations.
    """

    owner = "FreshDistill"
    stream = Stream.FRESH_DISTILL
    prefix = "fresh"

    def __init__(
        self,
        clean: PublicData,
        proxy: PublicData | None = None,
        at: int | list[int] | None = None,
        holdout: float = 0.2,
        epochs: int = 60,
        lr: float = 0.05,
        momentum: float = 0.9,
        batch_size: int = 64,
        temperature: float = 4.0,
        alpha: float = 0.0,
        noise: float = 0.0,
        shift: int = 0,
        mixup: float = 0.0,
        patches: int = 0,
        patch_min: int = 2,
        patch_max: int = 8,
        patch_amplitude: float = 4.0,
        init_seed: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(clean, at, holdout, epochs, lr, momentum, batch_size, seed)
        need(self.owner, epochs >= 1, "epochs", epochs, "an integer >= 1")
        need(self.owner, temperature > 0, "temperature", temperature, "> 0")
        need(self.owner, 0 <= alpha <= 1, "alpha", alpha, "in [0, 1]")
        need(self.owner, noise >= 0, "noise", noise, ">= 0")
        need(
            self.owner,
            shift >= 0,
            "shift",
            shift,
            "an integer >= 0",
        )
        need(self.owner, 0 <= mixup <= 0.5, "mixup", mixup, "in [0, 0.5]")
        need(self.owner, patches >= 0, "patches", patches, "an integer >= 0")
        need(self.owner, patch_min >= 1, "patch_min", patch_min, "an integer >= 1")
        need(
            self.owner,
            patch_max >= patch_min,
            "patch_max",
            patch_max,
            f"an integer >= patch_min ({patch_min})",
        )
        need(
            self.owner,
            patch_amplitude > 0,
            "patch_amplitude",
            patch_amplitude,
            "> 0",
        )
        record = tuple(clean.x.shape[1:])
        sides = record[-1:] if len(record) == 1 else record[-2:]
        need(
            self.owner,
            not patches or (len(sides) > 0 and patch_max <= min(sides)),
            "patch_max",
            patch_max,
            f"at most the records' side ({min(sides) if sides else 0} for the clean records of shape {record})",
        )
        self.proxy = proxy
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.noise = float(noise)
        self.shift = shift
        self.mixup = float(mixup)
        self.patches = patches
        self.patch_min = patch_min
        self.patch_max = patch_max
        self.patch_amplitude = float(patch_amplitude)
        self.init_seed = init_seed

    def transfer_set(self) -> tuple[Tensor, Tensor]:
        """``(x, y)``: the proxy records (label -1) followed by the clean training part (its labels)."""
        xt, yt, _, _ = self.data()
        if self.proxy is None:
            return xt, yt
        xp = self.proxy.x.to(xt.dtype)
        return torch.cat([xp, xt]), torch.cat([torch.full((len(xp),), -1, dtype=yt.dtype), yt])

    def distill(self, teacher: nn.Module, server_round: int) -> nn.Module:
        """A student freshly initialised (``init_seed`` and the round) and trained to match ``teacher`` on the
        transfer set; ``teacher`` is left unchanged."""
        x, y = self.transfer_set()
        dev = device_of(teacher)
        student = fresh_model(teacher, derive_seed(self.init_seed, self.stream, server_round))
        student.train()
        was = teacher.training
        teacher.eval()
        grads = [p.requires_grad for p in teacher.parameters()]
        teacher.requires_grad_(False)
        gen = generator(self.seed, self.stream, server_round)
        scale = float(x.float().std())
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        steps = self.epochs * -(-len(x) // self.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        try:
            with torch.enable_grad():
                for _ in range(self.epochs):
                    for idx in batches(len(x), self.batch_size, gen):
                        xb, yb = x[idx], y[idx]
                        xa = augment(xb, self.noise, self.shift, self.mixup, scale, gen)
                        with torch.no_grad():
                            t = teacher(xa.to(dev))
                        if self.patches:  # the patched copies answer what the records as they are answer
                            xp = patch(
                                xa,
                                self.patches,
                                self.patch_min,
                                self.patch_max,
                                self.patch_amplitude,
                                scale,
                                gen,
                            )
                            loss = kd_loss(
                                student(torch.cat([xa, xp]).to(dev)), torch.cat([t, t]), self.temperature
                            )
                        else:
                            loss = kd_loss(student(xa.to(dev)), t, self.temperature)
                        if self.alpha > 0:
                            lab = yb >= 0
                            loss = (1 - self.alpha) * loss
                            if bool(lab.any()):
                                loss = loss + self.alpha * F.cross_entropy(
                                    student(xb[lab].to(dev)), yb[lab].to(dev)
                                )
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
        finally:
            for p, r in zip(teacher.parameters(), grads, strict=True):
                p.requires_grad_(r)
            teacher.train(was)
        opt.zero_grad(set_to_none=True)
        return student

    def defend(self, trainer: Any, pl_module: nn.Module, server_round: int) -> dict[str, Any]:
        """Distil ``pl_module`` into a fresh student and load the student's weights into ``pl_module``."""
        xe, ye = self.eval_part()
        before = accuracy(pl_module, xe, ye)
        student = self.distill(pl_module, server_round)
        agree = _agreement(pl_module, student, xe)
        with torch.no_grad():
            pl_module.load_state_dict(copy.deepcopy(student.state_dict()))
        return {
            "acc_before": before,
            "acc_after": accuracy(pl_module, xe, ye),
            "agreement": agree,
            "transfer": len(self.transfer_set()[0]),
        }


@torch.no_grad()
def _agreement(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    """Share of ``x`` on which ``a`` and ``b`` (both in eval mode; modes restored) predict the same class."""
    if len(x) == 0:
        return float("nan")
    modes = a.training, b.training
    a.eval()
    b.eval()
    try:
        dev = device_of(a)
        return float((a(x.to(dev)).argmax(1) == b(x.to(dev)).argmax(1)).float().mean())
    finally:
        a.train(modes[0])
        b.train(modes[1])


__all__ = ["PATCH_FILLS", "FreshDistill", "augment", "fresh_model", "patch"]
