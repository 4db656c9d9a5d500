"""The one seed-derivation scheme: derive_seed and the generator built on it."""

from __future__ import annotations

import torch

from lightning_fed.seeding import Stream, derive_seed, generator


def test_generator_is_keyed_by_its_parts_only():
    a = torch.randperm(50, generator=generator(0, Stream.FEDMD_SUBSET, 3))
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(a, torch.randperm(50, generator=generator(0, Stream.FEDMD_SUBSET, 3)))
    assert generator(7, Stream.FEDDF_PROXY, 2).initial_seed() == derive_seed(7, int(Stream.FEDDF_PROXY), 2)


def test_streams_and_keys_do_not_share_numbers():
    seeds = {generator(0, tag, r).initial_seed() for tag in Stream for r in range(5)}
    assert len(seeds) == len(Stream) * 5
    assert len({int(t) for t in Stream}) == len(Stream.__members__)  # tags are unique (no alias: @unique)
    # the old polynomial scheme mapped (seed=1, round=0) and (seed=0, round=1_000_003) to one seed
    assert derive_seed(1, 0) != derive_seed(0, 1_000_003)


def test_no_stream_is_drawn_without_a_key():
    """A key-less ``generator(seed, Stream.X)`` is round X's client-sample seed (the sampler's untagged
    ``(seed, round)``): the fixed malicious set once was, and round 13 sampled every malicious client. Only the
    clean-record split of the server-side defences is key-less (a permutation of records, not of clients)."""
    import re
    from pathlib import Path

    import lightning_fed

    keyless = re.compile(r"generator\(\s*[\w.]+\s*,\s*[\w.]+\s*\)")
    found = {
        p.relative_to(Path(lightning_fed.__file__).parent).as_posix()
        for p in Path(lightning_fed.__file__).parent.rglob("*.py")
        if any(m for m in keyless.findall(p.read_text()) if "Stream" in m or "stream" in m)
    }
    assert found == {"callbacks/_defence.py"}
