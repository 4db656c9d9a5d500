"""The flat layout of a payload's float entries, shared by encoder and decoder.

Compressing codecs see a payload as one float32 vector: its floating-point entries in sorted name order,
each flattened. Sorting makes the order independent of dict order, so a receiver can rebuild the layout
from the spec it expects (``Strategy.reply_spec``) without the sender spelling out names and shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_fed.codecs.wire import MalformedMessage
from lightning_fed.protocol import Payload, PayloadSpec

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_LAYOUT_BYTES = 1 << 20
MAX_NUMEL = 1 << 33


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of the float entries, in sorted name order, and their flat offsets.

    Example::

        layout, extras = Layout.from_payload(payload)
        flat = layout.flatten(payload)          # float32 vector of layout.numel elements
        again = layout.unflatten(flat)          # dict with the original names, shapes and dtypes
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Elements of each entry."""
        return tuple(_numel(s) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each entry in the flat vector."""
        out, n = [], 0
        for s in self.sizes:
            out.append(n)
            n += s
        return tuple(out)

    @property
    def numel(self) -> int:
        """Length of the flat vector."""
        return sum(self.sizes)

    def key(self) -> str:
        """A canonical text of the layout (hashed into the frame fingerprint)."""
        return ";".join(
            f"{n}:{_DTYPE_NAMES[d]}:{','.join(map(str, s))}"
            for n, s, d in zip(self.names, self.shapes, self.dtypes)
        )

    @classmethod
    def from_payload(cls, payload: Payload) -> tuple[Layout, Payload]:
        """The layout of ``payload``'s float entries, and its other (non-float) entries."""
        floats = sorted(k for k, v in payload.items() if v.is_floating_point())
        for k in floats:
            if payload[k].dtype not in _DTYPE_NAMES:
                raise ValueError(f"payload entry {k!r} has unsupported dtype {payload[k].dtype}")
        layout = cls(
            tuple(floats),
            tuple(tuple(payload[k].shape) for k in floats),
            tuple(payload[k].dtype for k in floats),
        )
        extras = {k: v for k, v in payload.items() if not v.is_floating_point()}
        return layout, extras

    @classmethod
    def from_spec(cls, spec: PayloadSpec) -> Layout:
        """The layout a payload matching ``spec`` has.

        Raises:
            MalformedMessage: the spec has variable (``-1``) dimensions or optional float entries, so the
                layout cannot be known in advance (encode with ``self_describing=True``).
        """
        floats = sorted(k for k, v in spec.items() if v.dtype.is_floating_point)
        for k in floats:
            if spec[k].optional or any(d < 0 for d in spec[k].shape) or spec[k].dtype not in _DTYPE_NAMES:
                raise MalformedMessage(
                    f"the expected entry {k!r} has a variable shape or is optional: the layout cannot be derived "
                    "from the spec; the sender must encode with self_describing=True"
                )
        return cls(
            tuple(floats), tuple(tuple(spec[k].shape) for k in floats), tuple(spec[k].dtype for k in floats)
        )

    def flatten(self, payload: Payload) -> Tensor:
        """A new float32 vector holding the entries in layout order."""
        out = torch.empty(self.numel, dtype=torch.float32)
        for name, off, size in zip(self.names, self.offsets, self.sizes):
            out[off : off + size].copy_(payload[name].detach().reshape(-1))
        return out

    def unflatten(self, flat: Tensor) -> Payload:
        """Entries with their own shapes and dtypes (float32 entries are views of ``flat``)."""
        if flat.numel() != self.numel:
            raise MalformedMessage(f"decoded {flat.numel()} values, the layout has {self.numel}")
        return {
            name: flat[off : off + size].view(shape).to(dtype)  # views of the freshly decoded vector
            for name, off, size, shape, dtype in zip(
                self.names, self.offsets, self.sizes, self.shapes, self.dtypes
            )
        }

    def to_bytes(self) -> bytes:
        """Compact JSON of the layout (the self-describing frame section)."""
        rows = [[n, _DTYPE_NAMES[d], list(s)] for n, s, d in zip(self.names, self.shapes, self.dtypes)]
        return json.dumps(rows, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Layout:
        """Parse and validate :meth:`to_bytes`.

        Raises:
            MalformedMessage: not a valid layout.
        """
        try:
            rows = json.loads(bytes(data))
            names, shapes, dtypes = [], [], []
            for name, dt, shape in rows:
                if not isinstance(name, str) or dt not in DTYPES or not isinstance(shape, list):
                    raise ValueError
                if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                    raise ValueError
                names.append(name)
                shapes.append(tuple(shape))
                dtypes.append(DTYPES[dt])
        except (ValueError, TypeError, UnicodeDecodeError):
            raise MalformedMessage("layout section is not a valid list of [name, dtype, shape]") from None
        if names != sorted(set(names)):
            raise MalformedMessage("layout section names are not sorted and unique")
        layout = cls(tuple(names), tuple(shapes), tuple(dtypes))
        if layout.numel > MAX_NUMEL:
            raise MalformedMessage(f"layout declares {layout.numel} elements, more than {MAX_NUMEL}")
        return layout


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
