"""A mixture-of-experts layer in plain PyTorch (runs on CPU): top-k routing, capacity, auxiliary losses.

Each input vector (a token, or a whole sample when the input is ``[B, d]``) is routed by a softmax router
to ``k`` of ``num_experts`` experts (Shazeer et al. 2017, "Outrageously Large Neural Networks"; noisy top-k
gating from the same paper). With a capacity factor, each expert processes at most
``ceil(capacity_factor * tokens * k / num_experts)`` assignments per forward and the rest are dropped
(GShard, Lepikhin et al. 2021; Switch Transformer, Fedus et al. 2022); ``capacity_factor=None`` is dropless.
The Switch load-balancing loss and the router z-loss (ST-MoE, Zoph et al. 2022) are computed every forward.

Experts are any modules mapping ``[n, in_features]`` to ``[n, out_features]`` (copies of a dense
feed-forward block when converted with :func:`~lightning_fed.moe.convert.convert_to_moe`). The computation
is batched per expert: assignments are sorted by expert once and each expert runs once on its contiguous
group (a loop over experts, never over samples).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fed.validation import CheckedArguments


@dataclass
class RoutingStats:
    """What one training forward of a :class:`MoELayer` measured.

    Attributes:
        balance_loss: Switch load-balancing loss ``E * sum_e f_e * P_e`` (differentiable; 1.0 when balanced).
        z_loss: router z-loss ``mean(logsumexp(logits) ** 2)`` (differentiable).
        load: fraction of the kept assignments each expert processed, shape ``[E]`` (detached).
        entropy: mean entropy of the router's distribution, in nats (detached).
        dropped: fraction of the ``tokens * k`` assignments dropped by the capacity limit (detached).
    """

    balance_loss: Tensor
    z_loss: Tensor
    load: Tensor
    entropy: Tensor
    dropped: Tensor


class MoELayer(CheckedArguments, nn.Module):
    """Top-k mixture of experts over the last dimension of its input.

    Example::

        ffn = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
        moe = MoELayer([copy.deepcopy(ffn) for _ in range(4)], in_features=64, k=1, capacity_factor=1.25)
        y = moe(torch.randn(32, 64))          # [32, 64]; each row ran through one expert
        stats = moe.stats[-1]                 # balance_loss, z_loss, load, entropy, dropped

    Args:
        experts: the expert modules (at least 2), each mapping ``[n, in_features]`` to ``[n, out_features]``.
        in_features: size of the input's last dimension (the router's input).
        k: experts per token (``1 <= k <= num_experts``).
        capacity_factor: training capacity per expert as a multiple of the balanced share
            ``tokens * k / num_experts``; ``None`` = dropless.
        eval_capacity_factor: the same in eval mode; ``None`` (default) = dropless.
        noisy_gating: add learned Gaussian noise to the router logits in training (noisy top-k gating).
        normalize_gates: the k gate values are the selected probabilities divided by their sum, so they
            add up to 1 (an upcycled layer whose experts are equal then computes exactly the original block).
            The sum is treated as a constant in backward, so the router still gets a gradient with ``k=1``.
            ``False`` uses the raw softmax probabilities (Switch-style scaling).
        router_init_std: standard deviation of the router's initial weights.
    """

    def __init__(
        self,
        experts: list[nn.Module] | nn.ModuleList,
        in_features: int,
        *,
        k: int = 1,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = None,
        noisy_gating: bool = False,
        normalize_gates: bool = True,
        router_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        experts = list(experts)
        if len(experts) < 2:
            raise ValueError(f"MoELayer: num_experts={len(experts)} is not allowed; need at least 2 experts")
        if in_features < 1:
            raise ValueError(f"MoELayer: in_features={in_features} is not allowed; must be >= 1")
        if router_init_std < 0:
            raise ValueError(f"MoELayer: router_init_std={router_init_std} is not allowed; must be >= 0")
        self.num_experts = len(experts)
        self.in_features = in_features
        self.set_routing(k=k, capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor)
        self.noisy_gating = noisy_gating
        self.normalize_gates = normalize_gates
        self.experts = nn.ModuleList(experts)
        ref = next(iter(self.experts[0].parameters()), None)
        kw = {"device": ref.device} if ref is not None else {}
        self.router = nn.Linear(in_features, self.num_experts, bias=False, **kw)
        nn.init.normal_(self.router.weight, std=router_init_std)
        if noisy_gating:
            self.noise = nn.Linear(in_features, self.num_experts, bias=False, **kw)
            nn.init.zeros_(self.noise.weight)
        else:
            self.noise = None
        # Assignments kept per expert in training forwards since the last reset (not in state_dict).
        self.register_buffer("token_counts", torch.zeros(self.num_experts, dtype=torch.long, **kw), persistent=False)
        self.stats: list[RoutingStats] = []
        self.keep_all_stats = False

    # ------------------------------------------------------------------ configuration
    def set_routing(
        self, *, k: int | None = None, capacity_factor: float | None | str = "keep",
        eval_capacity_factor: float | None | str = "keep",
    ) -> None:
        """Change ``k`` and/or the capacity factors (annealing); ``"keep"`` leaves a factor unchanged.

        Raises:
            ValueError: ``k`` outside ``[1, num_experts]`` or a capacity factor that is not ``None`` or > 0.
        """
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
                raise ValueError(f"MoELayer: k={k!r} is not allowed; k must be an int in [1, {self.num_experts}]")
            self.k = k
        for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if isinstance(value, str):
                if value != "keep":
                    raise ValueError(f"MoELayer: {name}={value!r} is not allowed; use a float > 0, None or 'keep'")
                continue
            if value is not None and not value > 0:
                raise ValueError(f"MoELayer: {name}={value!r} is not allowed; must be > 0 or None (dropless)")
            setattr(self, name, None if value is None else float(value))

    def capacity(self, num_tokens: int) -> int | None:
        """Assignments each expert may process for ``num_tokens`` tokens in the current mode (``None`` = all)."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return None
        return max(1, math.ceil(factor * num_tokens * self.k / self.num_experts))

    def reset_counts(self) -> None:
        """Zero :attr:`token_counts` (FedMoE does this when a client starts its round)."""
        self.token_counts.zero_()

    def pop_stats(self) -> list[RoutingStats]:
        """Return and clear the stats recorded since the last call."""
        out, self.stats = self.stats, []
        return out

    # ------------------------------------------------------------------ forward
    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Router of a flat batch ``x`` ``[n, in_features]``.

        Returns:
            ``(logits, probs, gates, experts)``: clean logits ``[n, E]`` (float32), the softmax of the
            (noisy, in training) logits ``[n, E]``, the k gate values ``[n, k]`` and the chosen experts
            ``[n, k]`` in decreasing probability.
        """
        xf = x.to(self.router.weight.dtype)
        logits = self.router(xf).float()
        noisy = logits
        if self.noise is not None and self.training:
            std = F.softplus(self.noise(xf).float())
            noisy = logits + torch.randn_like(logits) * std
        probs = noisy.softmax(dim=-1)
        top_p, top_e = probs.topk(self.k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True).detach() if self.normalize_gates else top_p
        return logits, probs, gates, top_e

    def forward(self, x: Tensor) -> Tensor:
        """Route every vector along the last dimension of ``x`` ``[..., in_features]`` to its experts."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        n, num_e, k = flat.shape[0], self.num_experts, self.k
        logits, probs, gates, top_e = self.route(flat)
        # Assignments in slot-major order, so first choices win capacity over second choices (GShard).
        expert_of = top_e.t().reshape(-1)
        token_of = torch.arange(n, device=flat.device).repeat(k)
        gate_of = gates.t().reshape(-1)
        order = torch.argsort(expert_of, stable=True)
        counts = torch.bincount(expert_of, minlength=num_e)
        starts = torch.cumsum(counts, 0) - counts
        cap = self.capacity(n)
        kept = counts if cap is None else counts.clamp(max=cap)
        kept_list, start_list = kept.tolist(), starts.tolist()
        out: Tensor | None = None
        for e in range(num_e):
            m = kept_list[e]
            if m == 0:
                continue
            idx = order[start_list[e] : start_list[e] + m]
            tokens = token_of[idx]
            y = self.experts[e](flat.index_select(0, tokens))
            y = y * gate_of[idx].unsqueeze(-1).to(y.dtype)
            if out is None:
                out = y.new_zeros((n, y.shape[-1]))
            out.index_add_(0, tokens, y)
        if out is None:  # only when there are no tokens: an empty batch through one expert gives the shape
            out = self.experts[0](flat)
        if self.training:
            self.token_counts += kept
            self._record(logits, probs, counts, kept, n)
        return out.reshape(*lead, out.shape[-1])

    def _record(self, logits: Tensor, probs: Tensor, counts: Tensor, kept: Tensor, n: int) -> None:
        if n == 0:
            return
        total = n * self.k
        frac = counts.float() / total  # f_e: share of assignments routed to e (before capacity)
        mean_p = probs.mean(dim=0)  # P_e: mean router probability of e
        stats = RoutingStats(
            balance_loss=self.num_experts * torch.sum(frac * mean_p),
            z_loss=torch.logsumexp(logits, dim=-1).pow(2).mean(),
            load=(kept.float() / kept.sum().clamp(min=1)).detach(),
            entropy=-(probs * probs.clamp_min(1e-9).log()).sum(-1).mean().detach(),
            dropped=(1.0 - kept.sum().float() / total).detach(),
        )
        self.stats = [*self.stats, stats] if self.keep_all_stats else [stats]

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, k={self.k}, capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}, noisy_gating={self.noisy_gating}")


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """The :class:`MoELayer` submodules of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}


def make_experts(block: nn.Module, num_experts: int, *, upcycle: bool = True) -> list[nn.Module]:
    """``num_experts`` deep copies of ``block``; with ``upcycle=False`` each copy is re-initialised
    (every submodule's ``reset_parameters``), so experts start different (training from scratch)."""
    experts = [copy.deepcopy(block) for _ in range(num_experts)]
    if not upcycle:
        for ex in experts:
            for m in ex.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    return experts


__all__ = ["MoELayer", "RoutingStats", "make_experts", "moe_layers"]
