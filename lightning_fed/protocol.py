"""The round protocol's messages: what the server sends a client and what a client sends back.

Payloads are ``dict[str, Tensor]``: global weights for FedAvg, but logits on public data for FedMD or
features for FedGKT. Everything a client returns is untrusted; :func:`validate_payload` checks it against
the spec the strategy expects before it may touch the server state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_fed.flat import contiguous_span

Payload = dict[str, Tensor]


@dataclass
class Instruction:
    """What the server sends one sampled client for one round.

    Attributes:
        client_id: the client this instruction is for.
        payload: tensors to load or use on the client (the global weights for FedAvg).
        config: plain settings for this round's local work: ``local_epochs`` (local epochs), ``max_steps`` (an int
            cap on the local optimizer steps, ``None`` or absent: no cap; a client stops when it reaches it)…
    """

    client_id: int
    payload: Payload
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reply:
    """What one client sends back after its local work.

    Attributes:
        client_id: the client that produced the reply.
        payload: the tensors to aggregate (a weights delta for FedAvg).
        num_examples: the number of local training examples (the aggregation weight).
        metrics: scalar metrics of the local work (``train_loss``…).
        local_steps: the optimizer steps the client's local training ran (partial work under ``max_steps`` runs
            fewer); untrusted, checked by :func:`validate_local_steps`.
    """

    client_id: int
    payload: Payload
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    local_steps: int = 0


class ReleasedPayload(dict):
    """The payload of a reply the server folded into the mean and let go (:class:`~lightning_fed.server.Server`):
    the reply keeps its client id, example count and metrics; reading its tensors is a bug of the reader, so
    every read raises."""

    def _released(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this reply's payload was released once it was folded into the aggregate; a reader of "
                           "payloads after collection must turn the server's fold off (see Server.fold)")

    __getitem__ = __iter__ = __len__ = __contains__ = keys = values = items = get = _released  # type: ignore[assignment]


RELEASED = ReleasedPayload()
"""The one released payload every folded reply points to once the server let its tensors go."""


@dataclass
class ClientTask:
    """What crosses the downlink to one sampled client for one round.

    Attributes:
        round: the server round (0-based).
        client_id: the receiving client.
        message: the encoded instruction payload (the same bytes object for clients sent the same payload).
        spec: names, shapes and dtypes of that payload (compact downlink codecs decode with it).
        config: plain settings for this round's local work (``local_epochs``…).
        share: the client's share of the uplink budget (1.0 = the codec's configured rate).
        broadcast: the uplink codec's broadcast of this round (e.g. TCS's global mask), ``b""`` when none.
    """

    round: int
    client_id: int
    message: bytes
    spec: PayloadSpec
    config: dict[str, Any] = field(default_factory=dict)
    share: float = 1.0
    broadcast: bytes = b""


@dataclass
class ClientMessage:
    """What crosses the uplink from one client after its local work: the encoded reply, or why it failed.

    Attributes:
        client_id: the sender (known to the transport, never read from the bytes).
        message: the encoded reply payload (``b""`` when the client failed).
        num_examples: the client's number of training examples (its aggregation weight).
        metrics: scalar metrics of the local work (``train_loss``…).
        failure: ``None``, or the reason the client dropped out (its exception, one line).
        raw_bytes: the size of the payload before encoding (for the compression ratio).
        encode_s: seconds spent encoding the reply; decode_s: decoding the downlink.
        local_steps: the optimizer steps its local training ran (the reply's :attr:`Reply.local_steps`).
    """

    client_id: int
    message: bytes = b""
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    failure: str | None = None
    raw_bytes: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0
    local_steps: int = 0


class RejectedReply(ValueError):
    """A client's reply failed validation; the message names the client and the reason."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype a payload entry must have.

    Attributes:
        shape: expected shape; a dimension of ``-1`` accepts any size (e.g. a variable number of experts).
        dtype: expected dtype.
        optional: the entry may be absent (expert-sparse or masked replies).
        max_numel: upper bound on the number of elements when the shape has variable dimensions.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    optional: bool = False
    max_numel: int | None = None

    def shape_matches(self, shape: tuple[int, ...]) -> bool:
        """Whether ``shape`` fits this spec (same rank, equal sizes except ``-1`` wildcards)."""
        return len(shape) == len(self.shape) and all(w == -1 or w == g for w, g in zip(self.shape, shape))


PayloadSpec = dict[str, TensorSpec]


def payload_bytes(payload: Payload) -> int:
    """The bytes of a payload's tensors, uncompressed."""
    return sum(v.numel() * v.element_size() for v in payload.values())


def spec_of(payload: Payload) -> PayloadSpec:
    """The spec (shape and dtype of each entry) of a payload."""
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in payload.items()}


def value_bounds(tensors: list[Tensor]) -> tuple[float, float]:
    """The smallest and largest value over the float ``tensors`` (NaN bounds if any value is NaN), one read of
    each and nothing allocated. Tensors that tile one buffer (in order, or in address order: a codec layout
    reordered to the spec's order) are reduced as one vector."""
    span = contiguous_span(tensors)
    if span is None:
        span = contiguous_span(sorted(tensors, key=lambda t: t.data_ptr()))
    pairs = [torch.aminmax(span)] if span is not None else [torch.aminmax(t.detach()) for t in tensors if t.numel()]
    if not pairs:
        return 0.0, 0.0
    lo = float(torch.stack([p[0].float() for p in pairs]).min())  # min and max propagate NaN
    hi = float(torch.stack([p[1].float() for p in pairs]).max())
    return lo, hi


def values_within(lo: float, hi: float, max_abs: float | None) -> bool:
    """Whether values bounded by ``lo`` and ``hi`` (:func:`value_bounds`) are finite and, if ``max_abs`` is given,
    of magnitude at most ``max_abs``: the value rule of :func:`validate_payload`. A NaN bound fails."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return False
    return max_abs is None or max(-lo, hi) <= max_abs


def validate_payload(payload: Any, spec: PayloadSpec, *, max_abs: float | None = None,
                     check_values: bool = True) -> None:
    """Raise :class:`RejectedReply` unless ``payload`` matches ``spec`` exactly and is finite.

    Args:
        payload: the decoded payload of a reply.
        spec: the expected names, shapes and dtypes.
        max_abs: if given, entries whose largest magnitude exceeds it are rejected (a norm bound on
            hostile updates).
        check_values: ``False`` checks the structure only (names, shapes, dtypes), for a caller that checks the
            values itself in the pass that reads them anyway (:class:`~lightning_fed.strategies.aggregate.MeanFold`).
    """
    if not isinstance(payload, dict):
        raise RejectedReply(f"payload must be a dict of tensors, got {type(payload).__name__}")
    if payload.keys() != spec.keys():  # the same keys (the usual case): nothing missing, nothing extra
        missing = sorted(k for k, v in spec.items() if not v.optional and k not in payload)
        extra = sorted(set(payload) - set(spec))
        if missing or extra:
            raise RejectedReply(
                f"payload keys differ from the expected ones: missing={missing[:5]} extra={extra[:5]}")
    floats = []
    for name, t in payload.items():
        want = spec[name]
        if type(t) is not Tensor and not isinstance(t, Tensor):
            raise RejectedReply(f"entry {name!r} is a {type(t).__name__}, not a tensor")
        shape = t.shape  # a torch.Size is a tuple: compared as one
        if shape != want.shape and not want.shape_matches(shape):
            raise RejectedReply(f"entry {name!r} has shape {tuple(shape)}, expected {want.shape}")
        if want.max_numel is not None and t.numel() > want.max_numel:
            raise RejectedReply(f"entry {name!r} has {t.numel()} elements, more than max_numel={want.max_numel}")
        if t.dtype != want.dtype:
            raise RejectedReply(f"entry {name!r} has dtype {t.dtype}, expected {want.dtype}")
        if check_values and t.is_floating_point() and t.numel():
            floats.append(t)
    if not floats:  # nothing to check (or the caller checks the values)
        return
    if values_within(*value_bounds(floats), max_abs):  # one read, nothing allocated
        return
    for name, t in payload.items():
        if t.is_floating_point() and t.numel():
            if not bool(torch.isfinite(t).all()):
                raise RejectedReply(f"entry {name!r} contains NaN or Inf")
            if max_abs is not None and float(t.abs().max()) > max_abs:
                raise RejectedReply(f"entry {name!r} exceeds the bound max_abs={max_abs}")
    raise RejectedReply("payload contains values that are not finite")  # pragma: no cover - overflow to float32


def validate_reply(reply: Reply, spec: PayloadSpec, *, max_abs: float | None = None,
                   check_values: bool = True) -> None:
    """Validate a whole reply: its payload against ``spec`` (values too unless ``check_values`` is false, see
    :func:`validate_payload`) and a finite, positive example count."""
    n = reply.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise RejectedReply(f"num_examples must be a positive int, got {n!r}")
    for k, v in reply.metrics.items():
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RejectedReply(f"metric {k!r} is not a finite number: {v!r}")
    validate_payload(reply.payload, spec, max_abs=max_abs, check_values=check_values)


def validate_local_steps(reply: Reply, max_steps: Any = None) -> None:
    """Raise :class:`RejectedReply` unless the reply's ``local_steps`` is an int ``>= 0`` and, when the
    instruction capped local work (``config["max_steps"]``), at most that cap: a client that claims more steps
    than it was allowed is not believed."""
    n = reply.local_steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise RejectedReply(f"local_steps must be an int >= 0, got {n!r}")
    if max_steps is not None and n > max_steps:
        raise RejectedReply(f"local_steps={n} exceeds the instruction's max_steps={max_steps}")
