"""Differential coding: references stay bit-identical on both sides, error feedback still conserves the
update, EF21-style tracking converges, foreign or stale messages are rejected, state resumes."""

from __future__ import annotations

import pytest
import torch
from conftest import seeded

from lightning_fed.codecs import (
    QSGD,
    DecodeArgs,
    Differential,
    EncodeArgs,
    MalformedMessage,
    Sign,
    TimeCorrelatedTopK,
    TopK,
)
from lightning_fed.codecs.base import Identity
from lightning_fed.models import MNIST1DCNN
from lightning_fed.protocol import spec_of
from lightning_fed.weights import float_state


def _updates(n: int, rounds: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Correlated updates: a fixed direction plus noise, as a client's successive deltas under non-IID data."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    return [{"a": (base + 0.3 * torch.randn(n, generator=g))[: n // 2].clone(),
             "b": (base + 0.3 * torch.randn(n, generator=g))[n // 2 :].view(-1, 10).clone()} for _ in range(rounds)]


def _flat(p):
    return torch.cat([p["a"].flatten(), p["b"].flatten()])


def _args(u, sender: int | None = None, r: int = 0) -> DecodeArgs:
    return DecodeArgs(round=r, sender=sender, spec=spec_of(u))


@pytest.mark.parametrize("inner", [TopK(0.05, values=Sign(block=32, scale_dtype="float16")),
                                   TopK(0.05, values=QSGD(7, norm="max")), QSGD(3)])
@pytest.mark.parametrize("smoothing", [1.0, 0.5])
def test_client_and_server_references_stay_identical(inner, smoothing):
    codec = Differential(inner, smoothing=smoothing)
    state: dict = {}
    server: dict = {}  # the server's state about this sender
    for u in _updates(400, 6):
        msg = codec.encode(u, state)
        out = codec.decode(msg, server, _args(u, 7))
        assert torch.equal(state["reference"], server["reference"])
        assert torch.equal(state["layout_id"], server["layout_id"])
        if smoothing == 1.0:
            assert torch.equal(_flat(out), server["reference"])
    assert set(server) == {"reference", "layout_id"}
    assert codec.state_dict().keys() == {"inner"}  # no per-sender state on the codec


def test_error_feedback_still_conserves_the_update():
    codec = Differential(TopK(0.05, values=Sign(block=32)))
    state: dict = {}
    server: dict = {}
    sent = torch.zeros(400)
    total = torch.zeros(400)
    for u in _updates(400, 10):
        total += _flat(u)
        sent += _flat(codec.decode(codec.encode(u, state), server, _args(u, 0)))
    torch.testing.assert_close(sent + state["residual"], total, atol=1e-4, rtol=1e-5)
    assert float(state["residual"].abs().max()) > 0.1  # not trivially lossless


def test_reference_lowers_what_the_inner_codec_must_carry():
    """On correlated updates the fitted beta is large and the residual left smaller than plain error feedback's."""
    ups = _updates(1000, 12, seed=1)
    plain, diff = TopK(0.05, values=Sign(block=32)), Differential(TopK(0.05, values=Sign(block=32)))
    sp, sd, server = {}, {}, {}
    betas = []
    for u in ups:
        plain.decode(plain.encode(u, sp), {}, _args(u))
        msg = diff.encode(u, sd)
        betas.append(float(torch.frombuffer(bytearray(msg[10:12]), dtype=torch.float16)[0]))
        diff.decode(msg, server, _args(u, 0))
    assert betas[0] == 0.0 and min(betas[1:]) > 0.1
    assert float(sd["residual"].norm()) < 0.95 * float(sp["residual"].norm())


def test_fixed_beta_without_feedback_tracks_a_constant_update():
    """EF21: h <- h + C(u - h) with top-k converges to u when u stops changing."""
    u = _updates(200, 1)[0]
    codec = Differential(TopK(0.1, error_feedback=False), beta=1.0)
    state: dict = {}
    server: dict = {}
    errs = []
    for _ in range(12):
        out = codec.decode(codec.encode(u, state), server, _args(u, 1))
        errs.append(float((_flat(out) - _flat(u)).abs().max()))
    assert errs[0] > 0.5 and errs[-1] == 0.0


def test_bytes_are_the_inner_message_plus_four():
    u = _updates(400, 1)[0]
    inner = TopK(0.05, values=Sign(block=32))
    assert len(Differential(inner).encode(u, {})) == len(TopK(0.05, values=Sign(block=32)).encode(u, {})) + 4


def test_foreign_stale_and_malformed_messages_are_rejected():
    ups = _updates(400, 3)
    codec = Differential(TopK(0.05, values=Sign(block=32)))
    state: dict = {}
    servers: dict[int, dict] = {1: {}, 2: {}}  # the server's state per sender
    codec.decode(codec.encode(ups[0], state), servers[1], _args(ups[0], 1))
    codec.decode(codec.encode(ups[2], {}), servers[2], _args(ups[2], 2))  # client 2 has its own reference
    second = codec.encode(ups[1], state)
    kept = {k: v.clone() for k, v in servers[1].items()}
    with pytest.raises(MalformedMessage, match="sender 2 was coded against another reference"):  # another client's
        codec.decode(second, servers[2], _args(ups[1], 2))
    with pytest.raises(MalformedMessage, match="truncated"):
        codec.decode(second[:11], servers[1], _args(ups[1], 1))
    bad = bytearray(second)
    bad[10:12] = torch.tensor([float("nan")], dtype=torch.float16).view(torch.uint8).numpy().tobytes()
    with pytest.raises(MalformedMessage, match="beta"):
        codec.decode(bytes(bad), servers[1], _args(ups[1], 1))
    with pytest.raises(MalformedMessage, match="trailing"):  # checked after the body was read: still no trace
        codec.decode(second + b"\x00", servers[1], _args(ups[1], 1))
    assert all(torch.equal(servers[1][k], v) for k, v in kept.items())  # rejected messages changed nothing
    codec.decode(second, servers[1], _args(ups[1], 1))  # the intact message still decodes
    with pytest.raises(MalformedMessage, match="another reference"):  # the server lost its state
        codec.decode(codec.encode(ups[2], state), {}, _args(ups[2], 1))


def test_server_references_resume_from_the_sender_store(tmp_path):
    """The server's reference lives in its per-sender state: plain tensors, saved and loaded with
    weights_only=True (as the loop's store does); a fresh codec with the loaded state decodes identically."""
    from lightning_fed.store import ClientStore

    ups = _updates(400, 4)
    a = Differential(TopK(0.05, values=Sign(block=32), warmup_rounds=3))
    state: dict = {}
    server: dict = {}
    for r, u in enumerate(ups[:2]):
        a.decode(a.encode(u, state, EncodeArgs(round=r)), server, _args(u, 3, r))
    store = ClientStore(tmp_path)
    store.save(3, {"codec": server})
    loaded = store.load(3)["codec"]
    assert all(isinstance(v, torch.Tensor) for v in loaded.values())
    b = Differential(TopK(0.05, values=Sign(block=32), warmup_rounds=3))
    b.load_state_dict(a.state_dict())
    msg = a.encode(ups[2], state, EncodeArgs(round=2))
    assert torch.equal(_flat(a.decode(msg, server, _args(ups[2], 3, 2))), _flat(b.decode(msg, loaded, _args(ups[2], 3, 2))))


def test_schedules_reach_the_inner_codec():
    """The inner codec gets the same EncodeArgs: its warm-up follows args.round."""
    inner = TopK(0.01, warmup_rounds=4, warmup_start=0.5)
    codec = Differential(inner)
    kept: list[int] = []
    select = inner.select
    inner.select = lambda v, layout, args: kept.append(len(sel := select(v, layout, args))) or sel
    u = _updates(400, 1)[0]
    codec.decode(codec.encode(u, {}, EncodeArgs(round=2)), {}, _args(u, 0, 2))
    assert inner.density(2) > 0.01 and kept == [round(inner.density(2) * 400)]


def test_refused_inner_codecs():
    with pytest.raises(ValueError, match="inner="):
        Differential(Identity())
    with pytest.raises(ValueError, match="another Differential"):
        Differential(Differential(TopK(0.1)))
    with pytest.raises(ValueError, match="TimeCorrelatedTopK"):
        Differential(TimeCorrelatedTopK())
    with pytest.raises(ValueError, match="max_beta"):
        Differential(TopK(0.1), max_beta=0)
    with pytest.raises(ValueError, match="beta=3"):
        Differential(TopK(0.1), beta=3.0)
    with pytest.raises(ValueError, match="smoothing=0"):
        Differential(TopK(0.1), smoothing=0.0)


def test_a_new_layout_starts_a_new_reference_on_both_sides():
    """A model whose structure changed (e.g. pruned) drops the client's reference; the server follows."""
    codec = Differential(TopK(0.1))
    state: dict = {}
    server: dict = {}
    old = {"w": torch.randn(20, 5)}
    for _ in range(2):
        codec.decode(codec.encode(old, state), server, _args(old, 0))
    new = {"w": torch.randn(5, 20)}  # same size, another layout
    out = codec.decode(codec.encode(new, state), server, _args(new, 0))
    assert out["w"].shape == (5, 20) and torch.equal(state["reference"], server["reference"])
    assert torch.equal(state["layout_id"], server["layout_id"])


def test_server_state_goes_only_where_it_is_handed():
    """decode keeps what it knows about a sender in the dict it is handed, nothing on the codec; codecs
    without per-sender state leave the dict alone."""
    u = _updates(400, 2)
    codec = Differential(TopK(0.05))
    state: dict = {}
    servers: dict[int, dict] = {5: {}, 6: {}}
    codec.decode(codec.encode(u[0], state), servers[5], _args(u[0], 5))
    assert set(servers[5]) == {"reference", "layout_id"} and servers[6] == {}
    assert torch.equal(servers[5]["reference"], state["reference"])
    plain = Identity()
    untouched: dict = {}
    assert torch.equal(plain.decode(plain.encode(u[0], {}), untouched, _args(u[0], 5))["a"], u[0]["a"])
    assert untouched == {}


def test_in_fedloop_every_message_decodes_against_its_client(make_loop, small_dm):
    codec = Differential(TopK(0.05, values=Sign(block=32, scale_dtype="float16")))
    loop = make_loop(rounds=3, codec=codec)
    res = loop.fit(seeded(MNIST1DCNN), small_dm)
    # a reference out of step on either side would reject the client's next message: none was rejected
    assert all(h["rejected"] == 0 and h["good"] == 2 for h in res.history)
    n = sum(v.numel() for v in float_state(seeded(MNIST1DCNN)).values())
    clients = sorted({c for r in range(3) for c in loop.sample_clients(r)})
    for cid in clients:
        client = loop.store.load(cid)["codec"]
        assert client["reference"].numel() == n
        assert torch.equal(client["reference"], loop.senders.load(cid)["reference"])  # both sides in step, on disk
