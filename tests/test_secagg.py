"""Secure aggregation: exact sums with and without dropouts, a masked input that says nothing about the update,
dropout recovery up to the threshold and a clear failure beyond, tampered and replayed messages refused,
nonlinear codecs and bad settings refused at construction, and SecAggFedAvg against plain FedAvg."""

import itertools
import random

import pytest
import torch
from torch import nn

from lightning_fed.codecs import QSGD, Identity, PowerSGD, RandomK, Sign, TimeCorrelatedTopK, TopK
from lightning_fed.codecs.base import EncodeArgs
from lightning_fed.codecs.secagg import SecAggUplink
from lightning_fed.errors import AggregationRefused, ClientError, RoundsFailed
from lightning_fed.flat import FlatSpec
from lightning_fed.privacy import secagg as sa
from lightning_fed.privacy import shamir
from lightning_fed.protocol import Reply
from lightning_fed.strategies import FedAvg, Krum, SecAggFedAvg

ROUND, KEY = 3, b"k" * 32


class Run:
    """One protocol run among ``n`` clients up to the masked inputs (rounds 1-3)."""

    def __init__(self, n=20, length=40, graph="sparse", ratio=0.5, drop=(), seed=0, server_round=ROUND):
        self.clients = list(range(n))
        k = sa.degree_for(n, graph)
        self.p = sa.Params(round=server_round, bits=32, length=length, threshold=sa.threshold_for(k, ratio))
        self.server = sa.SecAggServer(self.p, sa.harary_graph(self.clients, k, seed))
        self.sec = {c: sa.ClientSecrets.derive(KEY, server_round, c) for c in self.clients}
        self.rosters = self.server.receive_adverts(
            {c: sa.advertise(self.sec[c], server_round, c) for c in self.clients}
        )
        outboxes = {c: sa.share_keys(self.sec[c], self.p, c, self.rosters[c]) for c in self.clients}
        self.inboxes = self.server.route_shares(outboxes)
        g = torch.Generator().manual_seed(seed)
        self.x = {c: torch.randint(-(2**20), 2**20, (length,), generator=g) for c in self.clients}
        self.sent = [c for c in self.clients if c not in set(drop)]
        for c in self.sent:
            self.server.receive_masked(c, self.masked(c))

    def masked(self, c, x=None):
        return sa.masked_input(
            self.sec[c], self.p, c, self.rosters[c], self.inboxes[c], self.x[c] if x is None else x
        )

    def respond(self, c, request):
        return sa.unmask_response(self.sec[c], self.p, c, self.rosters[c], self.inboxes[c], request)

    def unmask(self, silent=()):
        requests = self.server.unmask_requests()
        return self.server.unmask(
            {c: self.respond(c, r) for c, r in requests.items() if c not in set(silent)}
        )

    def plain_sum(self):
        return sum(self.x[c] for c in self.sent)


def test_shamir_any_threshold_shares_reconstruct_fewer_fail():
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 5, 9, 11], random.Random(0))
    for pick in ([1, 2, 5], [5, 9, 11], [1, 9, 11, 2]):
        assert shamir.combine({x: shares[x] for x in pick}, 3, 32) == secret
    with pytest.raises(ValueError, match="cannot reconstruct"):
        shamir.combine({1: shares[1], 2: shares[2]}, 3, 32)
    with pytest.raises(ValueError, match="inconsistent"):  # a wrong share lands outside the 32-byte secrets
        shamir.combine({1: shares[1], 2: shares[2], 5: (shares[5] + 1) % shamir.PRIME}, 3, 32)


@pytest.mark.parametrize("graph", ["sparse", "complete"])
@pytest.mark.parametrize("dropout", [0.0, 0.1, 0.3])
def test_unmasked_sum_equals_plain_sum_exactly(graph, dropout):
    n = 20
    drop = random.Random(1).sample(range(n), round(dropout * n))
    run = Run(n=n, graph=graph, drop=drop)
    assert run.server.dropped() == sorted(drop)
    assert torch.equal(run.unmask(), run.plain_sum())


def test_clients_silent_in_the_unmasking_are_recovered():
    run = Run(n=20, drop=[3, 7])
    got = run.unmask(silent=[0, 11, 15])  # sent their input, then left
    assert torch.equal(got, run.plain_sum())


def test_sparse_graph_degree_grows_logarithmically():
    assert [sa.degree_for(n, factor=1.5) for n in (10, 100, 1000, 10000)] == [9, 20, 30, 40]
    tolerant = [sa.degree_for(n) for n in (100, 1000, 10000, 100000)]  # 30 % dropouts, failure 1e-6
    assert tolerant == sorted(tolerant) and tolerant[-1] < 300  # each 10x more clients adds a few dozen
    steps = [b - a for a, b in itertools.pairwise(tolerant)]
    assert steps == sorted(steps, reverse=True)  # log n: the increments shrink
    graph = sa.harary_graph(list(range(100)), 20, 0)
    assert all(len(v) == 20 for v in graph.values())
    assert all(a in graph[b] for a in graph for b in graph[a])  # symmetric
    assert sa.degree_for(100, "complete") == 99


def test_unmask_failure_against_a_hand_computed_hypergeometric_tail():
    # 10 clients, degree 4, threshold 2: a client fails when 3 or 4 of its 4 neighbours are among the 3 dropped
    # of its 9 others: C(3,3) C(6,1) / C(9,4) = 6 / 126; at most 3 dropped, so 4 cannot; union bound over 10
    assert sa.unmask_failure(10, 4, 0.3) == pytest.approx(10 * 6 / 126)
    assert sa.unmask_failure(10, 6, 0.3) == 0.0  # 3 lost of 6 keep the threshold of 3
    assert sa.unmask_failure(100, 20, 0.3) > 0.5  # the former default degree at 100 clients
    k = sa.tolerant_degree(100, 0.3, 1e-6)
    assert k % 2 == 0 and sa.unmask_failure(100, k, 0.3) <= 1e-6 < sa.unmask_failure(100, k - 2, 0.3)
    assert sa.tolerant_degree(100, 0.1, 1e-6) < k  # fewer dropouts, fewer neighbours
    assert sa.tolerant_degree(5, 0.4, 1e-6) == 4  # degree 2 fails w.p. 5 / 6: the complete graph


def test_dropouts_beyond_the_threshold_fail_naming_the_client():
    run = Run(n=12, graph="complete", ratio=0.5)  # threshold 6 of 11 neighbours
    requests = run.server.unmask_requests()
    answered = {
        c: run.respond(c, r) for c, r in list(requests.items())[:6]
    }  # 6 answer: every client has >= 5
    with pytest.raises(sa.SecAggAborted, match=r"client \d+ has 5 shares .* threshold is 6"):
        run.server.unmask(answered)
    run = Run(n=12, graph="complete", ratio=0.5)
    requests = run.server.unmask_requests()
    answered = {c: run.respond(c, r) for c, r in list(requests.items())[:7]}  # 7: every client has >= 6
    assert torch.equal(run.server.unmask(answered), run.plain_sum())


def _chi2_top_bits(values: torch.Tensor, bits=32, bins=16) -> float:
    top = (values & ((1 << bits) - 1)) >> (bits - 4)
    counts = torch.bincount(top, minlength=bins).double()
    expected = values.numel() / bins
    return float(((counts - expected) ** 2 / expected).sum())


def test_masked_update_is_uniform_whatever_the_update():
    run = Run(n=10, length=4000)
    zeros = torch.zeros(4000, dtype=torch.int64)
    ramp = torch.arange(4000, dtype=torch.int64) * 1000
    seen = {}
    for name, x in (("zeros", zeros), ("ramp", ramp)):
        seen[name] = sa.unpack_ints(run.masked(0, x)[9:], 32, 4000)
        assert _chi2_top_bits(seen[name]) < 37.7  # chi-square, 15 dof, p = 0.001: uniform modulo 2**32
    assert _chi2_top_bits(ramp) > 1000  # the same statistic tells the updates themselves apart at once
    a, b = seen["zeros"].double(), seen["ramp"].double()
    scale = 2.0**32 / 12**0.5 / 4000**0.5  # std of a mean of 4000 uniforms on [0, 2**32)
    assert abs(float(a.mean() - b.mean())) < 4 * scale * 2**0.5


def test_tampered_share_is_rejected():
    run = Run(n=10)
    request = run.server.unmask_requests()[0]
    inbox = dict(run.inboxes[0])
    peer = next(iter(inbox))
    bad = bytearray(inbox[peer])
    bad[-1] ^= 1
    inbox[peer] = bytes(bad)
    with pytest.raises(sa.ProtocolViolation, match="authentication failed"):
        sa.unmask_response(run.sec[0], run.p, 0, run.rosters[0], inbox, request)


def test_replayed_or_misrouted_share_is_rejected():
    old, new = Run(n=10, server_round=3), Run(n=10, server_round=4)
    request = new.server.unmask_requests()[0]
    peer = next(iter(new.inboxes[0]))
    replayed = {**new.inboxes[0], peer: old.inboxes[0][peer]}
    with pytest.raises(sa.ProtocolViolation, match="replayed or misrouted"):
        sa.unmask_response(new.sec[0], new.p, 0, new.rosters[0], replayed, request)
    other = next(p for p in new.inboxes[1] if p != peer and p in new.inboxes[0])
    misrouted = {**new.inboxes[0], peer: new.inboxes[1][other]}  # a share addressed to client 1
    with pytest.raises(sa.ProtocolViolation, match="replayed or misrouted"):
        sa.unmask_response(new.sec[0], new.p, 0, new.rosters[0], misrouted, request)


def test_replayed_or_repeated_masked_input_is_rejected():
    old, new = Run(n=10, server_round=3, drop=[0]), Run(n=10, server_round=4, drop=[0])
    with pytest.raises(sa.ProtocolViolation, match="round 3 replayed in round 4"):
        new.server.receive_masked(0, old.masked(0))
    with pytest.raises(sa.ProtocolViolation, match="repeated"):
        new.server.receive_masked(1, new.masked(1))
    with pytest.raises(sa.ProtocolViolation, match="names another sender"):
        new.server.receive_masked(0, new.masked(2))


def test_a_request_for_both_secrets_of_a_client_is_refused():
    run = Run(n=10)
    request = run.server.unmask_requests()[0]
    peer = request[9:13]
    twice = request + peer + bytes([1])  # the same neighbour again, now as dropped: its mask key too
    with pytest.raises(sa.ProtocolViolation, match="asked twice"):
        run.respond(0, twice)


@pytest.mark.parametrize(
    "codec, why",
    [
        (TopK(0.1), "own top-k positions"),
        (Sign(), "not additive"),
        (QSGD(), "not additive"),
        (PowerSGD(), "low-rank"),
    ],
)
def test_nonlinear_codec_is_refused_at_construction(make_loop, codec, why):
    with pytest.raises(ValueError, match=f"codec={type(codec).__name__} is not allowed .*{why}"):
        make_loop(strategy=SecAggFedAvg(), codec=codec)
    make_loop(strategy=SecAggFedAvg(), codec=RandomK(0.1))  # linear ones pass
    make_loop(strategy=SecAggFedAvg(), codec=TimeCorrelatedTopK())


def test_value_codecs_inside_linear_codecs_are_refused(make_loop):
    with pytest.raises(ValueError, match=r"codec=RandomK\(values=.*leave values=None"):
        make_loop(strategy=SecAggFedAvg(), codec=RandomK(0.1, values=Sign()))


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"bits": 12}, "bits"),
        ({"frac_bits": 40}, "frac_bits"),
        ({"threshold_ratio": 0.3}, "threshold_ratio"),
        ({"graph": "ring"}, "graph"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout_tolerance": 0.5}, "dropout_tolerance"),
        ({"threshold_ratio": 0.8, "dropout_tolerance": 0.3}, "dropout_tolerance"),
        ({"failure_probability": 0.0}, "failure_probability"),
        ({"degree_factor": 0}, "degree_factor"),
        ({"weight_cap": 0}, "weight_cap"),
        ({"aggregator": Krum()}, "aggregator"),
        ({"clip": 0}, "clip"),
    ],
)
def test_bad_settings_are_refused(kw, key):
    with pytest.raises(ValueError, match=f"SecAggFedAvg: {key}=.* is not allowed"):
        SecAggFedAvg(**kw)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))


def _round(strategy, codec, deltas, counts, server_round=0):
    """One round by hand: the strategy's setup, each client's masked encoding, the server's aggregation."""
    uplink = strategy.client_callbacks()[0].wrap_uplink(codec)
    instructions = strategy.configure_round(server_round, sorted(deltas))
    replies = []
    for ins in instructions:
        args = EncodeArgs(
            round=server_round,
            client_id=ins.client_id,
            num_examples=counts[ins.client_id],
            config=ins.config,
            broadcast=uplink.broadcast(server_round),
        )
        try:
            msg = uplink.encode(deltas[ins.client_id], {}, args)
        except ClientError as err:  # a simulated dropout
            assert "dropped out" in str(err)
            continue
        replies.append(Reply(ins.client_id, uplink.decode(msg, {}), counts[ins.client_id]))
    return strategy.aggregate(server_round, replies), replies


def test_secagg_fedavg_matches_fedavg_within_the_quantization_error():
    model = _model()
    g = torch.Generator().manual_seed(0)
    keys = [k for k, v in model.state_dict().items()]
    deltas = {
        c: {k: torch.randn(model.state_dict()[k].shape, generator=g) * 0.1 for k in keys} for c in range(8)
    }
    counts = {c: 20 + 13 * c for c in range(8)}
    plain, secure = FedAvg(), SecAggFedAvg(frac_bits=16, weight_cap=200)
    plain.setup(model)
    secure.setup(model)
    plain.aggregate(0, [Reply(c, deltas[c], counts[c]) for c in range(8)])
    metrics, _ = _round(secure, Identity(), deltas, counts)
    bound = 0.5 * 2.0**-16 * 200 * 8 / sum(counts.values())  # half a step per client, rescaled by cap / total
    for k, v in plain.global_payload().items():
        err = (secure.global_payload()[k] - v).abs().max()
        assert 0 < err <= bound + 1e-6
    assert metrics["secagg_total_weight"] == sum(counts.values())
    assert metrics["secagg_bytes_up"] > metrics["secagg_masked_bytes"] > 0


def test_secagg_fedavg_with_dropouts_averages_the_survivors():
    model = _model()
    deltas = {c: {k: torch.full(v.shape, float(c)) for k, v in model.state_dict().items()} for c in range(10)}
    counts = dict.fromkeys(range(10), 10)
    s = SecAggFedAvg(dropout=0.3, late_dropout=0.1, dropout_tolerance=0.4, weight_cap=10, clip=16.0)
    s.setup(model)
    g0 = {k: v.clone() for k, v in s.global_payload().items()}
    metrics, replies = _round(s, Identity(), deltas, counts)
    survivors = [r.client_id for r in replies]
    assert len(survivors) == 7 and metrics["secagg_dropped"] == 3 and metrics["secagg_late"] == 1
    want = sum(survivors) / 7
    for k, v in s.global_payload().items():
        assert torch.allclose(v - g0[k], torch.full_like(v, want), atol=1e-4)


@pytest.mark.parametrize("degree_factor", [None, 1.5])
def test_default_degree_tolerates_30_percent_dropouts_at_100_clients(degree_factor):
    model = nn.Linear(3, 1, bias=False)
    n = 100
    deltas = {c: {"weight": torch.full((1, 3), float(c % 7))} for c in range(n)}
    s = SecAggFedAvg(dropout=0.3, weight_cap=10, clip=16.0, seed=0, degree_factor=degree_factor)
    s.setup(model)
    if degree_factor is not None:  # the former default: degree 20 loses unmasking at 30 % dropouts
        with pytest.raises(AggregationRefused, match="threshold is 10"):
            _round(s, Identity(), deltas, dict.fromkeys(range(n), 10))
        return
    assert s.degree(n) == sa.tolerant_degree(n, 0.3, 1e-6)
    g0 = s.global_flat.clone()
    metrics, replies = _round(s, Identity(), deltas, dict.fromkeys(range(n), 10))
    survivors = [r.client_id for r in replies]
    assert len(survivors) == 70 and metrics["secagg_dropped"] == 30
    want = sum(c % 7 for c in survivors) / 70
    assert torch.allclose(s.global_flat - g0, torch.full((3,), want), atol=1e-4)


def test_tolerant_degree_keeps_every_client_unmaskable_over_many_random_graphs():
    n, drop = 100, 30
    clients = list(range(n))

    def failures(degree, seed):
        graph = sa.harary_graph(clients, degree, seed)
        dropped = set(random.Random(seed).sample(clients, drop))
        t = sa.threshold_for(degree, 0.5)
        return sum(sum(x not in dropped for x in graph[c]) < t for c in clients)

    k = sa.degree_for(n)
    assert sum(failures(k, seed) > 0 for seed in range(300)) == 0
    assert (
        sum(failures(20, seed) > 0 for seed in range(300)) > 50
    )  # degree 20 fails about a quarter of rounds


def test_secagg_with_shared_random_k_updates_only_the_shared_positions():
    model = _model()
    deltas = {c: {k: torch.full(v.shape, 1.0 + c) for k, v in model.state_dict().items()} for c in range(4)}
    counts = dict.fromkeys(range(4), 5)
    s = SecAggFedAvg(weight_cap=5)
    s.setup(model)
    before = s.global_flat.clone()
    _round(s, RandomK(0.25, error_feedback=False), deltas, counts)
    moved = s.global_flat - before
    n = before.numel()
    assert int((moved != 0).sum()) == round(0.25 * n)
    assert torch.allclose(moved[moved != 0], torch.full((round(0.25 * n),), 2.5))  # mean of 1..4


def test_too_many_dropouts_refuse_the_round():
    model = _model()
    deltas = {c: {k: torch.zeros(v.shape) for k, v in model.state_dict().items()} for c in range(10)}
    s = SecAggFedAvg(dropout=0.6)
    s.setup(model)
    with pytest.raises(AggregationRefused, match="threshold"):
        _round(s, Identity(), deltas, dict.fromkeys(range(10), 3))


def test_loop_stops_when_unmasking_keeps_failing(make_loop, small_dm):
    loop = make_loop(
        num_clients=6, clients_per_round=6, rounds=2, max_failed_rounds=1, strategy=SecAggFedAvg(dropout=0.6)
    )
    from lightning_fed.models import MNIST1DCNN

    with pytest.raises(RoundsFailed, match="threshold"):
        loop.fit(MNIST1DCNN(channels=4), small_dm)


def test_uplink_refuses_to_encode_without_the_setup():
    with pytest.raises(ValueError, match="SecAggFedAvg"):
        SecAggUplink(Identity(), KEY).encode({"w": torch.zeros(3)}, {}, EncodeArgs(client_id=0))


def _codec_flat(strategy):
    """The global weights in the codec layout (entries sorted by name), where codec positions live."""
    payload = strategy.global_payload()
    return FlatSpec.from_floats(payload)[0].flatten(payload)


def test_secagg_with_tcs_sends_the_shared_mask_and_shared_exploration():
    model = _model()
    n = sum(v.numel() for v in model.state_dict().values())
    g = torch.Generator().manual_seed(1)
    deltas = {
        c: {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()} for c in range(4)
    }
    counts = dict.fromkeys(range(4), 5)
    tcs = TimeCorrelatedTopK(ratio=0.1, mask_ratio=0.2, error_feedback=False)
    s = SecAggFedAvg(weight_cap=5)
    s.setup(model)
    before = _codec_flat(s)
    _round(s, tcs, deltas, counts, server_round=0)  # no mask yet: only the shared exploration
    first = (_codec_flat(s) - before).nonzero().flatten()
    assert len(first) == round(0.1 * n)
    assert set(tcs.mask.tolist()) == set(first.tolist())  # the next mask: the top of the unmasked mean
    mask = tcs.mask.clone()
    before = _codec_flat(s)
    _round(s, tcs, deltas, counts, server_round=1)
    moved = _codec_flat(s) - before
    second = set(moved.nonzero().flatten().tolist())
    assert set(mask.tolist()) <= second and len(second) == len(mask) + round(0.1 * n)
    mean = sum(FlatSpec.from_floats(d)[0].flatten(d) for d in deltas.values()) / 4
    assert torch.allclose(moved[mask], mean[mask], atol=1e-4)  # the mask's entries are the plain mean there


def test_replayed_masked_input_in_the_loop_counts_as_a_dropout():
    model = _model()
    deltas = {c: {k: torch.full(v.shape, float(c)) for k, v in model.state_dict().items()} for c in range(6)}
    counts = dict.fromkeys(range(6), 10)
    s = SecAggFedAvg(weight_cap=10, clip=16.0)
    s.setup(model)
    _, old = _round(s, Identity(), deltas, counts, server_round=0)
    uplink = s.client_callbacks()[0].wrap_uplink(Identity())
    instructions = s.configure_round(1, list(range(6)))
    replies = [old[0]]  # client 0's masked input of round 0, replayed
    for ins in instructions[1:]:
        args = EncodeArgs(round=1, client_id=ins.client_id, num_examples=10, config=ins.config)
        replies.append(
            Reply(ins.client_id, uplink.decode(uplink.encode(deltas[ins.client_id], {}, args), {}), 10)
        )
    before = s.global_flat.clone()
    metrics = s.aggregate(1, replies)
    assert metrics["secagg_dropped"] == 1 and metrics["secagg_total_weight"] == 50
    assert torch.allclose(s.global_flat - before, torch.full_like(before, 3.0), atol=1e-4)  # mean of 1..5


def test_a_round_of_one_client_or_one_that_can_overflow_is_refused():
    s = SecAggFedAvg()
    s.setup(_model())
    with pytest.raises(ValueError, match="clients_per_round must be >= 2"):
        s.configure_round(0, [3])
    s = SecAggFedAvg(clip=20000.0)
    s.setup(_model())
    with pytest.raises(
        ValueError, match=r"2 clients with clip=20000.0 and frac_bits=16 can overflow bits=32"
    ):
        s.configure_round(0, [0, 1])
