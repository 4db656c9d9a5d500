"""The server side of a round: collect the reply messages, decode and validate them, let the callbacks have
their say, and aggregate.

The server sees only messages (:class:`~lightning_fed.protocol.ClientMessage`): the sender's id, the bytes,
the example count and metrics the client reported. Each message is decoded with the codec's server half and
the server's state about that sender (kept on disk in the sender store), validated against the reply the
strategy expects, and released as soon as it is decoded, so a round holds one copy of each reply.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from lightning_fed.codecs.base import Codec, DecodeArgs
from lightning_fed.codecs.wire import MalformedMessage
from lightning_fed.protocol import ClientMessage, Instruction, RejectedReply, Reply, validate_reply
from lightning_fed.store import ClientStore
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
    """

    strategy: Strategy
    codec: Codec
    senders: ClientStore
    max_message_bytes: int | None = None
    max_update_abs: float | None = None

    def collect(self, server_round: int, instructions: list[Instruction], messages: list[ClientMessage]) -> Collected:
        """Decode and validate every message against the instruction its sender was sent; log every failure and
        rejection. ``messages`` is consumed (emptied) as it goes, so each message is released once decoded."""
        out = Collected(stats={"bytes_up": 0, "raw_bytes_up": 0, "failed": 0, "rejected": 0, "encode_s": 0.0,
                               "decode_s": 0.0})
        sent = {instr.client_id: instr for instr in instructions}
        messages.reverse()
        while messages:
            msg = messages.pop()
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
            reply = self.receive(server_round, instr, msg, out.stats)
            if isinstance(reply, str):
                out.stats["rejected"] += 1
                out.reasons.append(reply)
            else:
                out.replies.append(reply)
            del msg
        return out

    def receive(self, server_round: int, instr: Instruction, msg: ClientMessage,
                stats: dict[str, Any]) -> Reply | str:
        """One message: size limit, decode (no pickle) with the sender's state, validate. Returns the reply, or
        the logged reason it was rejected."""
        try:
            spec = self.strategy.reply_spec(instr)
            state = self.senders.load(msg.client_id)
            t = time.perf_counter()
            payload = self.codec.decode(msg.message, state, DecodeArgs(
                round=server_round, sender=msg.client_id, spec=spec, max_bytes=self.max_message_bytes))
            stats["decode_s"] += time.perf_counter() - t
            self.senders.save(msg.client_id, state)  # the sender's encoder advanced too, whatever validation says
            reply = Reply(msg.client_id, payload, msg.num_examples, dict(msg.metrics))
            validate_reply(reply, spec, max_abs=self.max_update_abs)
        except (MalformedMessage, RejectedReply) as err:
            log.warning("round %d: reply of client %d rejected: %s", server_round + 1, msg.client_id, err)
            return f"reply of client {msg.client_id} rejected: {err}"
        return reply

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """The codec learns which replies are kept (:meth:`Codec.accept`), then the strategy aggregates them.
        Returns the strategy's metrics."""
        self.codec.accept(server_round, [r.payload for r in replies])
        return self.strategy.aggregate(server_round, replies)


__all__ = ["Collected", "Server"]
