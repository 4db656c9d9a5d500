"""Time-correlated sparsification: most sent positions come from a mask every client shares.

Ozfatura, Ozfatura & Gündüz, "Time-Correlated Sparsification for Communication-Efficient Federated
Learning", ISIT 2021. The large entries of successive global updates sit at largely the same positions, so
the server broadcasts a global mask (the ``mask_ratio`` largest entries of the last round's aggregated
update) and a client sends its (error-corrected) values at those positions without any index bytes, plus
its own top ``ratio`` entries outside the mask with Elias-Fano coded indices. The mask costs downlink
bytes once per sampled client, which the loop counts (:meth:`TimeCorrelatedTopK.broadcast`).

The two halves share only messages. Server: :meth:`~TimeCorrelatedTopK.broadcast` sends the current mask,
:meth:`~TimeCorrelatedTopK.decode` reads a reply against it (and changes nothing), and
:meth:`~TimeCorrelatedTopK.accept` gets the round's replies that are aggregated and makes the top of their sum
the next mask, so a reply that was rejected or dropped never shapes it. Client: :meth:`~TimeCorrelatedTopK.encode`
parses the mask from ``EncodeArgs.broadcast``, the bytes it received. Use it for the uplink only (``codec=``),
not as ``downlink_codec``. Every message carries a 2-byte digest of the mask it was encoded against; a message
encoded against another mask is rejected.

On the wire: the mask digest (2 bytes), ``k`` (varint), the Elias-Fano code of the ``k`` new positions,
then the values at the mask positions and the new positions, in index order, through the value codec. The
broadcast: the mask size (varint), then the Elias-Fano code of the mask positions.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from lightning_fed.codecs.base import DecodeArgs, EncodeArgs
from lightning_fed.codecs.bits import ef_decode, ef_encode, ef_size
from lightning_fed.codecs.frame import Reader, Writer
from lightning_fed.codecs.topk import TopK
from lightning_fed.codecs.vector import ValueCodec, read_values, value_config, write_values
from lightning_fed.codecs.wire import MalformedMessage
from lightning_fed.flat import FlatSpec
from lightning_fed.protocol import Payload

_NO_MASK = torch.zeros(0, dtype=torch.int64)
_CACHE_SIZE = 4


def _digest(mask: Tensor) -> bytes:
    return hashlib.blake2b(mask.to(torch.int64).numpy().tobytes(), digest_size=2).digest()


def encode_mask(mask: Tensor, n: int) -> bytes:
    """The broadcast of ``mask`` (sorted positions below ``n``): its size (varint) and Elias-Fano code."""
    w = Writer()
    w.varint(len(mask))
    w.raw(ef_encode(mask, n))
    return w.getvalue()


def parse_mask(data: bytes, n: int) -> Tensor:
    """The mask a vector of ``n`` entries uses under the broadcast ``data`` (:func:`encode_mask`): its sorted
    positions, or none when ``data`` is empty or is not a mask over ``n`` entries (the model changed size).
    Both halves derive the mask with this function, so they agree on it whatever the bytes."""
    if not data:
        return _NO_MASK
    r = Reader(data)
    try:
        k = r.varint("mask size", n)
        mask = ef_decode(r.take(ef_size(k, n), "mask positions"), k, n)
        r.finish()
    except MalformedMessage:
        return _NO_MASK
    return mask


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
        self.mask = _NO_MASK  # server side: sorted positions of the current global mask
        self.mask_numel = 0  # …and the update size it was built for (0: none)
        self._parsed: OrderedDict[tuple[bytes, int], Tensor] = OrderedDict()  # parse_mask memo (pure function)

    def wire_config(self) -> str:
        """``tcs(sign(64,float16))`` and the like (the mask itself is checked by its digest)."""
        return f"tcs({value_config(self.values)})"

    # ------------------------------------------------------------------ the shared mask
    def _mask(self, data: bytes, n: int) -> Tensor:
        """:func:`parse_mask`, remembered for the last few broadcasts (every client of a round parses the same)."""
        key = (data, n)
        mask = self._parsed.get(key)
        if mask is None:
            mask = self._parsed[key] = parse_mask(data, n)
            while len(self._parsed) > _CACHE_SIZE:
                self._parsed.popitem(last=False)
        return mask

    def broadcast(self, server_round: int) -> bytes:
        """What every sampled client of ``server_round`` receives: the current mask (built by the last
        :meth:`accept` that had replies) as its size (varint) and Elias-Fano code; empty before the first."""
        if self.mask_numel == 0:
            return b""
        return encode_mask(self.mask, self.mask_numel)

    reads_accepted = True  # the next mask is the top of the accepted replies' sum

    def accept(self, server_round: int, payloads: list[Payload]) -> None:
        """Make the next mask the ``mask_ratio`` largest entries of the sum of the aggregated replies.

        ``payloads`` are the decoded replies of ``server_round`` that passed validation and the callbacks (what
        :meth:`decode` returned, in client order); each is flattened with its layout. With none, the mask is kept.
        """
        s: Tensor | None = None
        for payload in payloads:
            x = FlatSpec.from_floats(payload)[0].flatten(payload)
            s = x if s is None or s.numel() != x.numel() else s.add_(x)
        if s is None:
            return
        k = min(int((s != 0).sum()), round(self.mask_ratio * s.numel()))
        top = torch.topk(s.abs(), k, sorted=False).indices if k else _NO_MASK
        self.mask, self.mask_numel = top.sort().values, s.numel()

    # ------------------------------------------------------------------ client side
    def encode_flat(self, x: Tensor, state: dict[str, Any], w: Writer, layout: FlatSpec, args: EncodeArgs) -> Tensor:
        """Error feedback; values at the mask received in ``args.broadcast`` and at the top entries outside it."""
        v = self.corrected(x, state, layout)
        n = v.numel()
        mask = self._mask(args.broadcast, n)
        score = v.abs()
        score[mask] = -1.0  # never pick a mask position twice
        k = min(n - len(mask), max(1, round(self.kept_density(args) * n))) if n else 0
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
    def decode_vector(self, r: Reader, layout: FlatSpec, state: dict[str, Any], args: DecodeArgs) -> Tensor:
        """Check the mask digest against the server's current mask; read the new positions and the values."""
        n = layout.numel
        mask = self.mask if n == self.mask_numel else self._mask(self.broadcast(args.round), n)
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
        return out

    def state_dict(self) -> dict[str, Any]:
        """The server's mask (a resumed run broadcasts and decodes against the same mask)."""
        return {"mask": self.mask.clone(), "mask_numel": self.mask_numel}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.mask = state.get("mask", _NO_MASK).to(torch.int64)
        self.mask_numel = int(state.get("mask_numel", 0))
