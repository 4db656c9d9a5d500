"""Untrusted messages: truncated, padded, oversized, corrupted or foreign messages are rejected clearly."""

from __future__ import annotations

import pytest
import torch

from lightning_fed.codecs import (
    QSGD,
    Blockwise4bit,
    Blockwise8bit,
    Cast,
    DecodeArgs,
    Identity,
    MalformedMessage,
    PowerSGD,
    RandomK,
    Sign,
    TopK,
)
from lightning_fed.codecs.frame import Writer, fingerprint, write_header
from lightning_fed.flat import FlatSpec
from lightning_fed.protocol import TensorSpec, spec_of

CODECS = [
    Cast("fp16"),
    Cast("bf16"),
    Blockwise8bit(64),
    Blockwise4bit("nf4"),
    Blockwise4bit("fp4"),
    QSGD(7),
    Sign(),
    TopK(0.05),
    TopK(0.05, values=QSGD(3)),
    TopK(0.05, values=Sign()),
    TopK(0.05, values=Sign(block=8, scale_dtype="float16", magnitude_bits=1)),
    TopK(0.1, values=Sign(block=8), group=3),
    RandomK(0.1, values=Blockwise8bit(32)),
    PowerSGD(1),
    PowerSGD(2, values=Cast("fp16")),
]


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(12, 20, generator=g), "b": torch.randn(12, generator=g)}


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_truncated_and_padded_messages_are_rejected(codec):
    p = sample()
    spec = spec_of(p)
    msg = codec.encode(p, {})
    codec.decode(msg, {}, DecodeArgs(spec=spec))
    for cut in sorted({1, 7, 8, 9, len(msg) // 2, len(msg) - 1}):
        with pytest.raises(MalformedMessage):
            codec.decode(msg[:cut], {}, DecodeArgs(spec=spec))
    with pytest.raises(MalformedMessage, match="trailing"):
        codec.decode(msg + b"\x00", {}, DecodeArgs(spec=spec))
    with pytest.raises(MalformedMessage, match="exceeds the limit"):
        codec.decode(msg, {}, DecodeArgs(spec=spec, max_bytes=len(msg) - 1))


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_wrong_layout_or_codec_is_rejected(codec):
    p = sample()
    msg = codec.encode(p, {})
    other = {"w": torch.zeros(12, 21), "b": torch.zeros(12)}
    with pytest.raises(MalformedMessage, match="fingerprint"):
        codec.decode(msg, {}, DecodeArgs(spec=spec_of(other)))
    with pytest.raises(MalformedMessage, match="fingerprint"):
        Cast("fp32").decode(msg, {}, DecodeArgs(spec=spec_of(p)))
    with pytest.raises(MalformedMessage, match="does not carry its layout"):
        codec.decode(msg, {})


def test_bad_headers_and_types():
    spec = spec_of(sample())
    codec = TopK(0.05)
    msg = codec.encode(sample(), {})
    with pytest.raises(MalformedMessage, match="magic"):
        codec.decode(b"XX" + msg[2:], {}, DecodeArgs(spec=spec))
    with pytest.raises(MalformedMessage, match="version"):
        codec.decode(msg[:2] + b"\x09" + msg[3:], {}, DecodeArgs(spec=spec))
    with pytest.raises(MalformedMessage, match="flags"):
        codec.decode(msg[:3] + b"\x80" + msg[4:], {}, DecodeArgs(spec=spec))
    with pytest.raises(MalformedMessage, match="must be bytes"):
        codec.decode("not bytes", {}, DecodeArgs(spec=spec))  # type: ignore[arg-type]
    with pytest.raises(MalformedMessage):
        codec.decode(Identity().encode(sample(), {}), {}, DecodeArgs(spec=spec))
    with pytest.raises(MalformedMessage, match="header length"):
        Identity().decode(msg, {})


def _frame(codec, layout: FlatSpec, body: bytes) -> bytes:
    w = Writer()
    write_header(w, 0, fingerprint(codec.wire_config(), layout.key()))
    w.raw(body)
    return w.getvalue()


def test_hostile_topk_bodies():
    p = {"w": torch.zeros(100)}
    spec, layout = spec_of(p), FlatSpec.from_floats(p)[0]
    codec = TopK(0.05)
    with pytest.raises(MalformedMessage, match="exceeds its limit"):  # k > n
        codec.decode(_frame(codec, layout, b"\xc8\x01"), {}, DecodeArgs(spec=spec))
    with pytest.raises(MalformedMessage, match="varint"):  # endless varint
        codec.decode(_frame(codec, layout, b"\xff" * 12), {}, DecodeArgs(spec=spec))
    good = codec.encode({"w": torch.arange(100.0)}, {})
    body = bytearray(good[8:])
    body[2] ^= 0xFF  # corrupt the index field
    with pytest.raises(MalformedMessage):
        codec.decode(_frame(codec, layout, bytes(body)), {}, DecodeArgs(spec=spec))


def test_hostile_quantizer_fields():
    p = {"w": torch.zeros(64)}
    spec, layout = spec_of(p), FlatSpec.from_floats(p)[0]
    q = QSGD(levels=2, bucket=64)  # 3 bits per level, codes above 4 are invalid
    w = Writer()
    w.floats(torch.tensor([1.0]))
    w.raw(b"\xff" * 24)
    with pytest.raises(MalformedMessage, match="level outside"):
        q.decode(_frame(q, layout, w.getvalue()), {}, DecodeArgs(spec=spec))
    w = Writer()
    w.floats(torch.tensor([float("nan")]))
    w.raw(b"\x00" * 24)
    with pytest.raises(MalformedMessage, match="finite"):
        q.decode(_frame(q, layout, w.getvalue()), {}, DecodeArgs(spec=spec))
    b8 = Blockwise8bit(64)
    for bad in (-1.0, float("nan"), float("inf"), -float("inf")):
        w = Writer()
        w.floats(torch.tensor([bad]))
        w.raw(b"\x00" * 64)
        with pytest.raises(MalformedMessage, match="scales"):
            b8.decode(_frame(b8, layout, w.getvalue()), {}, DecodeArgs(spec=spec))
        with pytest.raises(MalformedMessage, match="scales"):  # the server's path: values left in the message
            b8.decode_deferred(_frame(b8, layout, w.getvalue()), {}, DecodeArgs(sender=0, spec=spec))


def test_the_layout_derived_once_per_spec_keeps_the_fingerprint_check():
    """A codec derives the expected layout and fingerprint once per spec; a message of another configuration or
    layout is still rejected after a good one filled that cache."""
    p = {"w": torch.randn(300)}
    spec = spec_of(p)
    codec = Blockwise8bit(64)
    assert torch.allclose(codec.decode(codec.encode(p, {}), {}, DecodeArgs(spec=spec))["w"], p["w"], atol=0.05)
    with pytest.raises(MalformedMessage, match="fingerprint"):
        codec.decode(Blockwise8bit(128).encode(p, {}), {}, DecodeArgs(spec=spec))
    with pytest.raises(MalformedMessage, match="fingerprint"):
        codec.decode(codec.encode({"w": torch.randn(299)}, {}), {}, DecodeArgs(spec=spec))
    codec.blocksize = 128  # a configuration changed after use: derived again
    assert codec.decode(Blockwise8bit(128).encode(p, {}), {}, DecodeArgs(spec=spec))["w"].shape == (300,)


def test_self_describing_layout_is_validated():
    codec = Cast("fp32", self_describing=True)
    msg = codec.encode(sample(), {})
    assert codec.decode(msg, {})["w"].shape == (12, 20)
    bad = bytearray(msg)
    i = bytes(bad).index(b'"w"')
    bad[i + 1] = ord("x")  # rename an entry: the fingerprint no longer matches
    with pytest.raises(MalformedMessage):
        codec.decode(bytes(bad), {})
    w = Writer()
    write_header(w, 1, b"\x00" * 4)
    w.blob(b"[[1,2,3]]")
    with pytest.raises(MalformedMessage, match="layout section"):
        codec.decode(w.getvalue(), {})


def test_variable_spec_needs_self_describing():
    spec = {"w": TensorSpec((-1, 20), torch.float32)}
    codec = TopK(0.1)
    with pytest.raises(MalformedMessage, match="self_describing"):
        codec.decode(codec.encode({"w": torch.randn(3, 20)}, {}), {}, DecodeArgs(spec=spec))
    codec = TopK(0.1, self_describing=True)
    assert codec.decode(codec.encode({"w": torch.randn(3, 20)}, {}), {}, DecodeArgs(spec=spec))["w"].shape == (3, 20)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: Cast("fp8"), "dtype='fp8'"),
        (lambda: Blockwise8bit(blocksize=100), "blocksize=100"),
        (lambda: Blockwise4bit(quant_type="int4"), "quant_type='int4'"),
        (lambda: Blockwise4bit(blocksize=16), "blocksize=16"),
        (lambda: QSGD(levels=0), "levels=0"),
        (lambda: QSGD(bucket=0), "bucket=0"),
        (lambda: QSGD(norm="l1"), "norm='l1'"),
        (lambda: Sign(block=0), "block=0"),
        (lambda: Sign(scale_dtype="bf16"), "scale_dtype='bf16'"),
        (lambda: Sign(magnitude_bits=2), "magnitude_bits=2"),
        (lambda: TopK(ratio=0.0), "ratio=0.0"),
        (lambda: TopK(group=0), "group=0"),
        (lambda: TopK(group=2, layerwise=True), "layerwise"),
        (lambda: TopK(ratio=1.5), "ratio=1.5"),
        (lambda: TopK(momentum=1.0), "momentum=1.0"),
        (lambda: TopK(warmup_rounds=-1), "warmup_rounds=-1"),
        (lambda: TopK(ratio=0.5, warmup_rounds=3, warmup_start=0.25), "warmup_start=0.25"),
        (lambda: TopK(values=TopK()), "values="),
        (lambda: RandomK(ratio=0), "ratio=0"),
        (lambda: RandomK(values=PowerSGD()), "values="),
        (lambda: PowerSGD(rank=0), "rank=0"),
    ],
)
def test_misconfiguration_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_header_cache_keeps_every_check():
    """Headers are parsed once per distinct header; a cached header still needs a body of exactly its size, and
    oversized headers are never kept."""
    from lightning_fed.codecs import wire

    payload = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}
    msg = wire.pack(payload, {"codec": "identity"})
    assert wire.pack(payload, {"codec": "identity"}) == msg  # the cached header gives the same bytes
    for _ in range(2):  # second pass: header from the cache
        out, meta = wire.unpack(msg)
        assert torch.equal(out["a"], payload["a"]) and torch.equal(out["b"], payload["b"]) and meta == {"codec": "identity"}
    with pytest.raises(wire.MalformedMessage, match="body is"):
        wire.unpack(msg[:-8])
    with pytest.raises(wire.MalformedMessage, match="body is"):
        wire.unpack(msg + b"\0" * 8)
    big = {f"t{i:05d}": torch.zeros(1) for i in range(3000)}  # a header of ~170 KB
    big_msg = wire.pack(big, {})
    hlen = int.from_bytes(big_msg[:8], "little")
    assert hlen > wire._CACHE_MAX_HEADER
    assert len(wire.unpack(big_msg)[0]) == 3000
    assert big_msg[8 : 8 + hlen] not in wire._PARSED  # parsed and validated, not kept
    assert msg[8 : 8 + int.from_bytes(msg[:8], "little")] in wire._PARSED


def test_wire_fast_paths_give_the_same_bytes_and_tensors():
    """A payload whose entries share one buffer is serialised without concatenation, and a body of one dtype in
    header order is cut with one split; both give exactly what the general paths give."""
    import json
    import struct

    from lightning_fed.codecs import wire

    payload = {"w": torch.randn(3, 4), "b": torch.randn(4), "empty": torch.zeros(0), "s": torch.randn(2, 1, 2)}
    spec = FlatSpec.from_payload(payload)
    shared = spec.unflatten(spec.flatten(payload))  # one flat buffer
    msg = wire.pack(payload, {"codec": "identity"})
    assert wire.pack(shared, {"codec": "identity"}) == msg
    mixed = {"h": torch.randn(3).half(), "f": torch.randn(5), "i": torch.arange(3)}
    out, _ = wire.unpack(wire.pack(mixed, {}))
    assert all(torch.equal(out[k], v) and out[k].dtype == v.dtype for k, v in mixed.items())
    out, _ = wire.unpack(msg)
    assert list(out) == list(payload)
    assert all(torch.equal(out[k], v) and out[k].shape == v.shape for k, v in payload.items())
    out["w"].add_(1.0)  # decoded tensors own their memory: the message's bytes are not changed
    assert wire.unpack(msg)[0]["w"].equal(payload["w"])
    # a header whose entries are not in byte order (legal safetensors) takes the general path
    body = torch.cat([payload["b"], payload["w"].reshape(-1)]).numpy().tobytes()
    header = {"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [16, 64]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out, _ = wire.unpack(struct.pack("<Q", len(raw)) + raw + body)
    assert torch.equal(out["w"], payload["w"]) and torch.equal(out["b"], payload["b"])


def test_shared_decode_is_views_of_the_message():
    """A message decoded with ``share`` (the server's uplink) gives views of the message's own bytes, back to back,
    shaped as sent: scalars, empty, 1-D and N-D entries alike."""
    import numpy as np

    from lightning_fed.codecs import wire
    from lightning_fed.flat import contiguous_span

    payload = {"w": torch.randn(3, 4), "s": torch.tensor(2.5), "empty": torch.zeros(0, 3), "b": torch.randn(4)}
    msg = wire.pack(payload, {"codec": "identity"})
    out, _ = wire.unpack(msg, share=True)
    assert list(out) == list(payload)
    assert all(torch.equal(out[k], v) and out[k].shape == v.shape for k, v in payload.items())
    span = contiguous_span([t for t in out.values() if t.numel()])  # an empty tensor has no address
    assert span is not None and span.numel() == 17
    at = np.frombuffer(msg, dtype=np.uint8).ctypes.data  # the message's own memory (no copy)
    assert span.data_ptr() == at + len(msg) - 17 * 4  # the entries are the message's last 17 floats, in place
