"""Secure aggregation, SecAgg+ style: the server learns the sum of the clients' integer vectors, not the vectors.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017 (SecAgg);
Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020 (SecAgg+).

Each client ``i`` holds two X25519 key pairs (``c`` to encrypt shares, ``s`` to agree masks) and a self-mask seed
``b_i``. Its masked input is ``y_i = x_i + PRG(b_i) + sum_j ±PRG(s_ij) mod 2**bits`` where ``s_ij`` is the X25519
secret it shares with neighbour ``j`` (through HKDF; ``+`` when ``i < j``), so the pairwise masks cancel in the sum.
The neighbours form a Harary graph on a seeded random order of the clients: degree ``O(log n)`` in SecAgg+, all
other clients (the complete graph) in the original SecAgg. ``b_i`` and the secret ``s`` key are Shamir-shared
(:mod:`~lightning_fed.privacy.shamir`) among the neighbours, each share encrypted with AES-GCM under the ``c`` key
agreement so the server relays shares it cannot read; the header (round, sender, receiver) is authenticated, so a
tampered share or one replayed from another round or pair fails to decrypt, and a repeated one is refused.

The four rounds, each a function of the bytes received (client halves) or a method of :class:`SecAggServer`:

1. advertise keys: :func:`advertise` -> :meth:`SecAggServer.receive_adverts` (each client gets its neighbours' keys);
2. share keys: :func:`share_keys` -> :meth:`SecAggServer.route_shares` (each client gets its encrypted shares);
3. masked input: :func:`masked_input` -> :meth:`SecAggServer.receive_masked`;
4. unmasking: :meth:`SecAggServer.unmask_requests` -> :func:`unmask_response` -> :meth:`SecAggServer.unmask`.
   For a neighbour that sent its input a client reveals a share of ``b_i``; for one that did not, a share of its
   secret ``s`` key (never both: a client refuses a request that asks for a neighbour twice). The server needs
   ``threshold`` shares per client, so unmasking succeeds while every client keeps at least ``threshold``
   responding neighbours, and raises :class:`SecAggAborted`, naming the client, when one does not.

Threat model: an honest-but-curious server (it follows the protocol and tries to learn from what it sees), honest
clients, no client colluding with the server beyond ``threshold - 1`` of a client's neighbours. There is no PKI:
the server could substitute keys (an active attack), which the protocol here does not defend against.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch import Tensor

from lightning_fed.privacy import shamir

ADVERT, SHARE, MASKED, REQUEST, RESPONSE = 1, 2, 3, 4, 5
_HEAD = struct.Struct("<BII")  # kind, round, client
_PAIR = struct.Struct("<BIII")  # kind, round, sender, receiver
_KEY_BYTES = 32
_SURVIVED, _DROPPED = 0, 1
GRAPHS = ("sparse", "complete")


class SecAggAborted(RuntimeError):
    """Unmasking is impossible: a client has fewer responding neighbours than the threshold."""


class ProtocolViolation(ValueError):
    """A message is malformed, tampered with, replayed or out of place; the receiver rejects it."""


def _raw(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    if isinstance(key, X25519PrivateKey):
        return key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


@dataclass(frozen=True)
class Params:
    """The public parameters of one aggregation, which the server announces.

    Attributes:
        round: the server round; it is bound into every message and key, so nothing carries over between rounds.
        bits: the field is the integers modulo ``2**bits`` (a multiple of 8, 16 to 56).
        length: the number of entries of every input vector.
        threshold: shares needed to reconstruct a client's secret.
    """

    round: int
    bits: int
    length: int
    threshold: int

    def __post_init__(self) -> None:
        if self.bits % 8 or not 16 <= self.bits <= 56:
            raise ValueError(f"bits={self.bits!r} is not allowed; bits must be a multiple of 8 from 16 to 56")
        if self.threshold < 1 or self.length < 0:
            raise ValueError("threshold must be >= 1 and length >= 0")


DROPOUT_TOLERANCE = 0.3
"""The default fraction of a round's clients that may drop out (before sending or before unmasking)."""
FAILURE_PROBABILITY = 1e-6
"""The default bound on the probability that a round with that many dropouts cannot be unmasked."""


def unmask_failure(n: int, degree: int, dropout: float, ratio: float = 0.5) -> float:
    """A bound on the probability that unmasking fails when ``floor(dropout * n)`` of ``n`` clients drop out, chosen
    independently of the graph's random order: each client's ``degree`` neighbours are then a uniform sample of the
    ``n - 1`` others, so the number that dropped is hypergeometric, and unmasking that client fails when more than
    ``degree - threshold`` did; a union bound over the ``n`` clients (Bell et al. 2020, section 3.3, with no
    corrupt clients). Computed with ``scipy.stats.hypergeom``."""
    from scipy.stats import hypergeom  # here: scipy.stats is slow to import and only the server half needs it

    if degree < 1:
        return 1.0 if n > 1 else 0.0
    dropped = math.floor(dropout * n)
    lost_ok = degree - threshold_for(degree, ratio)  # neighbours a client may lose
    return min(1.0, n * float(hypergeom.sf(lost_ok, n - 1, min(dropped, n - 1), degree)))


@functools.lru_cache(maxsize=256)
def tolerant_degree(
    n: int, dropout: float = DROPOUT_TOLERANCE, failure: float = FAILURE_PROBABILITY, ratio: float = 0.5
) -> int:
    """The smallest even degree (at most ``n - 1``) whose :func:`unmask_failure` with ``dropout`` of the ``n``
    clients dropping out is at most ``failure``; ``n - 1`` (the complete graph) when none is. It grows as
    ``O(log(n / failure))`` for a fixed margin ``1 - ratio - dropout``."""
    for degree in range(2, n - 1, 2):
        if unmask_failure(n, degree, dropout, ratio) <= failure:
            return degree
    return max(n - 1, 0)


def degree_for(
    n: int,
    graph: str = "sparse",
    factor: float | None = None,
    *,
    dropout: float = DROPOUT_TOLERANCE,
    failure: float = FAILURE_PROBABILITY,
    ratio: float = 0.5,
) -> int:
    """Neighbours per client among ``n``: ``n - 1`` for the complete graph (SecAgg); for SecAgg+ the
    :func:`tolerant_degree` for ``dropout``, ``failure`` and threshold ``ratio``, or, with a ``factor``, the even
    number ``2 * ceil(factor * log2 n)``, at most ``n - 1``."""
    if graph not in GRAPHS:
        raise ValueError(f"graph={graph!r} is not allowed; use one of {GRAPHS}")
    if graph == "complete" or n <= 2:
        return max(n - 1, 0)
    if factor is None:
        return tolerant_degree(n, dropout, failure, ratio)
    return min(n - 1, 2 * math.ceil(factor * math.log2(n)))


def threshold_for(degree: int, ratio: float) -> int:
    """Shares needed among ``degree`` neighbours: ``ceil(ratio * degree)``, at least 1 (``ratio >= 0.5`` keeps a
    minority of colluding neighbours from reconstructing both secrets of a client)."""
    return max(1, min(degree, math.ceil(ratio * degree)))


def harary_graph(clients: list[int], degree: int, seed: int) -> dict[int, list[int]]:
    """Each client's neighbours: the ``degree / 2`` nearest on either side on a cycle through the clients in a
    random order drawn from ``seed`` (a Harary graph, as in SecAgg+); an odd ``degree`` adds the opposite client
    when ``n`` is even. Neighbour lists are sorted; the relation is symmetric."""
    n = len(clients)
    order = [clients[i] for i in torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()]
    out: dict[int, set[int]] = {c: set() for c in clients}
    if degree >= n - 1:
        return {c: sorted(x for x in clients if x != c) for c in clients}
    for pos, c in enumerate(order):
        for d in range(1, degree // 2 + 1):
            other = order[(pos + d) % n]
            out[c].add(other)
            out[other].add(c)
        if degree % 2 and n % 2 == 0:
            other = order[(pos + n // 2) % n]
            out[c].add(other)
            out[other].add(c)
    return {c: sorted(v) for c, v in out.items()}


@dataclass(frozen=True)
class ClientSecrets:
    """A client's secrets for one round: the ``c`` (encryption) and ``s`` (mask) X25519 keys and the self-mask seed."""

    c_key: X25519PrivateKey
    s_key: X25519PrivateKey
    b_seed: bytes

    @classmethod
    def generate(cls) -> ClientSecrets:
        """Fresh secrets from the operating system's CSPRNG (a real client)."""
        return cls(X25519PrivateKey.generate(), X25519PrivateKey.generate(), os.urandom(_KEY_BYTES))

    @classmethod
    def derive(cls, key_seed: bytes, server_round: int, client: int) -> ClientSecrets:
        """Secrets expanded by HKDF from a simulation's ``key_seed`` and (round, client): every process of a
        simulated run and a resumed run derive the same keys for the same client, so the client halves can run
        wherever the loop runs that client."""
        raw = _hkdf(
            key_seed, b"lightning_fed secagg keys" + struct.pack("<II", server_round, client), 3 * _KEY_BYTES
        )
        return cls(
            X25519PrivateKey.from_private_bytes(raw[:32]),
            X25519PrivateKey.from_private_bytes(raw[32:64]),
            raw[64:],
        )


def mask_vector(seed: bytes, length: int, bits: int) -> Tensor:
    """``length`` uniform integers in ``[0, 2**bits)`` from a 32-byte seed (AES-256 in counter mode as the PRG)."""
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    words = np.frombuffer(enc.update(bytes(8 * length)) + enc.finalize(), dtype="<u8").view(np.int64)
    return torch.from_numpy(words.copy()) & ((1 << bits) - 1)


def _pair_seed(own: X25519PrivateKey, peer: bytes, server_round: int) -> bytes:
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer))
    return _hkdf(shared, b"lightning_fed secagg pair mask" + struct.pack("<I", server_round))


def _share_cipher(own: X25519PrivateKey, peer: bytes, server_round: int) -> AESGCM:
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer))
    return AESGCM(_hkdf(shared, b"lightning_fed secagg share key" + struct.pack("<I", server_round)))


def _nonce(server_round: int, sender: int, receiver: int) -> bytes:
    return struct.pack("<III", server_round, sender, receiver)


def pack_ints(x: Tensor, bits: int) -> bytes:
    """Integers in ``[0, 2**bits)`` as ``bits / 8`` little-endian bytes each."""
    a = np.ascontiguousarray(x.to(torch.int64).numpy()).view(np.uint8).reshape(-1, 8)[:, : bits // 8]
    return a.tobytes()


def unpack_ints(data: bytes, bits: int, length: int) -> Tensor:
    """Inverse of :func:`pack_ints`."""
    nb = bits // 8
    if len(data) != nb * length:
        raise ProtocolViolation(f"masked input of {len(data)} bytes, expected {nb * length}")
    a = np.zeros((length, 8), dtype=np.uint8)
    a[:, :nb] = np.frombuffer(data, dtype=np.uint8).reshape(length, nb)
    return torch.from_numpy(a.view("<i8").reshape(-1).copy())


def _head(data: bytes, kind: int, server_round: int, what: str) -> int:
    if len(data) < _HEAD.size:
        raise ProtocolViolation(f"{what}: message too short")
    k, r, client = _HEAD.unpack_from(data)
    if k != kind:
        raise ProtocolViolation(f"{what}: message of kind {k}, expected {kind}")
    if r != server_round:
        raise ProtocolViolation(f"{what}: message of round {r} replayed in round {server_round}")
    return client


# ---------------------------------------------------------------- client halves
def advertise(secrets: ClientSecrets, server_round: int, client: int) -> bytes:
    """Round 1, client: its two public keys."""
    return (
        _HEAD.pack(ADVERT, server_round, client)
        + _raw(secrets.c_key.public_key())
        + _raw(secrets.s_key.public_key())
    )


def parse_roster(roster: bytes, server_round: int, client: int) -> dict[int, tuple[bytes, bytes]]:
    """A client reads the neighbours' adverts the server relayed: ``{neighbour: (c public key, s public key)}``."""
    size = _HEAD.size + 2 * _KEY_BYTES
    if len(roster) % size:
        raise ProtocolViolation("roster: not a list of adverts")
    out = {}
    for off in range(0, len(roster), size):
        part = roster[off : off + size]
        peer = _head(part, ADVERT, server_round, "roster")
        if peer == client or peer in out:
            raise ProtocolViolation(f"roster: client {peer} listed twice or as its own neighbour")
        out[peer] = (part[_HEAD.size : _HEAD.size + _KEY_BYTES], part[_HEAD.size + _KEY_BYTES :])
    return out


def share_keys(secrets: ClientSecrets, params: Params, client: int, roster: bytes) -> dict[int, bytes]:
    """Round 2, client: Shamir shares of ``b`` and of the secret ``s`` key for each neighbour, each encrypted for
    that neighbour (AES-GCM, the header authenticated). Returns ``{neighbour: ciphertext message}``."""
    peers = parse_roster(roster, params.round, client)
    if len(peers) < params.threshold:
        raise ProtocolViolation(
            f"client {client}: {len(peers)} neighbours, fewer than the threshold {params.threshold}"
        )
    points = [p + 1 for p in sorted(peers)]
    b_shares = shamir.split(secrets.b_seed, params.threshold, points)
    s_shares = shamir.split(_raw(secrets.s_key), params.threshold, points)
    out = {}
    for peer in sorted(peers):
        head = _PAIR.pack(SHARE, params.round, client, peer)
        plain = shamir.to_bytes(b_shares[peer + 1]) + shamir.to_bytes(s_shares[peer + 1])
        aead = _share_cipher(secrets.c_key, peers[peer][0], params.round)
        out[peer] = head + aead.encrypt(_nonce(params.round, client, peer), plain, head)
    return out


def masked_input(
    secrets: ClientSecrets, params: Params, client: int, roster: bytes, inbox: dict[int, bytes], x: Tensor
) -> bytes:
    """Round 3, client: ``x`` (integers, any sign; taken modulo ``2**bits``) plus its self mask and its pairwise
    masks with the neighbours in ``roster`` that sent it shares in round 2 (``inbox``: a neighbour that did not
    dropped out before the masks and masks with nobody)."""
    if x.numel() != params.length:
        raise ValueError(f"input of {x.numel()} entries, the round expects {params.length}")
    full = (1 << params.bits) - 1
    y = (x.to(torch.int64) + mask_vector(secrets.b_seed, params.length, params.bits)) & full
    for peer, (_, s_pub) in sorted(parse_roster(roster, params.round, client).items()):
        if peer not in inbox:
            continue
        m = mask_vector(_pair_seed(secrets.s_key, s_pub, params.round), params.length, params.bits)
        y = (y + m if client < peer else y - m) & full
    return _HEAD.pack(MASKED, params.round, client) + pack_ints(y, params.bits)


def unmask_response(
    secrets: ClientSecrets,
    params: Params,
    client: int,
    roster: bytes,
    inbox: dict[int, bytes],
    request: bytes,
) -> bytes:
    """Round 4, client: for each neighbour the server lists, decrypt the share it sent in round 2 and reveal its
    ``b`` share (the neighbour sent its input) or its ``s`` share (it dropped out). A tampered, replayed or
    misaddressed share fails authentication and is refused (:class:`ProtocolViolation`)."""
    _head(request, REQUEST, params.round, "unmask request")
    peers = parse_roster(roster, params.round, client)
    body = request[_HEAD.size :]
    if len(body) % 5:
        raise ProtocolViolation("unmask request: malformed")
    asked: dict[int, int] = {}
    for off in range(0, len(body), 5):
        peer, flag = struct.unpack_from("<IB", body, off)
        if peer in asked or peer not in peers or flag not in (_SURVIVED, _DROPPED):
            raise ProtocolViolation(
                f"unmask request: client {peer} asked twice, not a neighbour, or bad flag"
            )
        asked[peer] = flag
    out = [_HEAD.pack(RESPONSE, params.round, client)]
    for peer, flag in asked.items():
        msg = inbox.get(peer)
        if msg is None:
            continue  # no share from that neighbour: nothing to reveal
        b_share, s_share = open_share(secrets, params.round, client, peer, peers[peer][0], msg)
        out.append(struct.pack("<IB", peer, flag) + (b_share if flag == _SURVIVED else s_share))
    return b"".join(out)


def open_share(
    secrets: ClientSecrets, server_round: int, client: int, sender: int, sender_c_pub: bytes, msg: bytes
) -> tuple[bytes, bytes]:
    """Decrypt one share message addressed to ``client``: its ``b`` and ``s`` share values (bytes)."""
    if len(msg) < _PAIR.size:
        raise ProtocolViolation("share: message too short")
    head = msg[: _PAIR.size]
    kind, r, snd, rcv = _PAIR.unpack(head)
    if (kind, r, snd, rcv) != (SHARE, server_round, sender, client):
        raise ProtocolViolation(
            f"share from {snd} to {rcv} of round {r} delivered as {sender} -> {client}, round "
            f"{server_round}: replayed or misrouted"
        )
    try:
        plain = _share_cipher(secrets.c_key, sender_c_pub, server_round).decrypt(
            _nonce(server_round, sender, client), msg[_PAIR.size :], head
        )
    except InvalidTag as err:
        raise ProtocolViolation(f"share from client {sender}: authentication failed (tampered)") from err
    return plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]


# ---------------------------------------------------------------- server half
@dataclass
class SecAggServer:
    """The server of one aggregation: relays keys and shares, sums masked inputs, unmasks the sum.

    Attributes:
        params: the round's public parameters.
        graph: each client's neighbours (:func:`harary_graph`).
        bytes: bytes received (``up_*``) and sent (``down_*``) per protocol round, summed over the clients.
    """

    params: Params
    graph: dict[int, list[int]]
    bytes: dict[str, int] = field(default_factory=dict)
    adverts: dict[int, bytes] = field(default_factory=dict)
    sent: dict[int, dict[int, bytes]] = field(default_factory=dict)
    masked: list[int] = field(default_factory=list)
    total: Tensor | None = None

    def _count(self, key: str, n: int) -> None:
        self.bytes[key] = self.bytes.get(key, 0) + n

    def receive_adverts(self, messages: dict[int, bytes]) -> dict[int, bytes]:
        """Round 1: keep each client's advert; return each client's roster (its neighbours' adverts)."""
        size = _HEAD.size + 2 * _KEY_BYTES
        for client, msg in sorted(messages.items()):
            if (
                client not in self.graph
                or len(msg) != size
                or _head(msg, ADVERT, self.params.round, "advert") != client
            ):
                raise ProtocolViolation(f"advert of client {client} rejected")
            self.adverts[client] = msg
            self._count("up_advertise", len(msg))
        rosters = {}
        for client in self.adverts:
            rosters[client] = b"".join(self.adverts[p] for p in self.graph[client] if p in self.adverts)
            self._count("down_advertise", len(rosters[client]))
        return rosters

    def route_shares(self, outboxes: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Round 2: forward each encrypted share to its receiver (the server reads only the header)."""
        inboxes: dict[int, dict[int, bytes]] = {c: {} for c in self.adverts}
        for sender, out in sorted(outboxes.items()):
            for receiver, msg in sorted(out.items()):
                self._count("up_share", len(msg))
                if receiver not in self.graph.get(sender, ()) or receiver not in inboxes:
                    raise ProtocolViolation(f"share from {sender} to a non-neighbour {receiver}")
                inboxes[receiver][sender] = msg
                self._count("down_share", len(msg))
            self.sent[sender] = out
        return inboxes

    def receive_masked(self, client: int, msg: bytes) -> None:
        """Round 3: add one masked input to the running sum (modulo ``2**bits``); a message of another round, a
        second one from the same client or one from a client that shared no keys is refused."""
        if _head(msg, MASKED, self.params.round, "masked input") != client:
            raise ProtocolViolation(f"masked input of client {client} names another sender")
        if client in self.masked or client not in self.sent:
            raise ProtocolViolation(
                f"masked input of client {client}: repeated, or the client shared no keys"
            )
        y = unpack_ints(msg[_HEAD.size :], self.params.bits, self.params.length)
        self.total = y if self.total is None else (self.total + y) & ((1 << self.params.bits) - 1)
        self.masked.append(client)
        self._count("up_masked", len(msg))

    def dropped(self) -> list[int]:
        """Clients that shared keys but sent no masked input."""
        return sorted(set(self.sent) - set(self.masked))

    def unmask_requests(self) -> dict[int, bytes]:
        """Round 4: ask every client that sent its input for the shares of its neighbours (survived or dropped)."""
        done = set(self.masked)
        out = {}
        for client in sorted(done):
            body = b"".join(
                struct.pack("<IB", p, _SURVIVED if p in done else _DROPPED)
                for p in self.graph[client]
                if p in self.sent
            )
            out[client] = _HEAD.pack(REQUEST, self.params.round, client) + body
            self._count("down_unmask", len(out[client]))
        return out

    def unmask(self, responses: dict[int, bytes]) -> Tensor:
        """Round 4: reconstruct the survivors' self masks and the dropped clients' ``s`` keys from the responses,
        remove their masks from the sum and return it as signed integers (``int64``); :class:`SecAggAborted`
        when a client's secret has fewer than ``threshold`` shares."""
        p = self.params
        if not self.masked:
            raise SecAggAborted("no masked input to unmask")
        done, dropped = set(self.masked), self.dropped()
        shares: dict[tuple[int, int], dict[int, int]] = {}  # (client, flag) -> {x: y}
        for responder, msg in sorted(responses.items()):
            self._count("up_unmask", len(msg))
            if responder not in done or _head(msg, RESPONSE, p.round, "unmask response") != responder:
                raise ProtocolViolation(f"unmask response of client {responder} rejected")
            body, step = msg[_HEAD.size :], 5 + shamir.SHARE_BYTES
            if len(body) % step:
                raise ProtocolViolation(f"unmask response of client {responder}: malformed")
            for off in range(0, len(body), step):
                peer, flag = struct.unpack_from("<IB", body, off)
                if responder not in self.graph.get(peer, ()) or flag != (
                    _SURVIVED if peer in done else _DROPPED
                ):
                    raise ProtocolViolation(
                        f"unmask response of client {responder}: unexpected share of {peer}"
                    )
                got = shares.setdefault((peer, flag), {})
                if responder + 1 in got:
                    raise ProtocolViolation(
                        f"unmask response of client {responder}: share of {peer} repeated"
                    )
                got[responder + 1] = shamir.from_bytes(body[off + 5 : off + step])
        full = (1 << p.bits) - 1
        total = self.total.clone()  # type: ignore[union-attr]
        for client in sorted(done):
            b_seed = self._reconstruct(shares, client, _SURVIVED, "self-mask seed")
            total = (total - mask_vector(b_seed, p.length, p.bits)) & full
        for client in dropped:
            if not any(q in done for q in self.graph[client]):
                continue  # no survivor masked with it
            s_key = X25519PrivateKey.from_private_bytes(
                self._reconstruct(shares, client, _DROPPED, "mask key")
            )
            for peer in self.graph[client]:
                if peer in done:
                    s_pub = self.adverts[peer][_HEAD.size + _KEY_BYTES :]
                    m = mask_vector(_pair_seed(s_key, s_pub, p.round), p.length, p.bits)
                    total = (total - m if peer < client else total + m) & full  # what ``peer`` added
        return torch.where(total >= 1 << (p.bits - 1), total - (1 << p.bits), total)

    def _reconstruct(
        self, shares: dict[tuple[int, int], dict[int, int]], client: int, flag: int, what: str
    ) -> bytes:
        got = shares.get((client, flag), {})
        if len(got) < self.params.threshold:
            raise SecAggAborted(
                f"cannot unmask: the {what} of client {client} has {len(got)} shares from responding "
                f"neighbours, the threshold is {self.params.threshold} (too many dropouts)"
            )
        try:
            return shamir.combine(got, self.params.threshold, _KEY_BYTES)
        except ValueError as err:
            raise SecAggAborted(f"cannot unmask the {what} of client {client}: {err}") from err


__all__ = [
    "DROPOUT_TOLERANCE",
    "FAILURE_PROBABILITY",
    "GRAPHS",
    "ClientSecrets",
    "Params",
    "ProtocolViolation",
    "SecAggAborted",
    "SecAggServer",
    "advertise",
    "degree_for",
    "harary_graph",
    "mask_vector",
    "masked_input",
    "open_share",
    "pack_ints",
    "parse_roster",
    "share_keys",
    "threshold_for",
    "tolerant_degree",
    "unmask_failure",
    "unmask_response",
    "unpack_ints",
]
