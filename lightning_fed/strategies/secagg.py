"""FedAvg behind secure aggregation (SecAgg+): the server learns the weighted sum of the updates, not one update.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017;
Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020. The protocol is
:mod:`lightning_fed.privacy.secagg`; the client half of its masked-input round is the uplink codec
:class:`~lightning_fed.codecs.secagg.SecAggUplink`, which this strategy wraps around the run's ``codec``.

A round runs the protocol's four rounds inside the loop's one:

1-2. :meth:`SecAggFedAvg.configure_round` samples the neighbour graph, runs the simulated clients' *advertise
   keys* and *share keys* steps (each a function of the bytes it receives) and relays their messages: each
   instruction's config carries that client's neighbours' public keys and the encrypted shares addressed to it.
3. each client trains, then its codec masks its weighted, quantized update (the loop's ``bytes_up``);
4. :meth:`SecAggFedAvg.aggregate` sums the masked inputs, asks the clients that sent one for their shares
   (*unmasking*), removes the masks and divides by the total weight the sum carries.

Every message's bytes are counted and logged per round (``secagg_*`` metrics). Weights: a masked update cannot be
weighted by the server, so each client multiplies its update by ``min(examples, weight_cap) / weight_cap`` and
sends the capped count inside the masked vector; the server divides the sum by the sum of the counts. The cap
plays the part of the server's trusted example count (safe defaults): no client can weigh more than
``weight_cap`` examples. Dropouts: ``dropout`` of the sampled clients (seeded) vanish after sharing their keys, and
``late_dropout`` of those that sent their input do not answer the unmasking; a client that fails or whose reply is
rejected is a dropout too. Unmasking needs ``threshold`` responding neighbours for every client; when it cannot,
the round is refused (:class:`~lightning_fed.errors.AggregationRefused`, logged as skipped) and the model is kept.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_fed.codecs.base import Codec, Identity
from lightning_fed.codecs.secagg import SecAggUplink, check_linear, support
from lightning_fed.errors import AggregationRefused
from lightning_fed.flat import FlatSpec
from lightning_fed.privacy.secagg import (
    DROPOUT_TOLERANCE,
    FAILURE_PROBABILITY,
    GRAPHS,
    ClientSecrets,
    Params,
    ProtocolViolation,
    SecAggAborted,
    SecAggServer,
    advertise,
    degree_for,
    harary_graph,
    share_keys,
    threshold_for,
    unmask_response,
)
from lightning_fed.protocol import Instruction, PayloadSpec, Reply, TensorSpec
from lightning_fed.seeding import derive_seed
from lightning_fed.strategies.aggregate import MeanFold, flat_norm
from lightning_fed.strategies.aggregators import Aggregator, WeightedMean
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.validation import need

log = logging.getLogger("lightning_fed")
OWNER = "SecAggFedAvg"
_GRAPH, _DROP, _LATE, _SUPPORT = (
    0x5347,
    0x5344,
    0x534C,
    0x5353,
)  # stream tags of the server's public randomness
_HEAD = 9  # kind, round, client of a masked input


class _Wrap(Callback):
    """Puts :class:`SecAggUplink` around the run's uplink codec (FedLoop calls ``wrap_uplink`` at build time)."""

    def __init__(self, strategy: SecAggFedAvg) -> None:
        self.strategy = strategy

    def wrap_uplink(self, codec: Codec) -> Codec:
        """The masked uplink around ``codec`` (checked linear)."""
        self.strategy.check_codec(codec)
        self.strategy.inner = codec
        return SecAggUplink(codec, self.strategy.key_bytes)


class SecAggFedAvg(FedAvg):
    """FedAvg whose clients' updates are securely aggregated (see the module doc).

    Example::

        loop = FedLoop(num_clients=100, clients_per_round=20, strategy=SecAggFedAvg(graph="sparse", dropout=0.1),
                       codec=RandomK(ratio=0.1))

    Args:
        bits: the masks and the sum live modulo ``2**bits`` (a multiple of 8, 16 to 56).
        frac_bits: fixed-point fraction bits: each entry is rounded to a multiple of ``2**-frac_bits`` (the
            quantization error of the mean is at most ``2**-(frac_bits+1)`` times ``weight_cap`` over the mean
            client weight).
        clip: update entries are clipped to ``[-clip, clip]``; ``clients * clip * 2**frac_bits`` must stay below
            ``2**(bits-1)`` (checked each round) so the sum cannot wrap.
        weight_cap: the most examples a client's update weighs (its trusted-count cap).
        graph: ``"sparse"`` (SecAgg+: a Harary graph whose degree follows from ``dropout_tolerance`` and
            ``failure_probability``, ``O(log n)``) or ``"complete"`` (the original SecAgg: every client is every
            other's neighbour).
        dropout_tolerance: the fraction of a round's clients that may drop out (before sending or before
            unmasking) while unmasking still succeeds with probability ``1 - failure_probability``, in
            ``[0, 1 - threshold_ratio)``; the sparse graph's degree is the smallest that guarantees it
            (:func:`~lightning_fed.privacy.secagg.tolerant_degree`).
        failure_probability: the bound on a round's unmasking failure at ``dropout_tolerance``, in ``(0, 1)``.
        degree_factor: instead, the sparse graph's degree ``2 * ceil(degree_factor * log2 n)`` (``None``: derived
            from the tolerance).
        threshold_ratio: shares needed to unmask a client, as a fraction of its neighbours, in ``[0.5, 1]``;
            unmasking tolerates every client losing up to ``1 - threshold_ratio`` of its neighbours.
        dropout: fraction of the sampled clients that drop out after sharing their keys (simulated, seeded).
        late_dropout: fraction of the clients that sent their input that do not answer the unmasking (simulated).
        seed: the server's public randomness (graph, shared positions, simulated dropouts).
        key_seed: the secret from which the simulated clients derive their keys (each process derives the same);
            the server half never reads it.
        server_lr: as in :class:`FedAvg`.
        server_optimizer: as in :class:`FedAvg`.
        aggregator: only :class:`WeightedMean` (a robust rule needs the individual updates the server never sees).
    """

    def __init__(
        self,
        *,
        bits: int = 32,
        frac_bits: int = 16,
        clip: float = 4.0,
        weight_cap: int = 1000,
        graph: str = "sparse",
        dropout_tolerance: float = DROPOUT_TOLERANCE,
        failure_probability: float = FAILURE_PROBABILITY,
        degree_factor: float | None = None,
        threshold_ratio: float = 0.5,
        dropout: float = 0.0,
        late_dropout: float = 0.0,
        seed: int = 0,
        key_seed: int = 0,
        server_lr: float = 1.0,
        server_optimizer: ServerOptimizer | None = None,
        aggregator: Aggregator | None = None,
    ) -> None:
        need(
            OWNER,
            bits % 8 == 0 and 16 <= bits <= 56,
            "bits",
            bits,
            "a multiple of 8 from 16 to 56",
        )
        need(
            OWNER,
            0 <= frac_bits < bits - 1,
            "frac_bits",
            frac_bits,
            f"an integer in [0, bits - 1 = {bits - 1})",
        )
        need(OWNER, clip > 0, "clip", clip, "> 0")
        need(
            OWNER,
            weight_cap >= 1,
            "weight_cap",
            weight_cap,
            "an integer >= 1",
        )
        need(OWNER, graph in GRAPHS, "graph", graph, f"one of {GRAPHS}")
        need(OWNER, degree_factor is None or degree_factor > 0, "degree_factor", degree_factor, "> 0 or None")
        need(OWNER, 0.5 <= threshold_ratio <= 1, "threshold_ratio", threshold_ratio, "in [0.5, 1]")
        need(
            OWNER,
            0 <= dropout_tolerance < 1 - threshold_ratio,
            "dropout_tolerance",
            dropout_tolerance,
            f"in [0, 1 - threshold_ratio = {1 - threshold_ratio:g}) (a client must keep threshold_ratio of its "
            "neighbours)",
        )
        need(OWNER, 0 < failure_probability < 1, "failure_probability", failure_probability, "in (0, 1)")
        need(OWNER, 0 <= dropout < 1, "dropout", dropout, "in [0, 1)")
        need(OWNER, 0 <= late_dropout < 1, "late_dropout", late_dropout, "in [0, 1)")
        need(
            OWNER,
            aggregator is None or type(aggregator) is WeightedMean,
            "aggregator",
            aggregator,
            "None or WeightedMean (the server sees only the sum, so no robust rule can run)",
        )
        super().__init__(server_lr=server_lr, server_optimizer=server_optimizer, aggregator=aggregator)
        self.bits, self.frac_bits, self.clip, self.weight_cap = bits, frac_bits, float(clip), weight_cap
        self.graph, self.degree_factor, self.threshold_ratio = graph, degree_factor, threshold_ratio
        self.dropout_tolerance, self.failure_probability = dropout_tolerance, failure_probability
        self.dropout, self.late_dropout, self.seed = dropout, late_dropout, seed
        self.key_bytes = int(key_seed).to_bytes(32, "little", signed=True)
        self.inner: Codec = Identity()
        self._round: (
            tuple[int, SecAggServer, dict[int, dict[str, Any]], Tensor | None, dict[str, float]] | None
        )
        self._round = None

    def degree(self, n: int) -> int:
        """The neighbours of each of ``n`` clients: ``n - 1`` (complete graph), or the sparse graph's degree."""
        return degree_for(
            n,
            self.graph,
            self.degree_factor,
            dropout=self.dropout_tolerance,
            failure=self.failure_probability,
            ratio=self.threshold_ratio,
        )

    def check_codec(self, codec: Codec) -> None:
        """``ValueError`` naming why unless ``codec`` is linear (FedLoop asks at construction)."""
        check_linear(codec)

    def client_callbacks(self) -> list[Callback]:
        """The hook that masks the uplink."""
        return [_Wrap(self)]

    def configure_round(self, server_round: int, clients: list[int]) -> list[Instruction]:
        """The global weights, and in each config the client's secure-aggregation setup (protocol rounds 1-2)."""
        n = len(clients)
        if n < 2:
            raise ValueError(
                f"{OWNER}: a round of {n} client cannot be aggregated securely; clients_per_round must "
                "be >= 2 (the sum of one update is that update)"
            )
        if n * self.clip * 2.0**self.frac_bits >= 2.0 ** (self.bits - 1):
            raise ValueError(
                f"{OWNER}: {n} clients with clip={self.clip} and frac_bits={self.frac_bits} can "
                f"overflow bits={self.bits}; lower clip or frac_bits, or raise bits"
            )
        degree = self.degree(n)
        spec, _ = self._require_setup()
        support_seed = derive_seed(self.seed, _SUPPORT, server_round) & 0xFFFFFFFF
        idx = support(self.inner, spec.numel, support_seed, self.inner.broadcast(server_round))
        length = (spec.numel if idx is None else idx.numel()) + 1  # the sent coordinates and the capped count
        params = Params(server_round, self.bits, length, threshold_for(degree, self.threshold_ratio))
        server = SecAggServer(
            params, harary_graph(clients, degree, derive_seed(self.seed, _GRAPH, server_round))
        )
        t_client = time.perf_counter()
        secrets = {c: ClientSecrets.derive(self.key_bytes, server_round, c) for c in clients}
        adverts = {c: advertise(secrets[c], server_round, c) for c in clients}
        t_client = time.perf_counter() - t_client
        t = time.perf_counter()
        rosters = server.receive_adverts(adverts)
        t_server = time.perf_counter() - t
        t = time.perf_counter()
        outboxes = {c: share_keys(secrets[c], params, c, rosters[c]) for c in clients}
        t_client += time.perf_counter() - t
        t = time.perf_counter()
        inboxes = server.route_shares(outboxes)
        t_server += time.perf_counter() - t
        drop = set(_pick(clients, self.dropout, derive_seed(self.seed, _DROP, server_round)))
        setups = {
            c: {
                "drop": c in drop,
                "roster": rosters[c],
                "inbox": inboxes[c],
                "bits": self.bits,
                "frac_bits": self.frac_bits,
                "clip": self.clip,
                "weight_cap": self.weight_cap,
                "threshold": params.threshold,
                "support_seed": support_seed,
            }
            for c in clients
        }
        self._round = (server_round, server, setups, idx, {"client_s": t_client, "server_s": t_server})
        payload = self.global_payload()
        return [Instruction(c, payload, {"secagg": setups[c]}) for c in clients]

    def reply_spec(self, instruction: Instruction) -> PayloadSpec:
        """One ``uint8`` entry: the masked input's bytes (their number is the round's)."""
        if self._round is None:
            raise RuntimeError(f"{OWNER}: reply_spec outside a configured round")
        return {"masked": TensorSpec((_HEAD + self.bits // 8 * self._round[1].params.length,), torch.uint8)}

    def begin_fold(self, server_round: int, total_examples: int) -> MeanFold | None:
        """No fold: only the sum of every masked input means anything."""
        return None

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """Sum the masked inputs, run the unmasking round, step the global weights with the weighted mean;
        :class:`AggregationRefused` when unmasking is impossible (too many dropouts)."""
        if self._round is None or self._round[0] != server_round:
            raise RuntimeError(f"{OWNER}: aggregate for round {server_round + 1} without its configure_round")
        _, server, setups, idx, secs = self._round
        self._round = None
        spec, flat = self._require_setup()
        t = time.perf_counter()
        for r in replies:
            try:
                server.receive_masked(r.client_id, r.payload["masked"].numpy().tobytes())
            except ProtocolViolation as err:  # the sender is treated as a dropout
                log.warning(
                    "round %d: masked input of client %d refused: %s", server_round + 1, r.client_id, err
                )
        requests = server.unmask_requests()
        secs["server_s"] += time.perf_counter() - t
        late = set(_pick(sorted(requests), self.late_dropout, derive_seed(self.seed, _LATE, server_round)))
        t = time.perf_counter()
        responses = {}
        for c, req in requests.items():
            if c not in late:
                s = ClientSecrets.derive(self.key_bytes, server_round, c)
                params = server.params
                responses[c] = unmask_response(s, params, c, setups[c]["roster"], setups[c]["inbox"], req)
        secs["client_s"] += time.perf_counter() - t
        t = time.perf_counter()
        try:
            total = server.unmask(responses)
        except SecAggAborted as err:
            raise AggregationRefused(str(err)) from err
        count = int(total[-1])
        if count <= 0:
            raise AggregationRefused(f"the unmasked total weight is {count}")
        mean = (total[:-1].double() * (self.weight_cap / count / 2.0**self.frac_bits)).float()
        layout = FlatSpec.from_floats(self.global_payload())[0]  # the codec layout the clients flatten with
        sent = torch.zeros(layout.numel)
        if idx is None:
            sent.copy_(mean)
        else:
            sent[idx] = mean
        update = spec.flatten(layout.unflatten(sent), self._tmp)  # back to the strategy's layout
        self.server_optimizer.step(flat, update)
        # the inner codec adapts to the unmasked mean, as to one reply (TCS's next mask)
        self.inner.accept(server_round, [layout.unflatten(sent)])
        secs["server_s"] += time.perf_counter() - t
        b = server.bytes
        n = len(setups)
        up = b.get("up_advertise", 0) + b.get("up_share", 0) + b.get("up_masked", 0) + b.get("up_unmask", 0)
        down = b.get("down_advertise", 0) + b.get("down_share", 0) + b.get("down_unmask", 0)
        return {
            "update_norm": flat_norm(update),
            "secagg_dropped": float(len(server.dropped())),
            "secagg_late": float(len(late)),
            "secagg_bytes_up": float(up),
            "secagg_bytes_down": float(down),
            "secagg_bytes_per_client": (up + down) / n,
            "secagg_masked_bytes": float(b.get("up_masked", 0)),
            "secagg_server_s": secs["server_s"],
            "secagg_client_s": secs["client_s"] / n,
            "secagg_total_weight": float(count),
        }


def _pick(items: list[int], fraction: float, seed: int) -> list[int]:
    """``round(fraction * len(items))`` of ``items``, drawn from ``seed``."""
    k = round(fraction * len(items))
    if not k:
        return []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:k]
    return [items[i] for i in order.tolist()]


__all__ = ["SecAggFedAvg"]
