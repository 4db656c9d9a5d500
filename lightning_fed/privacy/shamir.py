"""Shamir secret sharing over a prime field (Shamir, "How to Share a Secret", CACM 1979).

A secret of up to 64 bytes is an element of GF(p) for the Mersenne prime ``p = 2**521 - 1``; a random polynomial
of degree ``t - 1`` with the secret as constant term is evaluated at the holders' points ``x = 1, 2, ...``; any
``t`` shares give the secret back by Lagrange interpolation at 0, fewer reveal nothing about it. Written here
(some forty lines of Python integers) rather than taken from PyPI: the maintained Shamir packages there are tied to
one wallet format or are unmaintained, and this is the field arithmetic the protocol needs, nothing more.
Coefficients come from :mod:`secrets` unless a seeded ``random.Random`` is given (simulation and tests).
"""

from __future__ import annotations

import random
import secrets as _secrets

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8): one field element on the wire
MAX_SECRET_BYTES = 64


def split(
    secret: bytes, threshold: int, points: list[int], rng: random.Random | None = None
) -> dict[int, int]:
    """Shares of ``secret`` for the holders at ``points`` (distinct integers in ``[1, p)``); any ``threshold`` of
    them reconstruct it. ``rng``: a seeded source for the coefficients (default: the OS's CSPRNG)."""
    if not 1 <= threshold <= len(points):
        raise ValueError(
            f"threshold={threshold} is not allowed; it must be between 1 and the {len(points)} holders"
        )
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(
            f"a secret of {len(secret)} bytes does not fit the field; at most {MAX_SECRET_BYTES}"
        )
    if len(set(points)) != len(points) or not all(0 < x < PRIME for x in points):
        raise ValueError("share points must be distinct and in [1, p)")
    draw = rng.randrange if rng is not None else _secrets.randbelow
    coeffs = [int.from_bytes(secret, "big")] + [draw(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in points:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def combine(shares: dict[int, int], threshold: int, length: int) -> bytes:
    """The ``length``-byte secret from at least ``threshold`` shares (``{x: y}``); ``ValueError`` with fewer."""
    if len(shares) < threshold:
        raise ValueError(
            f"{len(shares)} shares cannot reconstruct a secret shared with threshold {threshold}"
        )
    pts = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * length):
        raise ValueError("the shares do not combine to a secret of the expected length (inconsistent shares)")
    return secret.to_bytes(length, "big")


def to_bytes(y: int) -> bytes:
    """One share value on the wire (:data:`SHARE_BYTES` bytes)."""
    return y.to_bytes(SHARE_BYTES, "big")


def from_bytes(data: bytes) -> int:
    """Read a share value; ``ValueError`` unless it is a field element."""
    y = int.from_bytes(data, "big")
    if len(data) != SHARE_BYTES or y >= PRIME:
        raise ValueError("not a share value")
    return y


__all__ = ["MAX_SECRET_BYTES", "PRIME", "SHARE_BYTES", "combine", "from_bytes", "split", "to_bytes"]
