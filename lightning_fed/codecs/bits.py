"""Bit-level coding of integer vectors: fixed-width bit packing and Elias-Fano coding of sorted indices.

Both are vectorised (no per-element Python loops) and both sides can compute every encoded size from the
element count alone, so a decoder checks each section's length exactly before it reads it.

* :func:`pack_bits` / :func:`unpack_bits`: ``n`` unsigned integers of ``b`` bits each, little-endian bit
  order (element 0 occupies the lowest bits of byte 0), ``ceil(n * b / 8)`` bytes; padding bits are zero.
* :func:`ef_encode` / :func:`ef_decode`: Elias-Fano code of ``k`` strictly increasing indices below ``n``
  (Elias 1974, Fano 1971): the low ``l = floor(log2(n / k))`` bits of every index are bit-packed, the high
  parts are written in unary as a bit vector of ``k + ((n - 1) >> l) + 1`` bits with a one at
  ``high_i + i``. It costs at most ``2 + log2(n / k)`` bits per index, close to the entropy of a random
  ``k``-subset; the sparse codecs use it for their index lists.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_fed.codecs.wire import MalformedMessage

_CHUNK = 1 << 20  # elements per chunk in the generic paths: bounds the temporary bit matrices


def packed_size(n: int, bits: int) -> int:
    """Bytes taken by ``n`` values of ``bits`` bits each."""
    return (n * bits + 7) // 8


def _bits_of(values: Tensor, bits: int) -> Tensor:
    """``[n * bits]`` uint8 tensor of 0/1, least significant bit first."""
    shifts = torch.arange(bits, dtype=torch.int64)
    out = []
    for i in range(0, values.numel(), _CHUNK):
        v = values[i : i + _CHUNK].to(torch.int64)
        out.append(((v.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def _bytes_from_bits(bitvec: Tensor) -> bytes:
    """Pack a 0/1 uint8 vector into bytes, 8 bits per byte, LSB first, zero padding."""
    pad = (-bitvec.numel()) % 8
    if pad:
        bitvec = torch.cat([bitvec, torch.zeros(pad, dtype=torch.uint8)])
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    out = []
    b = bitvec.view(-1, 8)
    for i in range(0, b.shape[0], _CHUNK):
        out.append((b[i : i + _CHUNK] * weights).sum(1, dtype=torch.int32).to(torch.uint8))
    return torch.cat(out).numpy().tobytes() if out else b""


def _bits_from_bytes(data: bytes | memoryview, nbits: int) -> Tensor:
    """The first ``nbits`` bits of ``data`` as a 0/1 uint8 vector; the remaining (padding) bits must be 0."""
    u = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if len(data)
        else torch.zeros(0, dtype=torch.uint8)
    )
    shifts = torch.arange(8, dtype=torch.uint8)
    parts = [
        ((u[i : i + _CHUNK].unsqueeze(1) >> shifts) & 1).reshape(-1) for i in range(0, u.numel(), _CHUNK)
    ]
    bitvec = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    if bitvec.numel() < nbits:
        raise MalformedMessage(f"bit field of {len(data)} bytes is too short for {nbits} bits")
    if bool(bitvec[nbits:].any()):
        raise MalformedMessage("non-zero padding bits in a bit field")
    return bitvec[:nbits]


def pack_bits(values: Tensor, bits: int) -> bytes:
    """Pack non-negative integers below ``2**bits`` into ``packed_size(n, bits)`` bytes.

    Example::

        data = pack_bits(torch.tensor([1, 0, 3]), 2)   # one byte: 0b00_11_00_01
        unpack_bits(data, 2, 3)                        # tensor([1, 0, 3])
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"pack_bits: bits must be in [1, 32], got {bits}")
    values = values.reshape(-1)
    if bits == 8:
        return values.to(torch.uint8).numpy().tobytes()
    if bits == 16:
        return values.to(torch.int32).to(torch.int16).numpy().astype("<i2").tobytes()
    if 8 % bits == 0:  # 1, 2 or 4 bits: several values per byte with shifts, no bit matrix
        per = 8 // bits
        v = values.to(torch.uint8)
        pad = (-v.numel()) % per
        if pad:
            v = torch.cat([v, torch.zeros(pad, dtype=torch.uint8)])
        v = v.view(-1, per)
        out = torch.zeros(v.shape[0], dtype=torch.uint8)
        for j in range(per):
            out |= v[:, j] << (j * bits)
        return out.numpy().tobytes()
    return _bytes_from_bits(_bits_of(values, bits))


def unpack_bits(data: bytes | memoryview, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``n`` int64 values; ``data`` must be exactly ``packed_size(n, bits)``.

    Raises:
        MalformedMessage: wrong length or non-zero padding bits.
    """
    if len(data) != packed_size(n, bits):
        raise MalformedMessage(
            f"bit field has {len(data)} bytes, expected {packed_size(n, bits)} for {n}x{bits} bits"
        )
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    if bits == 8:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    if bits == 16:
        return torch.frombuffer(bytearray(data), dtype=torch.int16).to(torch.int64) & 0xFFFF
    if 8 % bits == 0:
        per, mask = 8 // bits, (1 << bits) - 1
        u = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = torch.stack([(u >> (j * bits)) & mask for j in range(per)], dim=1).reshape(-1)
        if bool(out[n:].any()):
            raise MalformedMessage("non-zero padding bits in a bit field")
        return out[:n].to(torch.int64)
    bitvec = _bits_from_bytes(data, n * bits)
    shifts = torch.arange(bits, dtype=torch.int64)
    out = []
    m = bitvec.view(n, bits)
    for i in range(0, n, _CHUNK):
        out.append((m[i : i + _CHUNK].to(torch.int64) << shifts).sum(1))
    return torch.cat(out)


def ef_low_bits(k: int, n: int) -> int:
    """The Elias-Fano low-bit width for ``k`` indices below ``n``."""
    return max(0, math.floor(math.log2(n / k))) if k > 0 else 0


def ef_size(k: int, n: int) -> int:
    """Bytes of the Elias-Fano code of ``k`` indices below ``n``."""
    if k == 0:
        return 0
    low = ef_low_bits(k, n)
    return (k * low + k + ((n - 1) >> low) + 1 + 7) // 8


def ef_encode(indices: Tensor, n: int) -> bytes:
    """Elias-Fano code of strictly increasing int indices in ``[0, n)`` (``ef_size(k, n)`` bytes)."""
    k = indices.numel()
    if k == 0:
        return b""
    idx = indices.to(torch.int64)
    low = ef_low_bits(k, n)
    high = idx >> low
    upper = torch.zeros(k + ((n - 1) >> low) + 1, dtype=torch.uint8)
    upper[high + torch.arange(k)] = 1
    lows = _bits_of(idx & ((1 << low) - 1), low) if low else torch.zeros(0, dtype=torch.uint8)
    return _bytes_from_bits(torch.cat([lows, upper]))


def ef_decode(data: bytes | memoryview, k: int, n: int) -> Tensor:
    """Inverse of :func:`ef_encode`; validates the code (exact length, ``k`` ones, increasing, below ``n``).

    Raises:
        MalformedMessage: the bytes are not a valid code of ``k`` distinct indices below ``n``.
    """
    if not 0 <= k <= n:
        raise MalformedMessage(f"{k} indices cannot be distinct and below {n}")
    if len(data) != ef_size(k, n):
        raise MalformedMessage(f"index field has {len(data)} bytes, expected {ef_size(k, n)} for {k} of {n}")
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    low = ef_low_bits(k, n)
    nupper = k + ((n - 1) >> low) + 1
    bitvec = _bits_from_bytes(data, k * low + nupper)
    ones = torch.nonzero(bitvec[k * low :]).reshape(-1)
    if ones.numel() != k:
        raise MalformedMessage(f"index field encodes {ones.numel()} indices, expected {k}")
    high = ones - torch.arange(k)
    idx = high << low
    if low:
        lows = (bitvec[: k * low].view(k, low).to(torch.int64) << torch.arange(low, dtype=torch.int64)).sum(1)
        idx = idx | lows
    if bool((idx >= n).any()) or (k > 1 and not bool((idx[1:] > idx[:-1]).all())):
        raise MalformedMessage("index field holds out-of-range or repeated indices")
    return idx
