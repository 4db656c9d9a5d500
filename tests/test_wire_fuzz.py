"""Property-based fuzzing of the wire format (``codecs/wire.pack`` / ``unpack``), which reads untrusted bytes.

(a) random payloads round-trip exactly; (b) arbitrary bytes and mutations of valid messages (truncations, bit
flips, header rewrites) either decode to tensors no larger than the message or raise ``MalformedMessage``,
nothing else; (c) where both accept a message, ``safetensors`` reads the same tensors.
"""

from __future__ import annotations

import json
import struct
import tracemalloc

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_fed.codecs.wire import MalformedMessage, pack, unpack

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]
NAMES = st.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__")
# Python allocations while decoding: a copy of the body plus the parsed header's objects; never driven by the
# sizes a header declares.
ALLOC_FACTOR, ALLOC_SLACK = 16, 1 << 20


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """A tensor of any carried dtype and a small shape (zero-size dimensions included), any bit pattern."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    numel = 1
    for d in shape:
        numel *= d
    size = torch.empty(0, dtype=dtype).element_size()
    if dtype == torch.bool:
        raw = bytes(draw(st.lists(st.integers(0, 1), min_size=numel, max_size=numel)))
    else:
        raw = draw(st.binary(min_size=numel * size, max_size=numel * size))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) if raw else \
        torch.empty(shape, dtype=dtype)


PAYLOADS = st.dictionaries(NAMES, tensors(), max_size=5)
METAS = st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and bytes (NaN payloads compare equal bit for bit)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and a[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() ==
        b[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        for k in a)


def decode_or_refuse(message: bytes, max_bytes: int | None = None) -> dict[str, torch.Tensor] | None:
    """``unpack`` that must either succeed within bounded memory or raise ``MalformedMessage``."""
    tracemalloc.start()
    try:
        out, meta = unpack(message, max_bytes=max_bytes)
    except MalformedMessage:
        return None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak <= ALLOC_FACTOR * len(message) + ALLOC_SLACK, f"{peak} bytes allocated for {len(message)}"
    assert sum(t.numel() * t.element_size() for t in out.values()) <= len(message)
    assert all(isinstance(k, str) for k in out) and all(isinstance(v, str) for v in meta.values())
    return out


@FUZZ
@given(PAYLOADS, METAS)
def test_roundtrip(payload, meta):
    out, got_meta = unpack(pack(payload, meta))
    assert same(out, payload) and got_meta == meta


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_malformed(blob):
    decode_or_refuse(blob)


@FUZZ
@given(PAYLOADS, METAS, st.data())
def test_mutated_messages_only_raise_malformed(payload, meta, data):
    message = bytearray(pack(payload, meta))
    kind = data.draw(st.sampled_from(["truncate", "flip", "overwrite", "append", "hlen", "limit"]))
    if kind == "truncate":
        message = message[: data.draw(st.integers(0, max(len(message) - 1, 0)))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(message) - 1))
            message[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "overwrite":
        i = data.draw(st.integers(0, len(message) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=16))
        message[i : i + len(chunk)] = chunk
    elif kind == "append":
        message += data.draw(st.binary(min_size=1, max_size=16))
    elif kind == "hlen":
        message[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    else:
        with pytest.raises(MalformedMessage, match="exceeds the limit"):
            unpack(bytes(message), max_bytes=len(message) - 1)
        return
    decode_or_refuse(bytes(message))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "I8", "U8", "BOOL", "F8_E4M3", "X"]) | JSON,
    "shape": st.lists(st.integers(-1, 3) | st.sampled_from([2**40, 2**63, 0]) | JSON, max_size=3) | JSON,
    "data_offsets": st.lists(st.integers(-4, 16) | st.sampled_from([2**63, 2**64 + 4]) | JSON, max_size=3) | JSON,
})


@FUZZ
@given(st.dictionaries(NAMES | st.just("__metadata__"), ENTRY | JSON, max_size=3), st.binary(max_size=48))
def test_hostile_headers_only_raise_malformed(header, body):
    raw = json.dumps(header).encode()
    decode_or_refuse(struct.pack("<Q", len(raw)) + raw + body)


@pytest.mark.parametrize("raw", [
    b"[" * 100_000,
    b'{"a":{"dtype":"F32","shape":[0,1152921504606846976,16],"data_offsets":[0,0]}}',
    b'{"a":{"dtype":"U8","shape":[true,2],"data_offsets":[0,2]}}',
    b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0.0,2.0]}}',
    b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"__metadata__":{"k":1}}',
], ids=["deep-nesting", "zero-size-absurd-dims", "bool-dim", "float-offsets", "non-string-metadata"])
def test_hostile_header_examples(raw):
    decode_or_refuse(struct.pack("<Q", len(raw)) + raw + b"\0\0")


@FUZZ
@given(PAYLOADS, METAS)
def test_safetensors_reads_what_we_write_and_we_read_what_it_writes(payload, meta):
    ours = pack(payload, meta)
    assert same(safetensors.torch.load(ours), payload)
    # safetensors refuses tensors that share memory; the drawn tensors never do
    theirs = safetensors.torch.save({k: v.contiguous() for k, v in payload.items()}, metadata=meta or None)
    out, got_meta = unpack(theirs)
    assert same(out, payload) and got_meta == meta


@FUZZ
@given(PAYLOADS, METAS, st.data())
def test_mutations_agree_with_safetensors_where_both_accept(payload, meta, data):
    message = bytearray(pack(payload, meta))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(message) - 1))
        message[i] ^= 1 << data.draw(st.integers(0, 7))
    ours = decode_or_refuse(bytes(message))
    try:
        theirs = safetensors.torch.load(bytes(message))
    except Exception:  # noqa: BLE001 - any refusal by the library: nothing to compare
        return
    if ours is not None:
        assert same(ours, theirs)
