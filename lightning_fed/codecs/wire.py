"""The wire format: safetensors bytes (no pickle) with a string metadata header.

A message is ``safetensors.torch.save(tensors, metadata)``. :func:`unpack` checks the header's declared
sizes against the message length before any tensor is materialised, so truncated, oversized or hostile
messages fail with a clear :class:`MalformedMessage` instead of a crash or a huge allocation.
"""

from __future__ import annotations

import json
import struct

import safetensors.torch
from torch import Tensor

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}


class MalformedMessage(ValueError):
    """A message could not be decoded: truncated, oversized, wrong codec or inconsistent header."""


def pack(tensors: dict[str, Tensor], meta: dict[str, str]) -> bytes:
    """Serialise tensors (made contiguous) and string metadata into one message."""
    return safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def unpack(message: bytes, *, max_bytes: int | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Parse and validate a message; return its tensors and metadata.

    Raises:
        MalformedMessage: the message is not a well-formed, self-consistent safetensors blob.
    """
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"message must be bytes, got {type(message).__name__}")
    message = bytes(message)
    if max_bytes is not None and len(message) > max_bytes:
        raise MalformedMessage(f"message of {len(message)} bytes exceeds the limit of {max_bytes}")
    if len(message) < 8:
        raise MalformedMessage(f"message of {len(message)} bytes is too short for a header")
    (hlen,) = struct.unpack("<Q", message[:8])
    if hlen > len(message) - 8 or hlen > 100_000_000:
        raise MalformedMessage(f"header length {hlen} does not fit a message of {len(message)} bytes")
    try:
        header = json.loads(message[8 : 8 + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MalformedMessage(f"header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise MalformedMessage("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    body = len(message) - 8 - hlen
    end_max = 0
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            n = 1
            for d in shape:
                if not isinstance(d, int) or d < 0:
                    raise ValueError
                n *= d
            if dtype not in _DTYPE_BYTES or end - start != n * _DTYPE_BYTES[dtype] or start < 0 or end > body:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise MalformedMessage(f"tensor {name!r} has an inconsistent header entry") from None
        end_max = max(end_max, end)
    if end_max != body:
        raise MalformedMessage(f"message body is {body} bytes but the header describes {end_max}")
    try:
        tensors = safetensors.torch.load(message)
    except Exception as err:  # safetensors raises its own error types
        raise MalformedMessage(f"could not decode tensors: {err}") from None
    return tensors, dict(meta)


def expect_codec(meta: dict[str, str], name: str) -> None:
    """Raise unless the message was produced by the codec called ``name``."""
    got = meta.get("codec")
    if got != name:
        raise MalformedMessage(f"message was encoded by codec {got!r}, this decoder is {name!r}")
