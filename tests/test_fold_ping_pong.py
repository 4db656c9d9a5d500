"""The fold's ping-pong accumulator for small replies (``MeanFold(ping_pong=True)``): ``acc + w * x`` is written
into the other buffer while the reply is measured, one read of the reply; a kept reply swaps the buffers, a
rejected one leaves the sum as it was. The weights are those of the judge-first path and of the pass-then-undo
path, bit for bit, whichever buffer the sum ends in; a fold mixing small replies and 8-bit codes undoes exactly
on either small-reply path."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import seeded
from test_server_fold import COUNTS, _deltas, _strategy, kernel  # noqa: F401  (the kernel fixture)

from lightning_fed.codecs import Blockwise8bit, DecodeArgs
from lightning_fed.protocol import RELEASED, Reply
from lightning_fed.strategies import FedAvg
from lightning_fed.strategies.aggregate import MeanFold

MODES = ["ping_pong", "judge_first", "undo"]
BAD = {  # position -> what is wrong with that reply (6 replies)
    "none": {},
    "norm_middle": {2: "norm"},
    "norm_and_nan_middle": {2: "norm", 3: "nan"},
    "nan_last": {5: "nan"},
    "norm_and_nan_last": {4: "norm", 5: "nan"},
}


def _replies(spec, bad: dict[int, str], several: bool = False) -> list[Reply]:
    """Six replies of random deltas, some scaled (a norm rejection) or with a NaN; ``several``: every other
    reply's entries in separate tensors (not one buffer: the ``foreach`` path)."""
    replies = []
    for i, d in enumerate(_deltas(spec, 6, seed=11)):
        if bad.get(i) == "norm":
            d.mul_(1e6)
        elif bad.get(i) == "nan":
            d[i * 17] = math.nan
        payload = spec.unflatten(d)
        if several and i % 2:
            payload = {k: v.clone() for k, v in payload.items()}
        replies.append(Reply(i, payload, COUNTS[i], {}, 1))
    return replies


def _fold(mode: str, spec, replies: list[Reply], max_abs: float | None, monkeypatch) -> tuple:
    """Fold ``replies`` with ``mode``; ``(result, verdicts, kept replies, the sum was in the given buffer)``."""
    acc, scratch = torch.full((spec.numel,), 3.0), torch.full((spec.numel,), 5.0)
    small = 0 if mode == "undo" else 1 << 30
    fold = MeanFold(
        spec, acc, sum(COUNTS), scratch=scratch, judge_first_bytes=small, ping_pong=mode == "ping_pong"
    )
    with monkeypatch.context() as m:
        if mode != "undo":
            m.setattr(MeanFold, "_undo", lambda self: pytest.fail("a small reply was undone"))
        verdicts = [fold.add_released(r, None, max_abs, 1.0) for r in replies]
    fold.flush()
    kept = [r for r, (why, _) in zip(replies, verdicts, strict=True) if why is None]
    assert all(r.payload is RELEASED for r in kept) and fold.covers(kept)
    at_home = fold._acc is acc
    out = fold.result()
    assert out is acc  # the sum ends in the buffer the fold was given
    return out.clone(), verdicts, kept, at_home


def _expected(spec, bad: dict[int, str]) -> torch.Tensor:
    """The kept replies added one by one with ``add_`` (``n / total``), rescaled once by ``total / kept``."""
    total, want, kept = sum(COUNTS), torch.zeros(spec.numel), 0
    for i, d in enumerate(_deltas(spec, 6, seed=11)):
        if i not in bad:
            want.add_(d, alpha=COUNTS[i] / float(total))
            kept += COUNTS[i]
    return want.mul_(total / kept) if kept != total else want


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("max_abs", [None, 1e6], ids=["no_bound", "bound"])
@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
def test_ping_pong_is_the_judge_first_and_the_undo_paths_bit_for_bit(bad, max_abs, monkeypatch):
    spec = _strategy().spec
    assert spec is not None
    runs = {mode: _fold(mode, spec, _replies(spec, BAD[bad]), max_abs, monkeypatch) for mode in MODES}
    want = _expected(spec, BAD[bad])
    kept = 6 - len(BAD[bad])
    for mode, (out, verdicts, kept_replies, _) in runs.items():
        assert torch.equal(out, want), mode
        assert [why for why, _ in verdicts] == [
            {"norm": "norm", "nan": "values"}.get(BAD[bad].get(i)) for i in range(6)
        ], mode
        assert len(kept_replies) == kept
    ping = runs["ping_pong"][1]
    for other, rel in (("judge_first", 1e-6), ("undo", 0)):  # the measure of a reply judged first sums in float64
        for (_, a), (_, b) in zip(ping, runs[other][1], strict=True):
            assert a == pytest.approx(b, rel=rel, abs=0) or (math.isinf(a) and math.isinf(b))
    assert runs["ping_pong"][3] == (kept % 2 == 0)  # an odd number of kept replies leaves the sum aside
    assert runs["judge_first"][3] and runs["undo"][3]


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("bad", ["none", "norm_middle", "nan_last"])
def test_replies_in_several_buffers_fall_back_to_the_foreach_path(bad, monkeypatch):
    """Every other reply's entries lie in separate tensors: those are judged first and added entry by entry
    into the views of whichever buffer holds the sum; the others go through the ping-pong pass."""
    spec = _strategy().spec
    assert spec is not None
    asides = []
    original = MeanFold._add_aside

    def counted(self, *a):
        verdict = original(self, *a)
        asides.append(verdict is not None)
        return verdict

    monkeypatch.setattr(MeanFold, "_add_aside", counted)
    out, verdicts, _, _ = _fold("ping_pong", spec, _replies(spec, BAD[bad], several=True), None, monkeypatch)
    assert asides == [True, False] * 3
    assert torch.equal(out, _expected(spec, BAD[bad]))
    undo, undo_verdicts, _, _ = _fold("undo", spec, _replies(spec, BAD[bad], several=True), None, monkeypatch)
    assert torch.equal(out, undo) and [v[0] for v in verdicts] == [v[0] for v in undo_verdicts]


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("ping_pong", [True, False], ids=["ping_pong", "judge_first"])
def test_a_fold_mixing_small_float32_replies_and_int8_codes_undoes_exactly(ping_pong):
    """Small float32 replies (judged first: added aside, or added after their measure) and 8-bit codes (added,
    measured, undone on rejection) in one fold: the snapshot an undo restores holds the small replies added
    before it, so a rejected 8-bit reply after them takes out only itself; the weights are the pass-then-undo
    path's for the same replies (``checked=False``) and the checked pass's (the default for float32 replies,
    which lets the window go and has the snapshot retaken likewise)."""
    spec = _strategy().spec
    assert spec is not None
    codec, rspec = Blockwise8bit(), spec.tensor_specs()
    deltas = _deltas(spec, 6, seed=11)
    deltas[2].mul_(1e6)  # an 8-bit reply rejected for its norm after a reply added aside
    deltas[5].mul_(1e6)  # and one after a float32 reply while the window holds an 8-bit one
    int8 = {1, 2, 4, 5}

    def fold(small: int, checked: bool = True) -> tuple[torch.Tensor, list[str | None]]:
        acc = torch.empty(spec.numel)
        scratch = torch.empty(spec.numel)
        fold = MeanFold(spec, acc, sum(COUNTS), scratch=scratch, judge_first_bytes=small, ping_pong=ping_pong,
                        checked=checked)
        whys = []
        for i, d in enumerate(deltas):
            if i in int8:
                message = codec.encode(spec.unflatten(d.clone()), {})
                values = codec.decode_deferred(message, {}, DecodeArgs(sender=i, spec=rspec))
                assert values is not None and not values.judge_first
                whys.append(fold.add_released(Reply(i, {}, COUNTS[i], {}, 1), values, None, 1.0)[0])
            else:
                whys.append(
                    fold.add_released(Reply(i, spec.unflatten(d.clone()), COUNTS[i], {}, 1), None, None, 1.0)[
                        0
                    ]
                )
        fold.flush()
        assert fold.result() is acc
        return acc, whys

    mixed, whys = fold(1 << 30)
    assert whys == [None, None, "norm", None, None, "norm"]
    undo, undo_whys = fold(0, checked=False)
    assert torch.equal(mixed, undo) and whys == undo_whys
    checked, checked_whys = fold(0)
    assert torch.equal(checked, undo) and checked_whys == undo_whys
    assert mixed.abs().max() < 1  # the scaled replies never reached the sum


def test_fedavg_folds_aside_into_its_scratch_buffer(monkeypatch):
    """FedAvg's fold uses the strategy's scratch buffer as the other buffer (no allocation) and leaves the sum
    in the strategy's accumulator."""
    s = _strategy()
    assert s.spec is not None and s._acc is not None and s._tmp is not None
    fold = s.begin_fold(1, sum(COUNTS[:3]))
    assert fold is not None and not fold.judge_first and not fold.ping_pong  # off by default
    fold.judge_first = fold.ping_pong = True
    replies = _replies(s.spec, {})[:3]
    for r in replies:
        assert fold.add_released(r, None, None, math.inf)[0] is None
    assert fold._acc is s._tmp  # three kept: the sum lies aside
    assert fold._snap is s._tmp and fold.result() is s._acc
    want = torch.zeros(s.spec.numel)
    for i, d in enumerate(_deltas(s.spec, 3, seed=11)):
        want.add_(d, alpha=COUNTS[i] / float(sum(COUNTS[:3])))
    assert torch.equal(s._acc, want)


def test_a_resumed_run_folding_aside_ends_bit_identical(tmp_path, make_loop, small_dm, monkeypatch):
    """A run stopped after round 2 and resumed ends with the weights of one run straight through, the ping-pong
    pass folding every reply from the second round (the norm check's reference, checkpointed)."""
    from safetensors.torch import load_file

    from lightning_fed.models import MNIST1DMLP

    kept = []
    original = MeanFold._add_aside

    def aside(self, *a):
        verdict = original(self, *a)
        kept.append(verdict is not None and verdict[0] is None)
        return verdict

    monkeypatch.setattr(MeanFold, "_add_aside", aside)
    begin = FedAvg.begin_fold

    def begin_fold(self, *a):
        fold = begin(self, *a)
        if fold is not None:
            fold.judge_first = fold.ping_pong = True
        return fold

    monkeypatch.setattr(FedAvg, "begin_fold", begin_fold)
    three = {"clients_per_round": 3}  # a median of three replies: the next round's reference
    whole = make_loop(rounds=3, output_dir=str(tmp_path / "whole"), **three).fit(seeded(MNIST1DMLP), small_dm)
    assert kept == [True] * 6  # rounds 2 and 3: every reply folded by the ping-pong pass
    cut = str(tmp_path / "cut")
    first = make_loop(rounds=2, checkpoint_every=1, output_dir=cut, **three).fit(seeded(MNIST1DMLP), small_dm)
    resumed = make_loop(rounds=3, checkpoint_every=1, output_dir=cut, **three).fit(
        seeded(MNIST1DMLP), small_dm, resume="last"
    )
    assert kept == [True] * 12
    assert resumed.run_dir == first.run_dir
    a = load_file(whole.run_dir / "final.safetensors")
    b = load_file(resumed.run_dir / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
