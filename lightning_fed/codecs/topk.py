"""Top-k sparsification with error feedback and the Deep Gradient Compression refinements.

Lin et al., "Deep Gradient Compression", ICLR 2018; error feedback after Seide et al. 2014 and Stich et al.,
"Sparsified SGD with Memory", NeurIPS 2018. Each round the client adds its update to the residual it kept,
sends the ``k`` largest-magnitude entries and keeps the rest (error feedback: nothing is dropped, only
delayed). The DGC refinements, as they apply to per-round model deltas:

* momentum correction: accumulate ``u = m * u + delta`` and sparsify ``v = residual + u`` (``momentum > 0``);
* momentum-factor masking: zero ``u`` where entries were sent, so stale momentum does not resend them;
* density warm-up: the density decays exponentially from ``warmup_start`` to ``ratio`` over the first
  ``warmup_rounds`` rounds (DGC: 25 % → 6.25 % → 1.56 % → 0.4 % → 0.1 %).

The round of the warm-up is ``EncodeArgs.round`` and ``EncodeArgs.share`` scales the density of one message
(the client's part of the uplink budget, see ``FedLoop(uplink_allocation=...)``); ``k`` is on the wire, so the
decoder needs neither. The codec keeps no state of its own: what a client carries over (residual, momentum)
lives in the client's state dict.

With ``group=g > 1`` the update is cut into consecutive groups of ``g`` entries and the groups with the largest
L1 norm are sent whole (block sparsification): one index per group instead of per entry, so at the same bytes
more entries cross the wire, at the price of sending some small entries that share a group with large ones.

On the wire: ``k`` (varint), the Elias-Fano code of the sorted indices (about ``2 + log2(n/k)`` bits each;
group indices with ``group > 1``), then the kept values through the value codec (raw float32 by default).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_fed.codecs.base import DecodeArgs, EncodeArgs
from lightning_fed.codecs.bits import ef_decode, ef_encode, ef_size
from lightning_fed.codecs.frame import Reader, Writer
from lightning_fed.codecs.vector import (
    ValueCodec,
    VectorCodec,
    check_values,
    client_tensor,
    read_values,
    value_config,
    write_values,
)
from lightning_fed.flat import FlatSpec


class TopK(VectorCodec):
    """Send the ``ratio`` fraction of largest-magnitude entries of the (error-corrected) update.

    Example::

        codec = TopK(ratio=0.01, values=QSGD(levels=7))                 # top-1 %, 4-bit values
        codec = TopK(ratio=0.001, momentum=0.9, warmup_rounds=10)       # DGC
        loop = FedLoop(..., codec=codec)

    Args:
        ratio: final density ``k / n`` in ``(0, 1]``.
        values: codec of the kept values (``None`` = float32): ``Cast``, ``Blockwise8bit``, ``QSGD``, ``Sign``…
        error_feedback: keep what was not sent (and the value codec's error) for the next round.
        momentum: DGC momentum correction factor ``m`` in ``[0, 1)``; 0 disables it.
        momentum_masking: with momentum, zero the momentum of the entries that were sent.
        warmup_rounds: rounds of exponential density warm-up from ``warmup_start`` down to ``ratio``.
        warmup_start: density at round 0 of the warm-up.
        residual_decay: multiply the kept residual by this factor in ``[0, 1]`` before adding the next update
            (1 = plain error feedback). With partial participation a client's residual can be several rounds
            old and pull toward the same local optimum as its fresh update; decay trades that for lost mass.
        group: send consecutive groups of this many entries (chosen by L1 norm); ``ratio`` still counts entries.
        layerwise: choose the top entries of every tensor separately (``round(density * size)``, at least one
            per tensor) instead of over the whole update, so layers with small updates are not starved; the
            wire format is the same.
        self_describing: also send the layout.
    """

    name = "topk"

    def __init__(
        self,
        ratio: float = 0.01,
        values: ValueCodec | None = None,
        *,
        error_feedback: bool = True,
        momentum: float = 0.0,
        momentum_masking: bool = True,
        warmup_rounds: int = 0,
        warmup_start: float = 0.25,
        residual_decay: float = 1.0,
        group: int = 1,
        layerwise: bool = False,
        self_describing: bool = False,
    ) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"TopK: ratio={ratio!r} is not allowed; ratio must be in (0, 1]")
        check_values("TopK", values)
        if not 0 <= momentum < 1:
            raise ValueError(f"TopK: momentum={momentum!r} is not allowed; momentum must be in [0, 1)")
        if warmup_rounds < 0:
            raise ValueError(
                f"TopK: warmup_rounds={warmup_rounds!r} is not allowed; warmup_rounds must be >= 0"
            )
        if warmup_rounds > 0 and not ratio <= warmup_start <= 1:  # only a warm-up reads warmup_start
            raise ValueError(
                f"TopK: warmup_start={warmup_start!r} is not allowed; warmup_start must be in [ratio={ratio}, 1]"
            )
        if not 0 <= residual_decay <= 1:
            raise ValueError(f"TopK: residual_decay={residual_decay!r} is not allowed; it must be in [0, 1]")
        if group < 1:
            raise ValueError(f"TopK: group={group!r} is not allowed; group must be >= 1")
        if group > 1 and layerwise:
            raise ValueError("TopK: group > 1 with layerwise=True is not supported; use one of them")
        super().__init__(error_feedback=error_feedback, self_describing=self_describing)
        self.group = group
        self.residual_decay = residual_decay
        self.ratio, self.values, self.momentum, self.momentum_masking = (
            ratio,
            values,
            momentum,
            momentum_masking,
        )
        self.warmup_rounds, self.warmup_start = warmup_rounds, warmup_start
        self.layerwise = layerwise

    def wire_config(self) -> str:
        """``topk(f32)``, ``topk(qsgd(7,256,l2))``…: only the value codec matters to the decoder."""
        g = f"g{self.group}," if self.group > 1 else ""
        return f"topk({g}{value_config(self.values)})"

    def density(self, server_round: int) -> float:
        """The density (before the client's share) used in ``server_round``: the warm-up's, then ``ratio``."""
        if server_round >= self.warmup_rounds:
            return self.ratio
        return self.warmup_start * (self.ratio / self.warmup_start) ** (server_round / self.warmup_rounds)

    def kept_density(self, args: EncodeArgs) -> float:
        """The density of one message: :meth:`density` of ``args.round`` times the client's ``args.share`` of the
        budget, at most 1."""
        return min(1.0, self.density(args.round) * args.share)

    def num_kept(self, n: int, args: EncodeArgs) -> int:
        """``k`` for a vector of ``n`` elements in a message encoded with ``args``."""
        return min(n, max(1, round(self.kept_density(args) * n))) if n else 0

    def select(self, v: Tensor, layout: FlatSpec, args: EncodeArgs) -> Tensor:
        """Sorted indices of the entries (groups, with ``group > 1``) to send: the top ``num_kept`` of ``v``
        (or of each tensor)."""
        if self.group > 1:
            groups = self._group_norms(v)
            k = min(len(groups), max(1, round(self.kept_density(args) * v.numel() / self.group))) if len(groups) else 0
            if k == 0:
                return torch.zeros(0, dtype=torch.int64)
            return torch.topk(groups, k, sorted=False).indices.sort().values
        if not self.layerwise:
            k = self.num_kept(v.numel(), args)
            if k == 0:
                return torch.zeros(0, dtype=torch.int64)
            return torch.topk(v.abs(), k, sorted=False).indices.sort().values
        parts = []
        for off, size in zip(layout.offsets, layout.sizes):
            k = self.num_kept(size, args)
            if k:
                parts.append(torch.topk(v[off : off + size].abs(), k, sorted=False).indices + off)
        return torch.cat(parts).sort().values if parts else torch.zeros(0, dtype=torch.int64)

    def _group_norms(self, v: Tensor) -> Tensor:
        pad = (-v.numel()) % self.group
        a = v.abs()
        return (torch.cat([a, a.new_zeros(pad)]) if pad else a).view(-1, self.group).sum(1)

    def _entries(self, groups: Tensor, n: int) -> Tensor:
        """The entry indices of the sorted ``groups`` (the last group may be cut at ``n``)."""
        if self.group == 1:
            return groups
        idx = (groups.unsqueeze(1) * self.group + torch.arange(self.group)).reshape(-1)
        return idx[idx < n]

    def corrected(self, u: Tensor, state: dict[str, Any], layout: FlatSpec) -> Tensor:
        """The vector to sparsify: ``u`` plus the (decayed) residual with error feedback, else ``u``."""
        if not self.error_feedback:
            return u
        res = client_tensor(state, "residual", layout)
        return (res * self.residual_decay if self.residual_decay != 1 else res) + u

    def encode_flat(self, x: Tensor, state: dict[str, Any], w: Writer, layout: FlatSpec, args: EncodeArgs) -> Tensor:
        """Momentum correction, error feedback, top-k, value coding, momentum-factor masking."""
        if self.momentum > 0:
            u = client_tensor(state, "momentum", layout)
            u.mul_(self.momentum).add_(x)
        else:
            u = x
        v = self.corrected(u, state, layout)
        sel = self.select(v, layout, args)
        w.varint(len(sel))
        w.raw(ef_encode(sel, -(-v.numel() // self.group)))
        idx = self._entries(sel, v.numel())
        sent_vals = write_values(self.values, v[idx], w)
        sent = torch.zeros_like(v)
        sent[idx] = sent_vals
        if self.error_feedback:
            state["residual"] = v - sent
        if self.momentum > 0 and self.momentum_masking:
            u[idx] = 0.0
        return sent

    def encode_vector(self, x: Tensor, state: dict[str, Any], w: Writer, layout: FlatSpec, args: EncodeArgs) -> Tensor:
        """Top-k of ``x`` without feedback (used only through :meth:`encode_flat`)."""
        return self.encode_flat(x, {}, w, layout, args)

    def decode_vector(self, r: Reader, layout: FlatSpec, state: dict[str, Any], args: DecodeArgs) -> Tensor:
        """``k``, the indices (validated: distinct, in range), the values; zeros elsewhere."""
        n = layout.numel
        slots = -(-n // self.group)
        k = r.varint("k", slots)
        idx = self._entries(ef_decode(r.take(ef_size(k, slots), "top-k indices"), k, slots), n)
        out = torch.zeros(n)
        out[idx] = read_values(self.values, r, len(idx))
        return out
