"""Statistical and stateful properties: QSGD is unbiased, error feedback conserves the update, DGC state,
density warm-up, per-client state that survives the client store."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_fed.codecs import (
    QSGD,
    Blockwise8bit,
    Cast,
    DecodeArgs,
    EncodeArgs,
    PowerSGD,
    RandomK,
    Sign,
    TopK,
)
from lightning_fed.protocol import spec_of
from lightning_fed.store import ClientStore


def test_qsgd_is_unbiased():
    """4000 independent draws (one bucket each) of one vector: their mean is within 5 standard errors of the
    vector, per element, while a single draw is far off (so the test can fail)."""
    torch.manual_seed(0)
    x = torch.randn(64) * 0.01
    tiled = {"w": x.repeat(4000)}  # every bucket holds a copy of x: independent roundings of the same vector
    codec = QSGD(levels=1, bucket=64)
    draws = codec.decode(codec.encode(tiled, {}), {}, DecodeArgs(spec=spec_of(tiled)))["w"].view(4000, 64)
    mean, se = draws.mean(0), draws.std(0) / 4000**0.5
    z = (mean - x).abs() / se.clamp_min(1e-12)
    assert float(z.max()) < 5.0
    assert float((draws[0] - x).abs().max()) > 10 * float((mean - x).abs().max())


def test_qsgd_mean_error_far_below_deterministic_rounding():
    """Control: deterministic rounding (floor) is biased; QSGD's mean over draws is much closer to x."""
    torch.manual_seed(1)
    x = torch.rand(256) * 0.01
    x[0] = 0.01  # the bucket maximum, so every copy has the same scale
    codec = QSGD(levels=3, bucket=256, norm="max")
    tiled = {"w": x.repeat(2000)}
    mean = codec.decode(codec.encode(tiled, {}), {}, DecodeArgs(spec=spec_of(tiled)))["w"].view(2000, 256).mean(0)
    floor = torch.floor(x / x.max() * 3) * x.max() / 3
    assert float((mean - x).abs().mean()) < 0.1 * float((floor - x).abs().mean())


@pytest.mark.parametrize(
    "codec",
    [
        TopK(0.05),
        TopK(0.05, values=QSGD(7, norm="max")),
        TopK(0.05, values=Sign()),
        TopK(0.05, values=Sign(), layerwise=True),
        RandomK(0.1),
        RandomK(0.1, values=Cast("fp16")),
        Sign(block=16),
        TopK(0.05, values=Sign(block=8, scale_dtype="float16", magnitude_bits=1)),
        TopK(0.1, values=Sign(block=8, scale_dtype="float16"), group=3),
        PowerSGD(rank=1),
        Blockwise8bit(64, error_feedback=True),
    ],
    ids=repr,
)
def test_error_feedback_conserves_the_update(codec):
    """sum of what was sent + the residual left == sum of the inputs (nothing is lost, only delayed)."""
    torch.manual_seed(0)
    shapes = {"a": (6, 10), "b": (6,)}
    spec = {k: v for k, v in spec_of({k: torch.zeros(s) for k, s in shapes.items()}).items()}
    state: dict = {}
    total_in = {k: torch.zeros(s) for k, s in shapes.items()}
    total_sent = {k: torch.zeros(s) for k, s in shapes.items()}
    for r in range(8):
        p = {k: torch.randn(s) for k, s in shapes.items()}
        msg = codec.encode(p, state, EncodeArgs(round=r))
        out = codec.decode(msg, {}, DecodeArgs(spec=spec))
        for k in shapes:
            total_in[k] += p[k]
            total_sent[k] += out[k]
    residual = state["residual"]
    flat_in = torch.cat([total_in[k].reshape(-1) for k in sorted(shapes)])
    flat_sent = torch.cat([total_sent[k].reshape(-1) for k in sorted(shapes)])
    assert torch.allclose(flat_sent + residual, flat_in, atol=1e-4)
    assert float(residual.abs().max()) > 1e-3  # compression was lossy: the residual carries something


def test_topk_residual_decay_scales_the_carried_residual():
    """With residual_decay=d the next round sparsifies d * residual + update; the new residual is the rest."""
    torch.manual_seed(0)
    shapes = {"a": (6, 10), "b": (6,)}
    spec = spec_of({k: torch.zeros(s) for k, s in shapes.items()})
    codec, state = TopK(0.1, residual_decay=0.5), {}
    codec.encode({k: torch.randn(s) for k, s in shapes.items()}, state)
    before = state["residual"].clone()
    p = {k: torch.randn(s) for k, s in shapes.items()}
    out = codec.decode(codec.encode(p, state), {}, DecodeArgs(spec=spec))
    flat = lambda d: torch.cat([d[k].reshape(-1) for k in sorted(shapes)])
    assert torch.allclose(flat(out) + state["residual"], 0.5 * before + flat(p), atol=1e-6)
    plain = TopK(0.1)
    with pytest.raises(ValueError, match="residual_decay=1.5"):
        TopK(0.1, residual_decay=1.5)
    assert plain.residual_decay == 1.0


def test_topk_without_feedback_loses_mass():
    torch.manual_seed(0)
    codec, state = TopK(0.05, error_feedback=False), {}
    x = torch.randn(200)
    out = codec.decode(codec.encode({"w": x}, state), {}, DecodeArgs(spec=spec_of({"w": x})))["w"]
    assert "residual" not in state and int((out != 0).sum()) == 10


def test_layerwise_topk_keeps_the_top_of_every_tensor():
    """Global top-k can starve a tensor with small entries; layerwise keeps round(density * size) of each."""
    big, small = torch.randn(200) * 100, torch.randn(40)
    payload = {"big": big, "small": small}
    spec = spec_of(payload)
    out_global = TopK(0.05, error_feedback=False).decode(TopK(0.05, error_feedback=False).encode(payload, {}), {}, DecodeArgs(spec=spec))
    assert int((out_global["small"] != 0).sum()) == 0 and int((out_global["big"] != 0).sum()) == 12
    codec = TopK(0.05, error_feedback=False, layerwise=True)
    out = codec.decode(codec.encode(payload, {}), {}, DecodeArgs(spec=spec))
    assert int((out["big"] != 0).sum()) == 10 and int((out["small"] != 0).sum()) == 2
    assert torch.equal(out["small"][out["small"] != 0].sort().values, small[small.abs().topk(2).indices].sort().values)
    assert torch.equal(out["big"][out["big"] != 0].sort().values, big[big.abs().topk(10).indices].sort().values)


def test_dgc_momentum_correction_and_masking():
    """With momentum m, the codec sparsifies v = residual + u, u = m u + x, and zeroes u where it sent."""
    torch.manual_seed(0)
    m = 0.9
    codec, state = TopK(0.1, momentum=m, momentum_masking=True), {}
    spec = spec_of({"w": torch.zeros(50)})
    u, v = torch.zeros(50), torch.zeros(50)
    for _ in range(5):
        x = torch.randn(50)
        u = m * u + x
        v = v + u
        out = codec.decode(codec.encode({"w": x}, state), {}, DecodeArgs(spec=spec))["w"]
        sent = out != 0
        assert torch.equal(
            sent, torch.zeros(50, dtype=torch.bool).index_fill(0, torch.topk(v.abs(), 5).indices, True)
        )
        assert torch.allclose(out[sent], v[sent])
        v[sent] = 0
        u[sent] = 0
        assert torch.allclose(state["residual"], v, atol=1e-5)
        assert torch.allclose(state["momentum"], u, atol=1e-5)


def test_density_warmup_schedule():
    codec = TopK(0.001, warmup_rounds=4, warmup_start=0.25)
    dens = [codec.density(r) for r in range(6)]
    assert dens[0] == pytest.approx(0.25) and dens[4] == dens[5] == 0.001
    assert all(a > b for a, b in itertools.pairwise(dens[:5]))
    assert dens[2] == pytest.approx((0.25 * 0.001) ** 0.5)  # exponential: geometric mean half way
    spec = spec_of({"w": torch.zeros(4000)})
    sizes = []
    for r in (0, 4):
        msg = codec.encode({"w": torch.randn(4000)}, {}, EncodeArgs(round=r))
        out = codec.decode(msg, {}, DecodeArgs(round=r, spec=spec))["w"]
        sizes.append(int((out != 0).sum()))
    assert sizes == [1000, 4]
    # the round comes with each call: the codec keeps no schedule state, so a fresh one resumes the warm-up
    assert codec.state_dict() == {}
    codec2 = TopK(0.001, warmup_rounds=4)
    codec2.load_state_dict(codec.state_dict())
    assert [codec2.density(r) for r in range(6)] == dens
    msg = codec2.encode({"w": torch.randn(4000)}, {}, EncodeArgs(round=2))
    assert int((codec2.decode(msg, {}, DecodeArgs(spec=spec))["w"] != 0).sum()) == round(dens[2] * 4000)


def test_state_survives_the_client_store(tmp_path):
    """Per-client state is plain tensors: saved and loaded with weights_only=True, encoding continues identically."""
    torch.manual_seed(0)
    xs = [{"w": torch.randn(30, 4), "b": torch.randn(4)} for _ in range(3)]
    codec = TopK(0.1, momentum=0.5, values=QSGD(3, norm="max"))
    a: dict = {}
    torch.manual_seed(1)
    ref = [codec.encode(x, a) for x in xs]
    store = ClientStore(tmp_path)
    b: dict = {}
    torch.manual_seed(1)
    got = [codec.encode(xs[0], b)]
    for x in xs[1:]:
        store.save(7, {"codec": b})
        b = store.load(7)["codec"]
        got.append(codec.encode(x, b))
    assert got == ref
    assert all(isinstance(v, torch.Tensor) for v in b.values())


def test_layout_change_resets_client_state():
    codec, state = TopK(0.1), {}
    codec.encode({"w": torch.randn(20)}, state)
    assert state["residual"].numel() == 20
    codec.encode({"w": torch.randn(5, 2), "v": torch.randn(3)}, state)  # e.g. the model was pruned
    assert state["residual"].numel() == 13
