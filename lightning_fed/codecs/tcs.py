"""Time-correlated sparsification: most sent positions come from a mask every client shares.

Ozfatura, Ozfatura & Gündüz, "Time-Correlated Sparsification for Communication-Efficient Federated
Learning", ISIT 2021. The large entries of successive global updates sit at largely the same positions, so
the server broadcasts a global mask (the ``mask_ratio`` largest entries of the last round's aggregated
update) and a client sends its (error-corrected) values at those positions without any index bytes, plus
its own top ``ratio`` entries outside the mask with Elias-Fano coded indices. The mask costs downlink
bytes once per sampled client, which the loop counts (:meth:`TimeCorrelatedTopK.broadcast`).

The server side of the codec sums the vectors it decodes in a round; at the next ``on_round_start`` the
mask becomes the top of that sum. In this single-process simulation the client side reads the same mask
from the same object; the bytes it would take to send it are the Elias-Fano code in :meth:`broadcast`.
Use it for the uplink only (``codec=``), not as ``downlink_codec``. Every message carries a 2-byte digest
of the mask it was encoded against; a message encoded against another mask is rejected.

On the wire: the mask digest (2 bytes), ``k`` (varint), the Elias-Fano code of the ``k`` new positions,
then the values at the mask positions and the new positions, in index order, through the value codec.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from lightning_fed.codecs.bits import ef_decode, ef_encode, ef_size
from lightning_fed.codecs.frame import Reader, Writer
from lightning_fed.codecs.layout import Layout
from lightning_fed.codecs.topk import TopK
from lightning_fed.codecs.vector import ValueCodec, read_values, value_config, write_values
from lightning_fed.codecs.wire import MalformedMessage


def _digest(mask: Tensor) -> bytes:
    return hashlib.blake2b(mask.to(torch.int64).numpy().tobytes(), digest_size=2).digest()


class TimeCorrelatedTopK(TopK):
    """Values at a broadcast global mask (no index bytes) plus each client's own top entries outside it.

    Example::

        codec = TimeCorrelatedTopK(ratio=0.005, mask_ratio=0.2, values=Sign(block=64, scale_dtype="float16"))
        loop = FedLoop(..., codec=codec)   # bytes_down also counts the mask sent to each sampled client

    Args:
        ratio: density of the client's own top entries outside the mask (with index bytes), in ``(0, 1]``.
        mask_ratio: size of the global mask as a fraction of the update, in ``[0, 1]``; the first round has
            no mask (only the ``ratio`` entries are sent).
        values: codec of the sent values (``None`` = float32).
        error_feedback: keep what was not sent (and the value codec's error) for the next round.
        warmup_rounds: rounds of density warm-up of the client's own entries (see :class:`TopK`).
        warmup_start: their density at round 0 of the warm-up.
        residual_decay: see :class:`TopK`.
        self_describing: also send the layout.
    """

    name = "tcs"

    def __init__(
        self,
        ratio: float = 0.005,
        mask_ratio: float = 0.2,
        values: ValueCodec | None = None,
        *,
        error_feedback: bool = True,
        warmup_rounds: int = 0,
        warmup_start: float = 0.25,
        residual_decay: float = 1.0,
        self_describing: bool = False,
    ) -> None:
        if not 0 <= mask_ratio <= 1:
            raise ValueError(f"TimeCorrelatedTopK: mask_ratio={mask_ratio!r} is not allowed; it must be in [0, 1]")
        super().__init__(ratio, values, error_feedback=error_feedback, warmup_rounds=warmup_rounds,
                         warmup_start=warmup_start,
                         residual_decay=residual_decay, self_describing=self_describing)
        self.mask_ratio = mask_ratio
        self.mask = torch.zeros(0, dtype=torch.int64)  # sorted positions of the current global mask
        self.mask_numel = 0  # the update size the mask was built for (0: none)
        self._sum: Tensor | None = None  # server side: sum of the vectors decoded this round

    def wire_config(self) -> str:
        """``tcs(sign(64,float16))`` and the like (the mask itself is checked by its digest)."""
        return f"tcs({value_config(self.values)})"

    # ------------------------------------------------------------------ the shared mask
    def on_round_start(self, server_round: int) -> None:
        """Build this round's mask from the sum of the vectors decoded last round."""
        super().on_round_start(server_round)
        if self._sum is None:
            return
        s, self._sum = self._sum, None
        k = min(int((s != 0).sum()), round(self.mask_ratio * s.numel()))
        top = torch.topk(s.abs(), k, sorted=False).indices if k else torch.zeros(0, dtype=torch.int64)
        self.mask, self.mask_numel = top.sort().values, s.numel()

    def _mask_for(self, n: int) -> Tensor:
        return self.mask if self.mask_numel == n else torch.zeros(0, dtype=torch.int64)

    def broadcast(self) -> bytes:
        """What every sampled client must receive this round: the mask size (varint) and its Elias-Fano code."""
        if self.mask_numel == 0:
            return b""
        w = Writer()
        w.varint(len(self.mask))
        w.raw(ef_encode(self.mask, self.mask_numel))
        return w.getvalue()

    # ------------------------------------------------------------------ client side
    def encode_flat(self, x: Tensor, state: dict[str, Tensor], w: Writer, layout: Layout) -> Tensor:
        """Error feedback; values at the mask and at the top entries outside it."""
        v = self.corrected(x, state, layout)
        n = v.numel()
        mask = self._mask_for(n)
        score = v.abs()
        score[mask] = -1.0  # never pick a mask position twice
        k = min(n - len(mask), max(1, round(self.kept_density() * n))) if n else 0
        new = torch.topk(score, k, sorted=False).indices.sort().values if k else torch.zeros(0, dtype=torch.int64)
        w.raw(_digest(mask))
        w.varint(len(new))
        w.raw(ef_encode(new, n))
        idx = torch.cat([mask, new]).sort().values
        sent = torch.zeros_like(v)
        sent[idx] = write_values(self.values, v[idx], w)
        if self.error_feedback:
            state["residual"] = v - sent
        return sent

    # ------------------------------------------------------------------ server side
    def decode_vector(self, r: Reader, layout: Layout) -> Tensor:
        """Check the mask digest; read the new positions and the values; add the vector to the round's sum."""
        n = layout.numel
        mask = self._mask_for(n)
        if bytes(r.take(2, "mask digest")) != _digest(mask):
            raise MalformedMessage("tcs: the message was encoded against another global mask (stale or foreign)")
        k = r.varint("k", n - len(mask))
        new = ef_decode(r.take(ef_size(k, n), "new positions"), k, n)
        idx = torch.cat([mask, new])
        if len(torch.unique(idx)) != len(idx):
            raise MalformedMessage("tcs: a new position repeats a mask position")
        idx = idx.sort().values
        out = torch.zeros(n)
        out[idx] = read_values(self.values, r, len(idx))
        self._sum = out.clone() if self._sum is None or self._sum.numel() != n else self._sum.add_(out)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Round, mask and the running sum (a resumed run rebuilds the same mask)."""
        return {**super().state_dict(), "mask": self.mask.clone(), "mask_numel": self.mask_numel,
                "sum": None if self._sum is None else self._sum.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.mask = state.get("mask", torch.zeros(0, dtype=torch.int64)).to(torch.int64)
        self.mask_numel = int(state.get("mask_numel", 0))
        s = state.get("sum")
        self._sum = None if s is None else s.clone()
