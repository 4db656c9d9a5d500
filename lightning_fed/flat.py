"""The flat layout of a dict of tensors: one contiguous vector, so server math and codecs run as a few
vectorised ops.

:class:`FlatSpec` serves two users. Strategies lay out a model's entries in their iteration order in one
buffer (:meth:`FlatSpec.from_payload`) and aggregate in place. Codecs see a payload as one float32 vector of
its floating-point entries in sorted name order (:meth:`FlatSpec.from_floats`): sorting makes the order
independent of dict order, so a receiver rebuilds the layout from the spec it expects
(:meth:`FlatSpec.from_spec`, ``Strategy.reply_spec``) without the sender spelling out names and shapes, and
both sides prove they agree through :meth:`FlatSpec.key` (hashed into every frame's fingerprint).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # protocol imports this module
    from lightning_fed.protocol import Payload, PayloadSpec, TensorSpec

# the float dtypes a codec layout may hold, by their name in the self-describing layout section
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_NUMEL = 1 << 33  # the largest flat vector a received layout section may declare


def _malformed(text: str) -> Exception:
    # imported here: lightning_fed.codecs imports this module
    from lightning_fed.codecs.wire import MalformedMessage

    return MalformedMessage(text)


def contiguous_span(tensors: Sequence[Tensor]) -> Tensor | None:
    """A 1-D view covering ``tensors`` when they lie back to back, in order, within the memory of the first one's
    storage (same dtype, contiguous): e.g. the entries of :meth:`FlatSpec.unflatten` or of a decoded message. ``None`` otherwise.

    Lets the callers run one vectorised op (a norm check, a serialisation, an accumulation) on the whole
    payload without first copying it into a new buffer.
    """
    if not tensors:
        return None
    first = tensors[0]
    dtype, size = first.dtype, first.element_size()
    end = first.data_ptr()
    total = 0
    for t in tensors:
        if t.dtype != dtype or t.data_ptr() != end or not t.is_contiguous():
            return None
        n = t.numel()
        end += n * size
        total += n
    storage = first.untyped_storage()  # memory past the first's storage could be another's: no view over it
    if end > storage.data_ptr() + storage.nbytes():
        return None
    return first.as_strided((total,), (1,), first.storage_offset())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class FlatSpec:
    """Names, shapes and dtypes of a dict of tensors, and their offsets inside one flat vector of ``dtype``.

    Example::

        spec = FlatSpec.from_payload(model_state)   # strategies: every entry, in iteration order
        buf = spec.flatten(model_state)             # one contiguous 1-D tensor
        views = spec.unflatten(buf)                 # dict of views sharing buf's memory

        layout, extras = FlatSpec.from_floats(payload)   # codecs: the float entries, sorted by name
        x = layout.flatten(payload)                       # float32 vector of layout.numel elements
        again = layout.unflatten(x)                       # the original names, shapes and dtypes

    Attributes:
        names: entry names, in layout order.
        shapes: each entry's shape.
        offsets: each entry's start in the flat vector.
        numel: length of the flat vector.
        dtype: dtype of the flat vector.
        entry_dtypes: each entry's own dtype where it differs from the flat vector's (codec layouts: a float16
            entry travels in a float32 vector); ``None``: every entry has ``dtype``.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int
    dtype: torch.dtype = torch.float32
    entry_dtypes: tuple[torch.dtype, ...] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, names: Sequence[str], shapes: Sequence[tuple[int, ...]],
              entry_dtypes: Sequence[torch.dtype] | None = None, dtype: torch.dtype = torch.float32) -> FlatSpec:
        """The layout of entries ``names`` with ``shapes`` placed back to back in that order."""
        offsets, n = [], 0
        for s in shapes:
            offsets.append(n)
            n += _numel(tuple(s))
        return cls(tuple(names), tuple(tuple(s) for s in shapes), tuple(offsets), n, dtype,
                   None if entry_dtypes is None else tuple(entry_dtypes))

    @classmethod
    def from_payload(cls, payload: Payload, dtype: torch.dtype = torch.float32) -> FlatSpec:
        """Layout for ``payload``'s entries in their iteration order, in a buffer of ``dtype``."""
        return cls.build(list(payload), [tuple(v.shape) for v in payload.values()], None, dtype)

    @classmethod
    def from_floats(cls, payload: Payload) -> tuple[FlatSpec, Payload]:
        """The codec layout of ``payload``'s float entries (sorted by name, in a float32 vector, each entry
        keeping its own dtype) and the payload's other (non-float) entries.

        Raises:
            ValueError: a float entry's dtype is not one a layout can hold (see ``DTYPES``).
        """
        floats = sorted(k for k, v in payload.items() if v.is_floating_point())
        for k in floats:
            if payload[k].dtype not in _DTYPE_NAMES:
                raise ValueError(f"payload entry {k!r} has unsupported dtype {payload[k].dtype}")
        layout = cls.build(floats, [tuple(payload[k].shape) for k in floats], [payload[k].dtype for k in floats])
        extras = {k: v for k, v in payload.items() if not v.is_floating_point()}
        return layout, extras

    @classmethod
    def from_spec(cls, spec: PayloadSpec) -> FlatSpec:
        """The codec layout (see :meth:`from_floats`) a payload matching ``spec`` has.

        Raises:
            MalformedMessage: the spec has variable (``-1``) dimensions or optional float entries, so the
                layout cannot be known in advance (encode with ``self_describing=True``).
        """
        floats = sorted(k for k, v in spec.items() if v.dtype.is_floating_point)
        for k in floats:
            if spec[k].optional or any(d < 0 for d in spec[k].shape) or spec[k].dtype not in _DTYPE_NAMES:
                raise _malformed(
                    f"the expected entry {k!r} has a variable shape or is optional: the layout cannot be derived "
                    "from the spec; the sender must encode with self_describing=True"
                )
        return cls.build(floats, [tuple(spec[k].shape) for k in floats], [spec[k].dtype for k in floats])

    # ------------------------------------------------------------------ derived
    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        """Each entry's own dtype."""
        return self.entry_dtypes if self.entry_dtypes is not None else (self.dtype,) * len(self.names)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Elements of each entry."""
        return tuple(_numel(s) for s in self.shapes)

    def key(self) -> str:
        """A canonical text of a codec layout (hashed into the frame fingerprint)."""
        return ";".join(
            f"{n}:{_DTYPE_NAMES[d]}:{','.join(map(str, s))}" for n, s, d in zip(self.names, self.shapes, self.dtypes)
        )

    def tensor_specs(self) -> dict[str, TensorSpec]:
        """Per-entry shape and dtype, for reply validation."""
        from lightning_fed.protocol import TensorSpec

        return {k: TensorSpec(s, d) for k, s, d in zip(self.names, self.shapes, self.dtypes)}

    # ------------------------------------------------------------------ buffers
    def empty(self) -> Tensor:
        """A new uninitialised flat buffer."""
        return torch.empty(self.numel, dtype=self.dtype)

    def flatten(self, payload: Payload, out: Tensor | None = None) -> Tensor:
        """Copy ``payload``'s entries, in layout order, into one flat buffer (``out`` if given, else a new one of
        ``dtype``)."""
        out = self.empty() if out is None else out
        for name, off, size in zip(self.names, self.offsets, self.sizes):
            out[off : off + size].copy_(payload[name].detach().reshape(-1))
        return out

    def flat_view(self, payload: Payload) -> Tensor | None:
        """``payload`` as one flat vector without copying: a view when its entries already tile one buffer in
        this layout's order and dtype (e.g. a message decoded by :class:`~lightning_fed.codecs.Identity`), else
        ``None``. Read it, do not write it: the view shares the payload's memory."""
        if tuple(payload) != self.names:
            return None
        span = contiguous_span(list(payload.values()))
        if span is not None and span.dtype == self.dtype and span.numel() == self.numel:
            return span
        return None

    def as_flat(self, payload: Payload, out: Tensor | None = None) -> Tensor:
        """``payload`` as one flat buffer: :meth:`flat_view` when it is one already, else :meth:`flatten` into
        ``out``. Read it, do not write it: the view shares the payload's memory."""
        span = self.flat_view(payload)
        return span if span is not None else self.flatten(payload, out)

    def unflatten(self, flat: Tensor) -> Payload:
        """Entries shaped like the originals: views of ``flat`` (no copy), except entries whose own dtype differs
        from the layout's ``dtype`` (codec layouts), which are converted back to it."""
        out = {}
        for name, off, size, shape, dtype in zip(self.names, self.offsets, self.sizes, self.shapes, self.dtypes):
            t = flat[off : off + size].view(shape)
            out[name] = t if dtype == self.dtype else t.to(dtype)
        return out

    # ------------------------------------------------------------------ the self-describing section
    def to_bytes(self) -> bytes:
        """Compact JSON ``[[name, dtype, [dims...]], ...]`` of a codec layout (the self-describing section)."""
        rows = [[n, _DTYPE_NAMES[d], list(s)] for n, s, d in zip(self.names, self.shapes, self.dtypes)]
        return json.dumps(rows, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> FlatSpec:
        """Parse and validate :meth:`to_bytes` (untrusted input).

        Raises:
            MalformedMessage: not a valid layout: bad JSON or fields, names not sorted and unique, or more than
                ``MAX_NUMEL`` elements.
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
            raise _malformed("layout section is not a valid list of [name, dtype, shape]") from None
        if names != sorted(set(names)):
            raise _malformed("layout section names are not sorted and unique")
        layout = cls.build(names, shapes, dtypes)
        if layout.numel > MAX_NUMEL:
            raise _malformed(f"layout declares {layout.numel} elements, more than {MAX_NUMEL}")
        return layout
