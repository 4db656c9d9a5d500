"""Adversarial Neuron Pruning (ANP: Wu and Wang, "Adversarial Neuron Perturbations Expose Backdoored Models",
NeurIPS 2021) as a server-side FedLoop callback.

A backdoored network holds neurons that, slightly perturbed, make it misbehave on clean inputs: adversarial neuron
perturbations expose them. Every output channel ``k`` of the named ``layers`` (Conv / Linear) gets a mask
``m_k in [0, 1]`` (from 1) and, while the masks are learnt, a perturbation of its weight ``delta_k`` and of its bias
``xi_k`` in ``[-eps, eps]``: the channel computes ``(m_k + delta_k) (W_k x) + (1 + xi_k) b_k``. On the server's
clean training records, ``iterations`` times (one shuffled batch each): one signed-gradient ascent step of size
``eps`` on the perturbations (from a fresh random start in the box, projected back onto it), then one SGD step on the masks
of ``alpha * L(m) + (1 - alpha) * L(m + delta, 1 + xi)`` (clipped to ``[0, 1]``). The channels whose mask ends below
``threshold`` are pruned: their weights and bias are set to zero, so they output zero (the paper keeps a pruned
neuron's bias; zeroing it removes the neuron entirely). Nothing is fine-tuned afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fed.callbacks._defence import CleanDataDefence, accuracy, batches, device_of
from lightning_fed.data.public import PublicData
from lightning_fed.seeding import Stream, generator
from lightning_fed.validation import need

Masks = dict[str, Tensor]


class _Perturbed:
    """Forward hooks that scale each output channel of the named layers: ``(mask + delta) * (out - b) + (1 + xi) * b``
    (``delta``, ``xi`` optional)."""

    def __init__(self, model: nn.Module, layers: list[str]) -> None:
        self.model = model
        self.layers = layers
        self.mask: Masks = {}
        self.delta: Masks = {}
        self.xi: Masks = {}
        self.perturb = False
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in layers]

    def _hook(self, name: str) -> Any:
        def hook(mod: nn.Module, _inp: Any, out: Tensor) -> Tensor:
            shape = (1, -1) + (1,) * (out.ndim - 2)
            bias = mod.bias if getattr(mod, "bias", None) is not None else torch.zeros_like(self.mask[name])
            b = bias.detach().view(shape)
            if not self.perturb:
                return self.mask[name].view(shape) * (out - b) + b
            scale = (self.mask[name] + self.delta[name]).view(shape)
            return scale * (out - b) + (1 + self.xi[name]).view(shape) * b

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def check_layers(owner: str, model: nn.Module, layers: list[str]) -> None:
    """Every name in ``layers`` is a Conv or Linear submodule of ``model`` (naming the key otherwise)."""
    mods = dict(model.named_modules())
    bad = [n for n in layers if not isinstance(mods.get(n), nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear)]
    allowed = sorted(
        n for n, m in mods.items() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear)
    )
    need(
        owner,
        not bad,
        "layers",
        layers,
        f"Conv/Linear submodules of {type(model).__name__} ({bad} are not; allowed: {allowed})",
    )


@torch.no_grad()
def prune_(model: nn.Module, masks: Masks, threshold: float) -> dict[str, list[int]]:
    """Zero the weights and bias of every channel whose mask is below ``threshold``; return the pruned channels per
    layer."""
    pruned: dict[str, list[int]] = {}
    for name, m in masks.items():
        mod = model.get_submodule(name)
        idx = (m < threshold).nonzero().flatten()
        mod.weight[idx] = 0
        if mod.bias is not None:
            mod.bias[idx] = 0
        pruned[name] = idx.tolist()
    return pruned


class ANP(CleanDataDefence):
    """Adversarial neuron pruning on the server at the end of the rounds in ``at`` (module docstring). FedLoop only:
    under ``lightning.Trainer`` it does nothing.

    Round metrics at a step: ``anp_acc_before`` and ``anp_acc_after`` (clean held-out accuracy before and after
    pruning) and ``anp_pruned`` (channels pruned); the record also lists them per layer and keeps every mask.

    Example::

        clean = PublicData(num_samples=500, seed=7, labeled=True)
        loop = FedLoop(..., callbacks=[ANP(clean=clean, layers=["conv1", "conv2", "conv3"]), Backdoor(...)])

    Args:
        clean: the server's clean data, a labelled :class:`~lightning_fed.data.PublicData`.
        layers: Conv / Linear submodules whose output channels are masked.
        at: 0-based rounds at whose end a step runs (an int or a list); ``None``: the run's last round.
        holdout: share of the clean data held out to measure clean accuracy on, in ``[0, 1)``.
        eps: bound of the neuron perturbations (> 0; the paper's 0.4).
        alpha: weight of the unperturbed loss in the mask objective, in ``[0, 1]`` (the paper's 0.2).
        iterations: mask updates, one batch each (>= 0; the paper's 2000).
        threshold: channels whose mask ends below this are pruned, in ``[0, 1]`` (the paper's 0.2).
        lr, momentum, batch_size: SGD settings of the mask updates (the paper's 0.2, 0.9, 128).
        seed: seed of the clean split, the batches and the perturbations' start.
    """

    owner = "ANP"
    stream = Stream.ANP
    prefix = "anp"

    def __init__(
        self,
        clean: PublicData,
        layers: list[str],
        at: int | list[int] | None = None,
        holdout: float = 0.2,
        eps: float = 0.4,
        alpha: float = 0.2,
        iterations: int = 2000,
        threshold: float = 0.2,
        lr: float = 0.2,
        momentum: float = 0.9,
        batch_size: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__(clean, at, holdout, iterations, lr, momentum, batch_size, seed, epochs_key="iterations")
        need(
            "ANP",
            isinstance(layers, list | tuple)
            and len(layers) > 0
            and all(isinstance(n, str) and n for n in layers),
            "layers",
            layers,
            "a non-empty list of Conv/Linear submodule names (e.g. ['conv1', 'conv2', 'conv3'])",
        )
        need("ANP", eps > 0, "eps", eps, "> 0")
        need(
            "ANP",
            0 <= alpha <= 1,
            "alpha",
            alpha,
            "in [0, 1]",
        )
        need(
            "ANP",
            0 <= threshold <= 1,
            "threshold",
            threshold,
            "in [0, 1]",
        )
        self.layers = list(layers)
        self.eps = float(eps)
        self.alpha = float(alpha)
        self.iterations = iterations
        self.threshold = float(threshold)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check that every name in ``layers`` is a Conv or Linear submodule."""
        check_layers("ANP", pl_module, self.layers)

    def masks(self, model: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator) -> Masks:
        """The learnt mask of every channel of ``layers`` (``model`` is not changed; eval mode during the search, its
        mode restored)."""
        check_layers("ANP", model, self.layers)
        dev = device_of(model)
        hooks = _Perturbed(model, self.layers)
        sizes = {n: model.get_submodule(n).weight.shape[0] for n in self.layers}
        hooks.mask = {n: torch.ones(c, device=dev, requires_grad=True) for n, c in sizes.items()}

        def draw() -> Masks:
            return {n: ((torch.rand(c, generator=gen) * 2 - 1) * self.eps).to(dev) for n, c in sizes.items()}

        opt = torch.optim.SGD(list(hooks.mask.values()), lr=self.lr, momentum=self.momentum)
        was, grads = model.training, [p.requires_grad for p in model.parameters()]
        model.eval()
        model.requires_grad_(False)
        done = 0
        try:
            with torch.enable_grad():
                while done < self.iterations and len(x):
                    for idx in batches(len(x), self.batch_size, gen):
                        if done == self.iterations:
                            break
                        xb, yb = x[idx].to(dev), y[idx].to(dev)
                        hooks.delta, hooks.xi = draw(), draw()  # a random start in the box, every batch
                        noise = [v.requires_grad_(True) for v in (*hooks.delta.values(), *hooks.xi.values())]
                        hooks.perturb = True  # one signed ascent step on the perturbations
                        g = torch.autograd.grad(F.cross_entropy(model(xb), yb), noise)
                        with torch.no_grad():
                            for v, gv in zip(noise, g, strict=True):
                                v.requires_grad_(False)
                                v.add_(self.eps * gv.sign()).clamp_(-self.eps, self.eps)
                        opt.zero_grad(set_to_none=True)  # descent on the masks
                        hooks.perturb = False
                        loss = self.alpha * F.cross_entropy(model(xb), yb)
                        hooks.perturb = True
                        loss = loss + (1 - self.alpha) * F.cross_entropy(model(xb), yb)
                        loss.backward(inputs=list(hooks.mask.values()))
                        opt.step()
                        with torch.no_grad():
                            for m in hooks.mask.values():
                                m.clamp_(0, 1)
                        done += 1
        finally:
            hooks.remove()
            for p, r in zip(model.parameters(), grads, strict=True):
                p.requires_grad_(r)
            model.train(was)
        return {n: m.detach().cpu() for n, m in hooks.mask.items()}

    def defend(self, trainer: Any, pl_module: nn.Module, server_round: int) -> dict[str, Any]:
        """Learn the masks, prune the channels below ``threshold``."""
        xt, yt, _, _ = self.data()
        xe, ye = self.eval_part()
        before = accuracy(pl_module, xe, ye)
        masks = self.masks(pl_module, xt, yt, generator(self.seed, self.stream, server_round))
        pruned = prune_(pl_module, masks, self.threshold)
        return {
            "acc_before": before,
            "acc_after": accuracy(pl_module, xe, ye),
            "pruned": sum(len(v) for v in pruned.values()),
            "pruned_channels": pruned,
            "masks": {n: m.tolist() for n, m in masks.items()},
        }


__all__ = ["ANP", "check_layers", "prune_"]
