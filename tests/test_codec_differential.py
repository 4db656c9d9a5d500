"""Differential coding: references stay bit-identical on both sides, error feedback still conserves the
update, EF21-style tracking converges, foreign or stale messages are rejected, state resumes."""

from __future__ import annotations

import pytest
import torch
from conftest import seeded

from lightning_fed.codecs import QSGD, Differential, MalformedMessage, Sign, TimeCorrelatedTopK, TopK
from lightning_fed.codecs.base import Identity, decode_expected
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


@pytest.mark.parametrize("inner", [TopK(0.05, values=Sign(block=32, scale_dtype="float16")),
                                   TopK(0.05, values=QSGD(7, norm="max")), QSGD(3)])
@pytest.mark.parametrize("smoothing", [1.0, 0.5])
def test_client_and_server_references_stay_identical(inner, smoothing):
    codec = Differential(inner, smoothing=smoothing)
    state: dict = {}
    for u in _updates(400, 6):
        msg = codec.encode(u, state)
        out = codec.decode(msg, spec=spec_of(u), sender=7)
        assert torch.equal(state["reference"], codec.references[7])
        if smoothing == 1.0:
            assert torch.equal(_flat(out), codec.references[7])


def test_error_feedback_still_conserves_the_update():
    codec = Differential(TopK(0.05, values=Sign(block=32)))
    state: dict = {}
    sent = torch.zeros(400)
    total = torch.zeros(400)
    for u in _updates(400, 10):
        total += _flat(u)
        sent += _flat(codec.decode(codec.encode(u, state), spec=spec_of(u), sender=0))
    torch.testing.assert_close(sent + state["residual"], total, atol=1e-4, rtol=1e-5)
    assert float(state["residual"].abs().max()) > 0.1  # not trivially lossless


def test_reference_lowers_what_the_inner_codec_must_carry():
    """On correlated updates the fitted beta is large and the residual left smaller than plain error feedback's."""
    ups = _updates(1000, 12, seed=1)
    plain, diff = TopK(0.05, values=Sign(block=32)), Differential(TopK(0.05, values=Sign(block=32)))
    sp, sd = {}, {}
    betas = []
    for u in ups:
        plain.decode(plain.encode(u, sp), spec=spec_of(u))
        msg = diff.encode(u, sd)
        betas.append(float(torch.frombuffer(bytearray(msg[10:12]), dtype=torch.float16)[0]))
        diff.decode(msg, spec=spec_of(u), sender=0)
    assert betas[0] == 0.0 and min(betas[1:]) > 0.1
    assert float(sd["residual"].norm()) < 0.95 * float(sp["residual"].norm())


def test_fixed_beta_without_feedback_tracks_a_constant_update():
    """EF21: h <- h + C(u - h) with top-k converges to u when u stops changing."""
    u = _updates(200, 1)[0]
    codec = Differential(TopK(0.1, error_feedback=False), beta=1.0)
    state: dict = {}
    errs = []
    for _ in range(12):
        out = codec.decode(codec.encode(u, state), spec=spec_of(u), sender=1)
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
    spec = spec_of(ups[0])
    codec.decode(codec.encode(ups[0], state), spec=spec, sender=1)
    second = codec.encode(ups[1], state)
    with pytest.raises(MalformedMessage, match="another reference"):  # another client's message
        codec.decode(second, spec=spec, sender=2)
    with pytest.raises(MalformedMessage, match="truncated"):
        codec.decode(second[:11], spec=spec, sender=1)
    bad = bytearray(second)
    bad[10:12] = torch.tensor([float("nan")], dtype=torch.float16).view(torch.uint8).numpy().tobytes()
    with pytest.raises(MalformedMessage, match="beta"):
        codec.decode(bytes(bad), spec=spec, sender=1)
    codec.decode(second, spec=spec, sender=1)  # the intact message still decodes
    server_lost = Differential(TopK(0.05, values=Sign(block=32)))
    with pytest.raises(MalformedMessage, match="another reference"):  # the server lost its state
        server_lost.decode(codec.encode(ups[2], state), spec=spec, sender=1)


def test_server_references_resume_from_state_dict():
    ups = _updates(400, 4)
    spec = spec_of(ups[0])
    a = Differential(TopK(0.05, values=Sign(block=32), warmup_rounds=3))
    state: dict = {}
    for u in ups[:2]:
        a.decode(a.encode(u, state), spec=spec, sender=3)
    b = Differential(TopK(0.05, values=Sign(block=32), warmup_rounds=3))
    b.load_state_dict(a.state_dict())
    msg = a.encode(ups[2], state)
    assert torch.equal(_flat(a.decode(msg, spec=spec, sender=3)), _flat(b.decode(msg, spec=spec, sender=3)))


def test_schedules_reach_the_inner_codec():
    inner = TopK(0.01, warmup_rounds=4, warmup_start=0.5)
    codec = Differential(inner)
    codec.on_round_start(2)
    assert inner.round == 2 and inner.density() > 0.01


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
    old = {"w": torch.randn(20, 5)}
    for _ in range(2):
        codec.decode(codec.encode(old, state), spec=spec_of(old), sender=0)
    new = {"w": torch.randn(5, 20)}  # same size, another layout
    out = codec.decode(codec.encode(new, state), spec=spec_of(new), sender=0)
    assert out["w"].shape == (5, 20) and torch.equal(state["reference"], codec.references[0])


def test_decode_expected_passes_the_sender_only_where_accepted():
    u = _updates(400, 2)
    codec = Differential(TopK(0.05))
    state: dict = {}
    decode_expected(codec, codec.encode(u[0], state), spec=spec_of(u[0]), sender=5)
    assert set(codec.references) == {5}
    plain = Identity()
    assert torch.equal(decode_expected(plain, plain.encode(u[0], {}), sender=5)["a"], u[0]["a"])


def test_in_fedloop_every_message_decodes_against_its_client(make_loop, small_dm):
    codec = Differential(TopK(0.05, values=Sign(block=32, scale_dtype="float16")))
    loop = make_loop(rounds=3, codec=codec)
    res = loop.fit(seeded(MNIST1DCNN), small_dm)
    assert all(h["rejected"] == 0 and h["good"] == 2 for h in res.history)
    n = sum(v.numel() for v in float_state(seeded(MNIST1DCNN)).values())
    assert codec.references and all(v.numel() == n for v in codec.references.values())
    for cid in codec.references:
        client = loop.store.load(cid)["codec"]
        assert torch.equal(client["reference"], codec.references[cid])
