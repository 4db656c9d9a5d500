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

Releasing: the norm check (``max_norm_ratio``) judges a reply against the median norm of the *previous* round's
accepted replies of the same structure when there is one (the server's state, :meth:`Server.state_dict`), so a
folded reply is decided by the pass that adds and measures it (a float32 reply block by block, a rejection
subtracted; 8-bit codes right after, a rejection undone exactly:
:meth:`MeanFold.add_released <lightning_fed.strategies.aggregate.MeanFold.add_released>`), and its payload
released when nothing else reads it
(the codec's :meth:`~lightning_fed.codecs.Codec.accept` does not, :attr:`~lightning_fed.codecs.Codec.
reads_accepted`): the round then holds the accumulator and the message being folded (8-bit codes: also a
snapshot of the accumulator and a few replies), not every reply. The
reply kept in :attr:`Collected.replies` is a light record (client id, example count, metrics; its norm in
``Collected.norms``). Replies with no reference (the first round, a structure new after pruning, a round of
fewer than 3 accepted replies before) are held and judged against their own round's median, as before.
"""

from __future__ import annotations

import logging
import math
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
    PayloadSpec,
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
    decided: dict[int, tuple[Any, float]] = field(default_factory=dict)
    """Each reply judged before it was folded, by ``id(reply)``: its structure key and L2 norm (its payload may
    be released)."""


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
        max_norm_ratio: a reply whose L2 norm exceeds this many times a reference norm is rejected: the median
            norm of the previous round's accepted replies of the same structure (at least 3 of them), or without
            one, of the round's own replies of that structure (at least 3); ``None`` disables the check.
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
    release: bool = True
    """Let go of a folded reply's payload once it is decided (see the module doc); ``False`` holds every reply
    until the round aggregates, so that a rejection always re-aggregates the kept replies exactly."""
    reference: dict[tuple[Any, ...], float] = field(default_factory=dict)
    """The median norm of the previous round's accepted replies, per reply structure (names and shapes): the
    norm check's reference (:meth:`state_dict`)."""

    def __post_init__(self) -> None:
        self._keys: dict[int, tuple[PayloadSpec, tuple[Any, ...]]] = {}

    def _structure(self, spec: PayloadSpec) -> tuple[Any, ...]:
        """The structure key of replies matching ``spec`` (computed once per spec object)."""
        known = self._keys.get(id(spec))
        if known is None or known[0] is not spec:
            known = self._keys[id(spec)] = (spec, tuple((k, tuple(v.shape)) for k, v in sorted(spec.items())))
        return known[1]

    def state_dict(self) -> dict[str, Any]:
        """The norm check's reference (names, shapes and median norm per structure), for checkpoints."""
        return {"reference": [[[k for k, _ in key], [list(shape) for _, shape in key], median]
                              for key, median in self.reference.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.reference = {tuple((k, tuple(shape)) for k, shape in zip(names, shapes, strict=True)): float(median)
                          for names, shapes, median in state["reference"]}

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
            total_examples: the sum of the example counts the replies are expected to carry (a list of messages
                gives it by itself when it is not given: its replies' counts); lets the strategy fold the replies
                as they arrive. When the kept replies' counts sum to another total, the fold is aggregated again
                from the held replies, or, if some were released, rescaled (see :class:`MeanFold
                <lightning_fed.strategies.aggregate.MeanFold>`).
        """
        out = Collected(stats={"bytes_up": 0, "raw_bytes_up": 0, "failed": 0, "rejected": 0, "encode_s": 0.0,
                               "decode_s": 0.0})
        sent = {instr.client_id: instr for instr in instructions}
        if isinstance(messages, list):
            for m in messages:
                self._trust(server_round, m)
            counts = [m.num_examples for m in messages if m.failure is None]
            if total_examples is None and all(type(n) is int and n > 0 for n in counts):
                total_examples = sum(counts)
            messages.reverse()
            stream: Iterable[ClientMessage] = _popping(messages)
        else:
            stream = self._trusting(server_round, messages)
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
            reply = self.receive(server_round, instr, msg, out.stats, fold, out.decided)
            if isinstance(reply, str):
                out.stats["rejected"] += 1
                out.reasons.append(reply)
            else:
                out.replies.append(reply)
                marks.append(len(out.reasons))
            del msg
        if fold is not None:
            fold.flush()  # the replies still held for an undo: nothing can reject them now
        if fold is not None and not fold.settle():
            self._recheck(server_round, out, marks, sent, fold)
        if self.max_norm_ratio is not None:
            self._norm_outliers(server_round, out, fold.norms if fold is not None else {})
        return out

    def _trusting(self, server_round: int, messages: Iterable[ClientMessage]) -> Iterator[ClientMessage]:
        """:meth:`_trust` over messages read one at a time, each let go here before the next is read (a
        generator expression would hold the last one while the next is made or received)."""
        it = iter(messages)
        while (msg := next(it, None)) is not None:
            yield self._trust(server_round, msg)
            del msg

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
        """Reject replies whose norm is far outside: more than ``max_norm_ratio`` times the previous round's
        median norm of the replies of the same structure (tiers differ in size, so each structure has its own),
        or without one, the round's own median of that structure. Replies decided before their fold
        (``out.decided``) are already judged. Then the accepted replies' medians become the next round's
        reference. ``known``: norms the fold computed, by ``id(reply)``."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        norms: list[float] = []
        for i, reply in enumerate(out.replies):
            decided = out.decided.get(id(reply))
            if decided is not None:  # judged against its reference before the fold; its payload may be gone
                key, norm = decided
            else:
                key = tuple((k, tuple(v.shape)) for k, v in sorted(reply.payload.items()))
                norm = known.get(id(reply))  # the fold summed it while adding the reply
                norm = norm if norm is not None else payload_norm(reply.payload)
            groups.setdefault(key, []).append(i)
            norms.append(norm)
        drop: dict[int, str] = {}
        ratio = ratio_prev = 0.0
        for key, members in groups.items():
            reference = self.reference.get(key)
            median = statistics.median(norms[i] for i in members) if len(members) >= 3 else 0.0
            if median > 0:
                ratio = max(ratio, *(norms[i] / median for i in members))
            if reference is not None:
                ratio_prev = max(ratio_prev, *(norms[i] / reference for i in members))
                judge, what = reference, "the previous round's median"
            elif median > 0:
                judge, what = median, "the round's median"
            else:
                continue
            for i in members:
                if id(out.replies[i]) not in out.decided and norms[i] > self.max_norm_ratio * judge:  # type: ignore[operator]
                    drop[i] = what
        out.stats["norm_ratio"] = ratio  # the largest norm over its round's median: how close honest runs come
        out.stats["norm_ratio_prev"] = ratio_prev  # ...and over the previous round's (the reference)
        reference_next: dict[tuple[Any, ...], float] = {}
        for key, members in groups.items():
            kept = [norms[i] for i in members if i not in drop]
            median = statistics.median(kept) if len(kept) >= 3 else 0.0
            if median > 0:
                reference_next[key] = median
        self.reference = reference_next
        for i in sorted(drop, reverse=True):
            reply = out.replies.pop(i)
            reason = (f"reply of client {reply.client_id} rejected: its norm {norms[i]:.4g} is more than "
                      f"max_norm_ratio={self.max_norm_ratio} times {drop[i]}")
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
            if id(reply) in out.decided:  # checked before its fold
                continue
            try:
                validate_reply(reply, self.strategy.reply_spec(sent[reply.client_id]), max_abs=self.max_update_abs)
            except RejectedReply as err:
                log.warning("round %d: reply of client %d rejected: %s", server_round + 1, reply.client_id, err)
                del out.replies[i]
                out.reasons.insert(marks[i], f"reply of client {reply.client_id} rejected: {err}")
                out.stats["rejected"] += 1
                fold.broken = True

    def receive(self, server_round: int, instr: Instruction, msg: ClientMessage, stats: dict[str, Any],
                fold: MeanFold | None = None, decided: dict[int, tuple[Any, float]] | None = None) -> Reply | str:
        """One message: size limit, decode (no pickle) with the sender's state, validate. Returns the reply, or
        the logged reason it was rejected.

        With a ``fold`` (:meth:`collect`), the structure is validated first. A reply whose norm check has a
        reference (the previous round's median, or no norm check at all) and a codec that does not read accepted
        payloads is then added and measured in one pass and judged (a rejection taken back), its payload
        released (:meth:`MeanFold.add_released <lightning_fed.strategies.aggregate.MeanFold.add_released>`) and
        its norm recorded in ``decided``; when the codec can leave its values in the message
        (:meth:`Codec.decode_deferred`: an Identity message of the expected layout, 8-bit codes), they are added
        and measured from there and decoded only to name a bad entry. Any other is added,
        its values checked in the same pass (with ``max_update_abs``) or, without a bound, their finiteness once
        for the whole round at the end of :meth:`collect`. A reply whose values fail is validated in full for the
        reason and rejected; the fold, voided, is never used."""
        try:
            spec = self.strategy.reply_spec(instr)
            state = self.senders.load(msg.client_id)
            args = DecodeArgs(round=server_round, sender=msg.client_id, spec=spec, max_bytes=self.max_message_bytes)
            reference = None
            if fold is not None and self.release and decided is not None and not fold.broken:
                key = self._structure(spec)
                reference = self.reference.get(key) if self.max_norm_ratio is not None else math.inf
            deferred = None
            t = time.perf_counter()
            if reference is not None and not self.codec.reads_accepted:  # folded from the code if it can be
                deferred = self.codec.decode_deferred(msg.message, state, args)
            payload = self.codec.decode(msg.message, state, args) if deferred is None else {}
            stats["decode_s"] += time.perf_counter() - t
            self.senders.save(msg.client_id, state)  # the sender's encoder advanced too, whatever validation says
            reply = Reply(msg.client_id, payload, msg.num_examples, dict(msg.metrics), msg.local_steps)
            del payload
            validate_local_steps(reply, instr.config.get("max_steps"))
            if fold is None:
                validate_reply(reply, spec, max_abs=self.max_update_abs)
                return reply
            # the structure now (a deferred reply's is the spec's by construction); its values in the fold's pass
            validate_reply(reply, {} if deferred is not None else spec, check_values=False)
            limit = math.inf
            if reference is not None and self.max_norm_ratio is not None:
                limit = reference * self.max_norm_ratio
            if reference is not None and not self.codec.reads_accepted:  # judged after its pass, then let go
                why, norm = fold.add_released(reply, deferred, self.max_update_abs, limit)
                if why == "values" and deferred is not None:
                    reply.payload = deferred.payload()  # decoded only to name the culprit
                del deferred
                self._judged(reply, spec, why, norm)
                decided[id(reply)] = (key, norm)  # type: ignore[index]
            elif not fold.add(reply, self.max_update_abs):  # the fold is void now; nothing uses it
                validate_reply(reply, spec, max_abs=self.max_update_abs)  # raises, naming the entry
        except (MalformedMessage, RejectedReply) as err:
            log.warning("round %d: reply of client %d rejected: %s", server_round + 1, msg.client_id, err)
            return f"reply of client {msg.client_id} rejected: {err}"
        return reply

    def _judged(self, reply: Reply, spec: PayloadSpec, why: str | None, norm: float) -> None:
        """Raise the rejection a fold's verdict on a reply judged before its add stands for (``None``: none)."""
        if why == "norm":
            raise RejectedReply(f"its norm {norm:.4g} is more than max_norm_ratio={self.max_norm_ratio} times the "
                                "previous round's median")
        if why is not None:
            validate_reply(reply, spec, max_abs=self.max_update_abs)  # raises, naming the entry
            raise RejectedReply("its values are not finite")  # pragma: no cover - validation names it

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
