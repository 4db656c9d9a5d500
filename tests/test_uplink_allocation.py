"""Uplink budget allocation: ``EncodeArgs(share=)`` scales the density of top-k codecs for one message, the
loop gives each client a share in proportion to its examples, and wrappers pass the arguments (and the sender's
state) through."""

from __future__ import annotations

import pytest
import torch
from conftest import seeded

from lightning_fed.callbacks.sparsity import SparseUplink
from lightning_fed.codecs import QSGD, DecodeArgs, Differential, EncodeArgs, Sign, TimeCorrelatedTopK, TopK
from lightning_fed.codecs.base import Codec, Identity
from lightning_fed.codecs.wire import pack, unpack
from lightning_fed.data import Dirichlet
from lightning_fed.loop import uplink_shares
from lightning_fed.models import MNIST1DCNN
from lightning_fed.protocol import spec_of


def _payload(n: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "b": torch.randn(10, generator=g)}


def _kept(codec, payload, share, sender=None):
    msg = codec.encode(payload, {}, EncodeArgs(share=share))
    out = codec.decode(msg, {}, DecodeArgs(spec=spec_of(payload), sender=sender))
    return sum(int((v != 0).sum()) for v in out.values()), len(msg)


def test_uplink_shares():
    assert uplink_shares("uniform", [5, 50, 500]) == [1.0, 1.0, 1.0]
    shares = uplink_shares("examples", [100, 300, 200, 0])
    assert shares == pytest.approx([100 * 4 / 601, 300 * 4 / 601, 200 * 4 / 601, 4 / 601])  # empty counts as 1
    assert sum(shares) == pytest.approx(4.0)
    assert uplink_shares("examples", []) == []
    with pytest.raises(ValueError, match="uplink_allocation='weights' is not allowed"):
        uplink_shares("weights", [1, 2])


@pytest.mark.parametrize("share, expected", [(1.0, 40), (2.0, 81), (0.5, 20), (100.0, 1010)])
def test_share_scales_the_kept_entries_of_top_k(share, expected):
    kept, _ = _kept(TopK(0.04), _payload(), share)  # round(0.04 * share * 1,010 entries), at most all
    assert kept == expected
    codec = TopK(0.05, values=Sign(block=32))
    small, large = _kept(codec, _payload(), 0.5)[1], _kept(codec, _payload(), 2.0)[1]
    assert large > 2 * small
    assert not hasattr(codec, "share")  # the share comes with each call: nothing per call is kept on the codec
    assert _kept(codec, _payload(), 1.0) == _kept(TopK(0.05, values=Sign(block=32)), _payload(), 1.0)


def test_share_reaches_the_inner_codec_of_differential_and_both_sides_stay_in_sync():
    codec = Differential(TopK(0.04, values=Sign(block=32)), smoothing=0.5)
    kept: list[int] = []
    select = codec.inner.select
    codec.inner.select = lambda v, layout, args: kept.append(len(sel := select(v, layout, args))) or sel
    state: dict = {}
    server: dict = {}
    sizes = []
    for i, share in enumerate([1.0, 2.0, 0.5, 1.0]):
        u = _payload(seed=i)
        msg = codec.encode(u, state, EncodeArgs(round=i, share=share))
        codec.decode(msg, server, DecodeArgs(round=i, spec=spec_of(u), sender=3))
        assert torch.equal(state["reference"], server["reference"])
        sizes.append(len(msg))
    assert kept == [40, 81, 20, 40]
    assert sizes[1] > sizes[0] > sizes[2]
    assert not hasattr(codec, "share") and not hasattr(codec.inner, "share")


def test_time_correlated_top_k_scales_its_own_entries():
    assert _kept(TimeCorrelatedTopK(0.05, 0.0), _payload(), 2.0)[0] == 101


def test_fixed_rate_codecs_and_codecs_that_do_not_read_it_ignore_the_share():
    u = _payload()
    assert Identity().encode(u, {}, EncodeArgs(share=3.0)) == Identity().encode(u, {})
    q = QSGD(7)
    assert len(q.encode(u, {}, EncodeArgs(share=3.0))) == len(q.encode(u, {}))

    class Plain(Codec):  # a user codec that reads nothing from the per-call arguments
        name = "plain"

        def encode(self, payload, state, args=EncodeArgs()):
            return pack(payload, {"codec": self.name})

        def decode(self, message, state, args=DecodeArgs()):
            return unpack(message, max_bytes=args.max_bytes)[0]

    msg = Plain().encode(u, {}, EncodeArgs(share=2.0))
    assert torch.equal(Plain().decode(msg, {}, DecodeArgs(sender=1))["w"], u["w"])


@pytest.mark.parametrize("share", [0.0, -1.0, float("nan"), float("inf")])
def test_impossible_shares_are_refused(share):
    with pytest.raises(ValueError, match="share"):
        EncodeArgs(share=share)
    with pytest.raises(ValueError, match="share"):
        TopK(0.05).encode(_payload(), {}, EncodeArgs(round=1, share=share))


def test_sparse_uplink_passes_the_share_and_the_sender_state_through():
    """Differential inside SparseUplink (as MagnitudeSparsity installs it) keeps one reference per client, in the
    state the server hands decode for that client."""
    codec = SparseUplink(Differential(TopK(0.1, values=Sign(block=32))))
    codec.masks = {"w": torch.arange(1000) % 2 == 0}
    states: dict[int, dict] = {0: {}, 1: {}}
    servers: dict[int, dict] = {0: {}, 1: {}}
    for i in range(3):
        for cid in (0, 1):
            u = _payload(seed=10 * i + cid)
            msg = codec.encode(u, states[cid], EncodeArgs(round=i, share=2.0 if cid else 1.0))
            out = codec.decode(msg, servers[cid], DecodeArgs(round=i, spec=spec_of(u), sender=cid))
            assert out["w"].shape == (1000,) and not bool(out["w"][1::2].any())
    for cid in (0, 1):
        assert torch.equal(states[cid]["reference"], servers[cid]["reference"])
        assert servers[cid]["reference"].numel() == 500 + 10  # the packed vector: 500 kept of w, and b
    assert not torch.equal(servers[0]["reference"], servers[1]["reference"])


def test_sparse_uplink_forwards_broadcast_and_accept_to_time_correlated_top_k():
    """TCS inside SparseUplink: the mask is over the packed vector; accept packs the aggregated replies as they
    were decoded, so the next mask is the top of the packed sum, and the client reads it from the broadcast."""
    tcs = TimeCorrelatedTopK(0.05, mask_ratio=0.1, error_feedback=False)
    codec = SparseUplink(tcs)
    codec.masks = {"w": torch.arange(1000) % 2 == 0}
    outs = []
    for cid in (0, 1):
        u = _payload(seed=cid)
        msg = codec.encode(u, {}, EncodeArgs(round=0, broadcast=codec.broadcast(0)))
        outs.append(codec.decode(msg, {}, DecodeArgs(round=0, spec=spec_of(u), sender=cid)))
    codec.accept(0, outs)
    packed = [torch.cat([o["b"], o["w"][0::2]]) for o in outs]  # sorted names: b, then w's kept entries
    total = packed[0] + packed[1]
    k = min(int((total != 0).sum()), round(0.1 * 510))
    assert torch.equal(tcs.mask, torch.topk(total.abs(), k).indices.sort().values)
    assert codec.broadcast(1) == tcs.broadcast(1) != b""
    u = _payload(seed=5)
    out = codec.decode(codec.encode(u, {}, EncodeArgs(round=1, broadcast=codec.broadcast(1))), {},
                       DecodeArgs(round=1, spec=spec_of(u), sender=0))
    assert torch.equal(torch.cat([out["b"], out["w"][0::2]])[tcs.mask], torch.cat([u["b"], u["w"][0::2]])[tcs.mask])


class _Spy(TopK):
    """Records the share of every message it encodes."""

    def __init__(self) -> None:
        super().__init__(0.05)
        self.seen: list[float] = []

    def encode(self, payload, state, args=EncodeArgs()):
        self.seen.append(args.share)
        return super().encode(payload, state, args)


@pytest.mark.parametrize("allocation", ["uniform", "examples"])
def test_fedloop_gives_each_client_its_share(make_loop, small_dm, allocation):
    spy = _Spy()
    loop = make_loop(rounds=2, codec=spy, partition=Dirichlet(alpha=0.5, min_samples=10),
                     uplink_allocation=allocation)
    res = loop.fit(seeded(MNIST1DCNN), small_dm)
    assert all(h["rejected"] == 0 and h["good"] == 2 for h in res.history)
    sizes = [len(s) for s in loop.shards]
    assert len(set(sizes)) > 1
    expected = uplink_shares(allocation, sizes)
    assert loop.uplink_shares == expected
    clients = [c for r in range(2) for c in loop.sample_clients(r)]
    assert spy.seen == [expected[c] for c in clients]
    if allocation == "examples":
        assert expected != [1.0] * 4 and sum(expected) == pytest.approx(4.0)


def test_fedloop_refuses_an_unknown_allocation(make_loop):
    with pytest.raises(ValueError, match="uplink_allocation='bytes' is not allowed"):
        make_loop(uplink_allocation="bytes")
