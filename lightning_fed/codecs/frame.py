"""The compact wire format of the compressing codecs: a small binary frame, no pickle.

Safetensors spends about 80 bytes of JSON header per tensor: more than a whole top-k message of a small
model. Compressing codecs therefore write one compact frame (the :class:`Identity` baseline stays
safetensors). All integers are little-endian; ``varint`` is unsigned LEB128 (7 bits per byte).

=========  ========  ==================================================================================
offset     size      field
=========  ========  ==================================================================================
0          2         magic ``b"LF"``
2          1         format version (1)
3          1         flags: bit 0 = a layout section follows, bit 1 = an extras section follows
4          4         fingerprint: first 4 bytes of BLAKE2b over the codec's wire configuration and the
                     payload layout (names, dtypes, shapes of the float entries)
8          varint+n  layout section (flag bit 0): JSON ``[[name, dtype, [dims...]], ...]``
…          varint+n  extras section (flag bit 1): the payload's non-float entries as safetensors
…          …         codec body: fields whose sizes follow from the layout and earlier fields
=========  ========  ==================================================================================

The float entries of the payload, in sorted name order, form one float32 vector of ``n`` elements;
the codec body encodes that vector. Its layout is not sent by default: the receiver knows it
(``decode(..., spec=...)``) and the fingerprint proves both sides agree. Every read is bounds-checked
and a frame must be consumed exactly, so truncated, padded or inconsistent messages raise
:class:`~lightning_fed.codecs.wire.MalformedMessage`.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch
from torch import Tensor

from lightning_fed.codecs.wire import MalformedMessage, read_only_view

MAGIC = b"LF"
VERSION = 1
FLAG_LAYOUT = 1
FLAG_EXTRAS = 2
HEADER_BYTES = 8
MAX_LAYOUT_BYTES = 1 << 20  # the longest self-describing layout section a decoder reads


def fingerprint(*parts: str) -> bytes:
    """4-byte digest of the given strings (codec configuration, layout key)."""
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=4).digest()


class Writer:
    """Appends the fields of a frame.

    Example::

        w = Writer()
        w.varint(52)
        w.raw(b"\\x01\\x02")
        message = w.getvalue()
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def raw(self, data: bytes) -> None:
        """Append bytes whose length the reader can compute itself."""
        self._parts.append(bytes(data))

    def varint(self, value: int) -> None:
        """Append an unsigned LEB128 integer."""
        if value < 0:
            raise ValueError(f"varint must be >= 0, got {value}")
        out = bytearray()
        while True:
            byte = value & 0x7F
            value >>= 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                break
        self._parts.append(bytes(out))

    def blob(self, data: bytes) -> None:
        """Append a varint length and the bytes."""
        self.varint(len(data))
        self.raw(data)

    def u32(self, value: int) -> None:
        """Append a little-endian uint32."""
        self._parts.append(struct.pack("<I", value))

    def floats(self, values: Tensor, dtype: torch.dtype = torch.float32) -> None:
        """Append a float vector as little-endian ``dtype`` values (float32, float16 or bfloat16)."""
        v = values.detach().reshape(-1).to(dtype).contiguous()
        self._parts.append(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")

    def getvalue(self) -> bytes:
        """The frame so far."""
        return b"".join(self._parts)


class Reader:
    """Reads the fields of a frame with bounds checks; :meth:`finish` rejects trailing bytes.

    Args:
        data: the message.
    """

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: str = "field") -> memoryview:
        """The next ``n`` bytes."""
        if n < 0 or self.pos + n > len(self.data):
            raise MalformedMessage(
                f"message truncated: {what} needs {n} bytes at offset {self.pos}, message has {len(self.data)}"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def varint(self, what: str = "integer", max_value: int = 2**62) -> int:
        """The next unsigned LEB128 integer, at most ``max_value``."""
        value, shift = 0, 0
        while True:
            (byte,) = self.take(1, what)
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift > 63:
                raise MalformedMessage(f"{what}: varint longer than 9 bytes")
        if value > max_value:
            raise MalformedMessage(f"{what}={value} exceeds its limit {max_value}")
        return value

    def blob(self, what: str, max_len: int) -> memoryview:
        """The next length-prefixed field (at most ``max_len`` bytes)."""
        n = self.varint(f"{what} length", max_len)
        return self.take(n, what)

    def u32(self, what: str = "uint32") -> int:
        """The next little-endian uint32."""
        return struct.unpack("<I", self.take(4, what))[0]

    def floats(self, n: int, dtype: torch.dtype = torch.float32, what: str = "values") -> Tensor:
        """The next ``n`` values of ``dtype`` as a float32 tensor (a copy: the message stays read-only)."""
        raw = self.take(n * dtype.itemsize, what)
        if n == 0:
            return torch.zeros(0)
        if dtype == torch.float32:  # block scales, bucket norms: one copy of the bytes, read through numpy
            # (no tensor over a read-only buffer, so no warning to catch: a few microseconds per message)
            return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy())
        return read_only_view(raw, dtype, 0).to(torch.float32, copy=True)  # the only copy made

    def remaining(self) -> int:
        """Bytes not read yet."""
        return len(self.data) - self.pos

    def finish(self) -> None:
        """Raise unless the whole message was read."""
        if self.remaining():
            raise MalformedMessage(f"message has {self.remaining()} unexpected trailing bytes (oversized)")


def write_header(w: Writer, flags: int, digest: bytes) -> None:
    """Magic, version, flags and fingerprint."""
    w.raw(MAGIC + bytes([VERSION, flags]) + digest)


def read_header(r: Reader) -> tuple[int, bytes]:
    """Check magic and version; return ``(flags, fingerprint)``."""
    head = bytes(r.take(HEADER_BYTES, "frame header"))
    if head[:2] != MAGIC:
        raise MalformedMessage(f"not a lightning_fed frame (magic {head[:2]!r}, expected {MAGIC!r})")
    if head[2] != VERSION:
        raise MalformedMessage(f"frame version {head[2]} is not supported (expected {VERSION})")
    flags = head[3]
    if flags & ~(FLAG_LAYOUT | FLAG_EXTRAS):
        raise MalformedMessage(f"unknown frame flags {flags:#04x}")
    return flags, head[4:8]
