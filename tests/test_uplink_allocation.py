"""Uplink budget allocation: ``encode(..., share=)`` scales the density of top-k codecs for one message, the
loop gives each client a share in proportion to its examples, and wrappers pass the share (and the sender)
through."""

from __future__ import annotations

import pytest
import torch
from conftest import seeded

from lightning_fed.callbacks.sparsity import SparseUplink
from lightning_fed.codecs import QSGD, Differential, Sign, TimeCorrelatedTopK, TopK
from lightning_fed.codecs.base import Codec, Identity, decode_expected, encode_budgeted
from lightning_fed.codecs.wire import pack, unpack
from lightning_fed.data import Dirichlet
from lightning_fed.loop import uplink_shares
from lightning_fed.models import MNIST1DCNN
from lightning_fed.protocol import spec_of


def _payload(n: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "b": torch.randn(10, generator=g)}


def _kept(codec, payload, share, sender=None):
    msg = encode_budgeted(codec, payload, {}, share=share)
    out = decode_expected(codec, msg, spec=spec_of(payload), sender=sender)
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
    assert codec.share == 1.0  # the share holds for one message only


def test_share_reaches_the_inner_codec_of_differential_and_both_sides_stay_in_sync():
    codec = Differential(TopK(0.04, values=Sign(block=32)), smoothing=0.5)
    kept: list[int] = []
    select = codec.inner.select
    codec.inner.select = lambda v, layout: kept.append(len(sel := select(v, layout))) or sel
    state: dict = {}
    sizes = []
    for i, share in enumerate([1.0, 2.0, 0.5, 1.0]):
        u = _payload(seed=i)
        msg = encode_budgeted(codec, u, state, share=share)
        decode_expected(codec, msg, spec=spec_of(u), sender=3)
        assert torch.equal(state["reference"], codec.references[3])
        sizes.append(len(msg))
    assert kept == [40, 81, 20, 40]
    assert sizes[1] > sizes[0] > sizes[2]
    assert codec.share == 1.0 and codec.inner.share == 1.0


def test_time_correlated_top_k_scales_its_own_entries():
    assert _kept(TimeCorrelatedTopK(0.05, 0.0), _payload(), 2.0)[0] == 101


def test_fixed_rate_codecs_and_codecs_without_the_argument_ignore_the_share():
    u = _payload()
    assert encode_budgeted(Identity(), u, {}, share=3.0) == Identity().encode(u, {})
    q = QSGD(7)
    assert len(encode_budgeted(q, u, {}, share=3.0)) == len(q.encode(u, {}))

    class Plain(Codec):  # a user codec written against the two-argument encode
        name = "plain"

        def encode(self, payload, state):
            return pack(payload, {"codec": self.name})

        def decode(self, message, *, max_bytes=None):
            return unpack(message)[0]

    assert torch.equal(Plain().decode(encode_budgeted(Plain(), u, {}, share=2.0))["w"], u["w"])


@pytest.mark.parametrize("share", [0.0, -1.0, float("nan"), float("inf")])
def test_impossible_shares_are_refused(share):
    with pytest.raises(ValueError, match="share"):
        encode_budgeted(TopK(0.05), _payload(), {}, share=share)
    with pytest.raises(ValueError, match="share"):
        TopK(0.05).encode(_payload(), {}, share=share)


def test_sparse_uplink_passes_the_share_and_the_sender_through():
    """Differential inside SparseUplink (as MagnitudeSparsity installs it) keeps one reference per client."""
    codec = SparseUplink(Differential(TopK(0.1, values=Sign(block=32))))
    codec.masks = {"w": torch.arange(1000) % 2 == 0}
    states: dict[int, dict] = {0: {}, 1: {}}
    for i in range(3):
        for cid in (0, 1):
            u = _payload(seed=10 * i + cid)
            msg = codec.encode(u, states[cid], share=2.0 if cid else 1.0)
            out = decode_expected(codec, msg, spec=spec_of(u), sender=cid)
            assert out["w"].shape == (1000,) and not bool(out["w"][1::2].any())
    inner = codec.inner
    assert set(inner.references) == {0, 1}
    for cid in (0, 1):
        assert torch.equal(states[cid]["reference"], inner.references[cid])


class _Spy(TopK):
    """Records the share of every message it encodes."""

    def __init__(self) -> None:
        super().__init__(0.05)
        self.seen: list[float] = []

    def encode(self, payload, state, *, share=1.0):
        self.seen.append(share)
        return super().encode(payload, state, share=share)


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
