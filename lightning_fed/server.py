"""The server side of a round: collect the reply messages, decode and validate them, let the callbacks have
their say, and aggregate.

The server sees only messages (:class:`~lightning_fed.protocol.ClientMessage`): the sender's id, the bytes,
the example count and metrics the client reported. Each message is decoded with the codec's server half and
the server's state about that sender (kept on disk in the sender store), validated against the reply the
strategy expects, and released as soon as it is decoded, so a round holds one copy of each reply: for
:class:`~lightning_fed.codecs.Identity` the decoded reply *is* the message (read-only views of its bytes), for
the other codecs one decoded buffer per reply (the message is released).

Folding: when the round's total example count is known before decoding (the messages come as a list, or the
caller says it) and the strategy offers a fold (:meth:`~lightning_fed.strategies.Strategy.begin_fold`, FedAvg
with the weighted mean), each reply whose structure is valid is checked for values and added to the aggregate
in one pass over its memory, betting that every reply will be accepted (without ``max_update_abs``, finiteness
is checked once on the round's sum; only if that fails is each reply checked, and the culprits rejected, before
:meth:`Server.collect` returns). A reply whose values fail is rejected and voids the fold; when the replies
finally aggregated differ from those folded (a rejection changed the total, a callback dropped or edited one),
the fold is discarded and the strategy aggregates the kept replies itself, with the same result. A round with
too few replies for ``min_clients`` never aggregates: the fold only ever wrote the strategy's scratch buffer,
never the global model.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_fed.codecs.base import Codec, DecodeArgs
from lightning_fed.codecs.wire import MalformedMessage
from lightning_fed.protocol import (
    ClientMessage,
    Instruction,
    RejectedReply,
    Reply,
    validate_local_steps,
    validate_reply,
)
from lightning_fed.store import ClientStore
from lightning_fed.strategies.aggregate import MeanFold
from lightning_fed.strategies.base import Strategy

log = logging.getLogger("lightning_fed")


@dataclass
class Collected:
    """What the server kept of a round's messages.

    Attributes:
        replies: the decoded, validated replies, in client order.
        reasons: one line per client that failed or whose reply was rejected.
        stats: uplink counters (``bytes_up``, ``raw_bytes_up``, ``failed``, ``rejected``, ``encode_s``, ``decode_s``).
    """

    replies: list[Reply] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class Server:
    """Receives, checks and aggregates the replies of each round.

    Attributes:
        strategy: its server half (``reply_spec``, ``aggregate``).
        codec: the uplink codec (server half: ``decode`` and ``accept``).
        senders: the server's per-sender codec state on disk.
        max_message_bytes: larger messages are rejected before decoding.
        max_update_abs: replies with a larger entry are rejected.
        trusted_examples: the most examples the server believes each client has (a client's id in, a count out):
            in simulation the partition's size for that client (FedLoop passes it), in deployment a configured
            cap. A reply claiming more is weighted at that count (logged). ``None`` trusts the claim.
        max_norm_ratio: a reply whose L2 norm exceeds this many times the median norm of the round's replies of
            the same structure (at least 3 of them) is rejected; ``None`` disables the check.
    """

    strategy: Strategy
    codec: Codec
    senders: ClientStore
    max_message_bytes: int | None = None
    max_update_abs: float | None = None
    trusted_examples: Callable[[int], int] | None = None
    max_norm_ratio: float | None = None
    fold: bool = True
    """Offer the strategy to fold replies while they arrive (see the module doc); the loop turns it off when a
    callback's ``on_aggregate_start`` may drop or edit replies (the fold would then be discarded anyway)."""

    def collect(self, server_round: int, instructions: list[Instruction], messages: Iterable[ClientMessage],
                total_examples: int | None = None) -> Collected:
        """Decode and validate every message against the instruction its sender was sent; log every failure and
        rejection.

        Args:
            server_round: the round (0-based).
            instructions: what each sampled client was sent.
            messages: the round's messages: a list is consumed (emptied) as it goes, so each message is released
                once decoded; any other iterable is read one message at a time (e.g. generated or received on
                the fly), so the server never holds a message it has already decoded.
            total_examples: the sum of the example counts of the messages that carry a reply, when ``messages``
                is not a list (a list gives it by itself); lets the strategy fold the replies as they arrive.
        """
        out = Collected(stats={"bytes_up": 0, "raw_bytes_up": 0, "failed": 0, "rejected": 0, "encode_s": 0.0,
                               "decode_s": 0.0})
        sent = {instr.client_id: instr for instr in instructions}
        if isinstance(messages, list):
            for m in messages:
                self._trust(server_round, m)
            counts = [m.num_examples for m in messages if m.failure is None]
            if all(type(n) is int and n > 0 for n in counts):
                total_examples = sum(counts)
            messages.reverse()
            stream: Iterable[ClientMessage] = _popping(messages)
        else:
            stream = (self._trust(server_round, m) for m in messages)
        fold = None
        marks: list[int] = []  # per accepted reply: how many reasons preceded it
        if self.fold and total_examples:
            fold = self.strategy.begin_fold(server_round, total_examples)
        for msg in stream:
            out.stats["decode_s"] += msg.decode_s  # the clients' downlink decoding
            if msg.failure is not None:
                log.warning("round %d: client %d dropped: %s", server_round + 1, msg.client_id, msg.failure)
                out.stats["failed"] += 1
                out.reasons.append(f"client {msg.client_id} dropped: {msg.failure}")
                continue
            out.stats["bytes_up"] += len(msg.message)
            out.stats["raw_bytes_up"] += msg.raw_bytes
            out.stats["encode_s"] += msg.encode_s
            instr = sent.get(msg.client_id)
            if instr is None:
                raise RuntimeError(f"round {server_round + 1}: a message from client {msg.client_id}, who was sent "
                                   "no instruction")
            reply = self.receive(server_round, instr, msg, out.stats, fold)
            if isinstance(reply, str):
                out.stats["rejected"] += 1
                out.reasons.append(reply)
            else:
                out.replies.append(reply)
                marks.append(len(out.reasons))
            del msg
        if fold is not None and not fold.settle():
            self._recheck(server_round, out, marks, sent, fold)
        if self.max_norm_ratio is not None:
            self._norm_outliers(server_round, out, fold.norms if fold is not None else {})
        return out

    def _trust(self, server_round: int, msg: ClientMessage) -> ClientMessage:
        """Weight a reply by what the server can trust of its example count, not by the client's claim."""
        if msg.failure is not None or self.trusted_examples is None:
            return msg
        n, cap = msg.num_examples, self.trusted_examples(msg.client_id)
        if type(n) is int and n > cap:  # a claim that is not a positive count is rejected by validation
            log.warning("round %d: client %d claimed %d training examples, the server trusts %d: weighted as %d",
                        server_round + 1, msg.client_id, n, cap, cap)
            msg.num_examples = cap
        return msg

    def _norm_outliers(self, server_round: int, out: Collected, known: dict[int, float]) -> None:
        """Reject replies whose norm is far outside the round's: more than ``max_norm_ratio`` times the median
        norm of the replies of the same structure (tiers differ in size, so each structure has its own median).
        ``known``: norms the fold computed, by ``id(reply)``."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        norms: list[float] = []
        for i, reply in enumerate(out.replies):
            key = tuple((k, v.shape) for k, v in sorted(reply.payload.items()))  # a torch.Size is a tuple
            groups.setdefault(key, []).append(i)
            norm = known.get(id(reply))  # the fold summed it while adding the reply
            norms.append(norm if norm is not None else payload_norm(reply.payload))
        drop: set[int] = set()
        ratio = 0.0
        for members in groups.values():
            if len(members) < 3:
                continue
            median = statistics.median(norms[i] for i in members)
            if not median > 0:
                continue
            for i in members:
                ratio = max(ratio, norms[i] / median)
                if norms[i] > self.max_norm_ratio * median:  # type: ignore[operator]
                    drop.add(i)
        out.stats["norm_ratio"] = ratio  # the largest norm over its round's median: how close honest runs come
        for i in sorted(drop, reverse=True):
            reply = out.replies.pop(i)
            reason = (f"reply of client {reply.client_id} rejected: its norm {norms[i]:.4g} is more than "
                      f"max_norm_ratio={self.max_norm_ratio} times the round's median")
            log.warning("round %d: %s", server_round + 1, reason)
            out.reasons.append(reason)
            out.stats["rejected"] += 1

    def _recheck(self, server_round: int, out: Collected, marks: list[int], sent: dict[int, Instruction],
                 fold: MeanFold) -> None:
        """The fold found a value that is not finite among the replies it added unchecked: validate each reply in
        full, reject the culprits (their reasons where they would have been, in message order) and void the
        fold."""
        for i in reversed(range(len(out.replies))):
            reply = out.replies[i]
            try:
                validate_reply(reply, self.strategy.reply_spec(sent[reply.client_id]), max_abs=self.max_update_abs)
            except RejectedReply as err:
                log.warning("round %d: reply of client %d rejected: %s", server_round + 1, reply.client_id, err)
                del out.replies[i]
                out.reasons.insert(marks[i], f"reply of client {reply.client_id} rejected: {err}")
                out.stats["rejected"] += 1
                fold.broken = True

    def receive(self, server_round: int, instr: Instruction, msg: ClientMessage,
                stats: dict[str, Any], fold: MeanFold | None = None) -> Reply | str:
        """One message: size limit, decode (no pickle) with the sender's state, validate. Returns the reply, or
        the logged reason it was rejected.

        With a ``fold`` (:meth:`collect`), the structure is validated first, then the fold adds the reply,
        checking its values in the same pass (with ``max_update_abs``) or, without a bound, their finiteness once
        for the whole round at the end of :meth:`collect`. A reply whose values fail is validated in full for the
        reason and rejected; the fold, voided, is never used."""
        try:
            spec = self.strategy.reply_spec(instr)
            state = self.senders.load(msg.client_id)
            t = time.perf_counter()
            payload = self.codec.decode(msg.message, state, DecodeArgs(
                round=server_round, sender=msg.client_id, spec=spec, max_bytes=self.max_message_bytes))
            stats["decode_s"] += time.perf_counter() - t
            self.senders.save(msg.client_id, state)  # the sender's encoder advanced too, whatever validation says
            reply = Reply(msg.client_id, payload, msg.num_examples, dict(msg.metrics), msg.local_steps)
            validate_local_steps(reply, instr.config.get("max_steps"))
            if fold is None:
                validate_reply(reply, spec, max_abs=self.max_update_abs)
            else:  # the structure now; the values in the pass that adds them (or for the round, see MeanFold)
                validate_reply(reply, spec, max_abs=self.max_update_abs, check_values=False)
                if not fold.add(reply, self.max_update_abs):  # the fold is void now; nothing uses it
                    validate_reply(reply, spec, max_abs=self.max_update_abs)  # raises, naming the entry
        except (MalformedMessage, RejectedReply) as err:
            log.warning("round %d: reply of client %d rejected: %s", server_round + 1, msg.client_id, err)
            return f"reply of client {msg.client_id} rejected: {err}"
        return reply

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """The codec learns which replies are kept (:meth:`Codec.accept`), then the strategy aggregates them.
        Returns the strategy's metrics."""
        self.codec.accept(server_round, [r.payload for r in replies])
        return self.strategy.aggregate(server_round, replies)


def payload_norm(payload: dict[str, torch.Tensor]) -> float:
    """L2 norm of a payload's floating-point entries taken together (integer entries, e.g. indices, skipped)."""
    total = 0.0
    for t in payload.values():
        if t.is_floating_point():
            total += float(torch.linalg.vector_norm(t, dtype=torch.float32)) ** 2
    return total ** 0.5


def _popping(messages: list[ClientMessage]) -> Iterator[ClientMessage]:
    """The messages of a reversed list, popped one by one, so the list stops holding each as it is read."""
    while messages:
        yield messages.pop()


__all__ = ["Collected", "Server", "payload_norm"]
