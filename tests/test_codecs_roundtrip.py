"""Round trips of every codec: error bounds, exact byte counts, layouts, composition."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fed.codecs import (
    QSGD,
    Blockwise4bit,
    Blockwise8bit,
    Cast,
    Codec,
    DecodeArgs,
    Identity,
    PowerSGD,
    RandomK,
    Sign,
    TopK,
)
from lightning_fed.codecs.bits import ef_decode, ef_encode, ef_size, pack_bits, packed_size, unpack_bits
from lightning_fed.codecs.frame import HEADER_BYTES
from lightning_fed.protocol import spec_of


def payload(seed: int = 0, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """A payload shaped like a small CNN's delta (conv, bias and linear entries)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv.weight": (8, 4, 3), "conv.bias": (8,), "head.weight": (10, 24), "head.bias": (10,)}
    return {k: torch.randn(s, generator=g) * scale for k, s in shapes.items()}


def flat(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p[k].reshape(-1) for k in sorted(p)])


def roundtrip(codec: Codec, p: dict[str, torch.Tensor], state: dict | None = None) -> tuple[bytes, dict]:
    msg = codec.encode(p, {} if state is None else state)
    out = codec.decode(msg, {}, DecodeArgs(spec=spec_of(p)))
    assert set(out) == set(p)
    for k, v in p.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
    return msg, out


def test_identity_is_exact():
    p = payload()
    _msg, out = roundtrip(Identity(), p)
    for k in p:
        assert torch.equal(out[k], p[k])


@pytest.mark.parametrize("dtype,rel", [("fp16", 2**-11), ("bf16", 2**-8), ("fp32", 0.0)])
def test_cast_error_bound_and_size(dtype, rel):
    p = payload()
    msg, out = roundtrip(Cast(dtype), p)
    x, y = flat(p), flat(out)
    assert bool(((x - y).abs() <= rel * x.abs() + 2.0**-25).all())  # fp16 subnormals: absolute 2^-25
    width = 4 if dtype == "fp32" else 2
    assert len(msg) == HEADER_BYTES + width * x.numel()


def test_cast_fp16_saturates_instead_of_inf():
    p = {"w": torch.tensor([1e6, -1e6, 1.0])}
    _, out = roundtrip(Cast("fp16"), p)
    assert torch.isfinite(out["w"]).all() and float(out["w"][0]) == 65504.0


@pytest.mark.parametrize("blocksize", [64, 256])
def test_blockwise8bit_error_bound(blocksize):
    p = payload()
    msg, out = roundtrip(Blockwise8bit(blocksize=blocksize), p)
    x, y = flat(p), flat(out)
    n = x.numel()
    assert len(msg) == HEADER_BYTES + n + 4 * math.ceil(n / blocksize)
    pad = (-n) % blocksize
    absmax = (
        torch.cat([x, x.new_zeros(pad)]).view(-1, blocksize).abs().amax(1).repeat_interleave(blocksize)[:n]
    )
    # the dynamic 8-bit code's widest gap is below 1/60 of the block maximum
    assert bool(((x - y).abs() <= absmax / 60 + 1e-12).all())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_blockwise4bit_error_bound(quant_type):
    p = payload()
    msg, out = roundtrip(Blockwise4bit(quant_type=quant_type, blocksize=64), p)
    x, y = flat(p), flat(out)
    n = x.numel()
    assert len(msg) == HEADER_BYTES + (n + 1) // 2 + 4 * math.ceil(n / 64)
    pad = (-n) % 64
    absmax = torch.cat([x, x.new_zeros(pad)]).view(-1, 64).abs().amax(1).repeat_interleave(64)[:n]
    assert bool(((x - y).abs() <= absmax * 0.26 + 1e-12).all())  # largest half-gap of both 4-bit codes
    assert float((x - y).abs().mean()) < float(x.abs().mean()) * 0.2


@pytest.mark.parametrize("levels,norm", [(1, "l2"), (7, "l2"), (7, "max"), (100, "max")])
def test_qsgd_error_bound_and_size(levels, norm):
    torch.manual_seed(0)
    p = payload()
    codec = QSGD(levels=levels, bucket=64, norm=norm)
    msg, out = roundtrip(codec, p)
    x, y = flat(p), flat(out)
    n = x.numel()
    bits = math.ceil(math.log2(2 * levels + 1))
    assert len(msg) == HEADER_BYTES + 4 * math.ceil(n / 64) + packed_size(n, bits)
    pad = (-n) % 64
    b = torch.cat([x, x.new_zeros(pad)]).view(-1, 64)
    scale = (b.norm(dim=1) if norm == "l2" else b.abs().amax(1)).repeat_interleave(64)[:n]
    assert bool(((x - y).abs() <= scale / levels * (1 + 1e-5)).all())  # one level at most
    assert bool((torch.sign(y) * torch.sign(x) >= 0).all())  # never flips a sign


def test_sign_reconstruction():
    p = payload()
    msg, out = roundtrip(Sign(block=32, error_feedback=False), p)
    x, y = flat(p), flat(out)
    n = x.numel()
    assert len(msg) == HEADER_BYTES + 4 * math.ceil(n / 32) + packed_size(n, 1)
    assert bool((torch.sign(y) == torch.where(x >= 0, 1.0, -1.0)).all())
    pad = (-n) % 32
    blocks = torch.cat([x, x.new_zeros(pad)]).view(-1, 32)
    assert torch.allclose(y[:32].abs(), x[:32].abs().mean().expand(32))
    assert y.abs().unique().numel() <= blocks.shape[0]


def test_sign_float16_scales_halve_the_scale_bytes():
    p = payload()
    n = flat(p).numel()
    msg32, out32 = roundtrip(Sign(block=32, error_feedback=False), p)
    msg16, out16 = roundtrip(Sign(block=32, scale_dtype="float16", error_feedback=False), p)
    assert len(msg32) - len(msg16) == 2 * math.ceil(n / 32)
    assert torch.allclose(flat(out16), flat(out32), rtol=2**-10, atol=0)


def test_sign_magnitude_bit_two_scales_per_block_and_lower_error():
    p = payload()
    x = flat(p)
    n = x.numel()
    _msg1, out1 = roundtrip(Sign(block=32, error_feedback=False), p)
    msg2, out2 = roundtrip(Sign(block=32, magnitude_bits=1, error_feedback=False), p)
    y1, y2 = flat(out1), flat(out2)
    assert len(msg2) == HEADER_BYTES + 2 * 4 * math.ceil(n / 32) + 2 * packed_size(n, 1)
    assert bool((torch.sign(y2) == torch.where(x >= 0, 1.0, -1.0)).all())
    # the first block by hand: values above the block's mean magnitude get the mean of those, the rest the other mean
    a = x[:32].abs()
    large = a > a.mean()
    expect = torch.where(large, a[large].mean(), a[~large].mean())
    assert torch.allclose(y2[:32].abs(), expect)
    assert float((y2 - x).pow(2).sum()) < float((y1 - x).pow(2).sum())


def test_sign_float16_scale_saturates_instead_of_overflowing():
    p = {"w": torch.full((64,), 1e6)}
    _msg, out = roundtrip(Sign(block=32, scale_dtype="float16", error_feedback=False), p)
    assert bool(torch.isfinite(out["w"]).all()) and float(out["w"].max()) == 65504.0


def test_topk_keeps_largest_exactly():
    p = payload()
    x = flat(p)
    k = round(0.05 * x.numel())
    msg, out = roundtrip(TopK(ratio=0.05, error_feedback=False), p)
    y = flat(out)
    top = torch.topk(x.abs(), k).indices
    assert torch.equal(y[top], x[top])
    assert int((y != 0).sum()) == k
    assert len(msg) == HEADER_BYTES + 1 + ef_size(k, x.numel()) + 4 * k


def test_topk_group_sends_whole_groups_with_largest_l1():
    p = payload()
    x = flat(p)
    n = x.numel()
    g, ratio = 4, 0.1
    msg, out = roundtrip(TopK(ratio=ratio, group=g, error_feedback=False), p)
    y = flat(out)
    slots = -(-n // g)
    k = round(ratio * n / g)
    norms = torch.cat([x.abs(), x.new_zeros(slots * g - n)]).view(-1, g).sum(1)
    top = torch.topk(norms, k).indices.sort().values
    idx = (top.unsqueeze(1) * g + torch.arange(g)).reshape(-1)
    idx = idx[idx < n]
    assert torch.equal(y[idx], x[idx])  # float32 values: exact
    mask = torch.ones(n, dtype=torch.bool)
    mask[idx] = False
    assert bool((y[mask] == 0).all())
    assert len(msg) == HEADER_BYTES + 1 + ef_size(k, slots) + 4 * len(idx)


def test_topk_dense_ratio_without_warmup_is_allowed():
    """warmup_start only constrains a warm-up: TopK(0.5) alone keeps half the entries."""
    p = payload()
    _msg, out = roundtrip(TopK(ratio=0.5, error_feedback=False), p)
    assert int((flat(out) != 0).sum()) == round(0.5 * flat(p).numel())


def test_topk_group_last_group_cut_at_the_end():
    """A ragged last group (n not divisible by g) decodes to exactly n entries, never past the end."""
    p = {"w": torch.zeros(10)}
    p["w"][9] = 5.0  # only the last, 2-entry group (entries 8, 9) is non-zero
    _msg, out = roundtrip(TopK(ratio=0.1, group=4, error_feedback=False), p)
    assert out["w"].shape == (10,) and float(out["w"][9]) == 5.0 and int((out["w"] != 0).sum()) == 1


def test_topk_composes_with_value_codecs():
    p = payload()
    x = flat(p)
    for values in (Cast("fp16"), Blockwise8bit(64), Blockwise4bit("nf4", 64), QSGD(7, norm="max"), Sign()):
        _msg, out = roundtrip(TopK(ratio=0.1, values=values, error_feedback=False), p)
        y = flat(out)
        nz = y != 0
        assert int(nz.sum()) <= round(0.1 * x.numel())
        assert bool((torch.sign(y[nz]) == torch.sign(x[nz])).all())
        assert float((y - x)[nz].abs().max()) <= float(x.abs().max())


def test_randomk_mask_from_seed_and_size():
    torch.manual_seed(3)
    p = payload()
    x = flat(p)
    k = round(0.1 * x.numel())
    msg, out = roundtrip(RandomK(ratio=0.1, error_feedback=False), p)
    y = flat(out)
    kept = y != 0
    assert int(kept.sum()) == k and torch.equal(y[kept], x[kept])
    assert k < 128 and len(msg) == HEADER_BYTES + 4 + 1 + 4 * k  # seed, varint k, float32 values
    torch.manual_seed(3)
    assert RandomK(ratio=0.1, error_feedback=False).encode(p, {}) == msg  # seeded: reproducible


def test_powersgd_exact_on_low_rank_and_raw_vectors():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(12, 2, generator=g), torch.randn(2, 20, generator=g)
    p = {"w": u @ v, "b": torch.randn(12, generator=g)}
    codec = PowerSGD(rank=2, error_feedback=False)
    msg, out = roundtrip(codec, p)
    assert torch.allclose(out["w"], p["w"], atol=1e-4)
    assert torch.equal(out["b"], p["b"])
    assert len(msg) == HEADER_BYTES + 4 * (2 * (12 + 20) + 12)


def test_powersgd_warm_start_improves_fixed_matrix():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(30, 40, generator=g)
    codec, state = PowerSGD(rank=1, error_feedback=False), {}
    errs = []
    for _ in range(6):
        _, out = roundtrip(codec, {"w": m}, state)
        errs.append(float((out["w"] - m).norm()))
    best = torch.linalg.svdvals(m)[1:].pow(2).sum().sqrt()
    assert errs[-1] < errs[0] and errs[-1] < float(best) * 1.01  # converges to the best rank-1 approximation


def test_non_float_entries_are_sent_losslessly():
    p = {**payload(), "labels": torch.tensor([3, 1, 4], dtype=torch.int64)}
    _, out = roundtrip(TopK(ratio=0.1), p)
    assert torch.equal(out["labels"], p["labels"])


def test_dtypes_restored_and_self_describing():
    p = {"a": torch.randn(5, 3).half(), "b": torch.randn(7).double()}
    codec = Cast("fp32", self_describing=True)
    msg = codec.encode(p, {})
    out = codec.decode(msg, {})  # no spec needed
    assert out["a"].dtype == torch.float16 and out["b"].dtype == torch.float64
    assert torch.equal(out["a"], p["a"]) and torch.allclose(out["b"], p["b"])


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 11, 16])
def test_pack_bits_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2**bits, (1001,), generator=g)
    data = pack_bits(v, bits)
    assert len(data) == packed_size(1001, bits)
    assert torch.equal(unpack_bits(data, bits, 1001), v)


@pytest.mark.parametrize(
    "k,n", [(1, 1), (1, 5210), (52, 5210), (104, 5210), (900, 1000), (1000, 1000), (0, 10)]
)
def test_elias_fano_roundtrip_and_size(k, n):
    g = torch.Generator().manual_seed(k)
    idx = torch.randperm(n, generator=g)[:k].sort().values
    data = ef_encode(idx, n)
    assert len(data) == ef_size(k, n)
    assert torch.equal(ef_decode(data, k, n), idx)
    if k:
        assert len(data) * 8 <= k * (2 + math.log2(n / k)) + 8  # near the entropy of a k-subset
