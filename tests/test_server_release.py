"""The server lets go of folded replies: from the second round the norm check judges a reply against the previous
round's median before its fold, so an accepted reply's payload is released once added and the server holds the
accumulator and the reply being decoded, not every reply."""

from __future__ import annotations

import inspect
import math
import weakref
from types import SimpleNamespace

import pytest
import torch
from conftest import seeded
from test_server_fold import COUNTS, _deltas, _messages, _reference, _strategy

from lightning_fed import codecs
from lightning_fed.callbacks.sparsity import SparseUplink
from lightning_fed.codecs import Blockwise8bit, Cast, Codec, DecodeArgs, Identity, TimeCorrelatedTopK
from lightning_fed.models import MNIST1DCNN
from lightning_fed.protocol import RELEASED, ClientMessage
from lightning_fed.server import Server
from lightning_fed.store import ClientStore
from lightning_fed.strategies import FedAvg, aggregate
from lightning_fed.strategies.aggregate import SMALL_BYTES, SMALL_HOLD_BYTES, MeanFold

_BEGIN_FOLD = FedAvg.begin_fold  # the strategy's own, before any test patches it


def _on_path(path: str, monkeypatch, piece: int) -> None:
    """Run the fold's kernels on ``path`` ("numba", skipped when numba is missing, or "torch", over pieces of
    ``piece`` values)."""
    from lightning_fed import kernels

    if path == "numba" and not kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed (the `fast` extra)")
    monkeypatch.setattr(kernels, "NUMBA", path == "numba")
    monkeypatch.setattr(kernels, "PIECE", piece)


def _folds_with(monkeypatch, **attrs) -> list[MeanFold]:
    """Make every fold FedAvg opens take ``attrs`` (set on it once opened); return the list the folds go into."""
    folds: list[MeanFold] = []

    def begin_fold(self, *a, **k):
        fold = _BEGIN_FOLD(self, *a, **k)
        for name, value in attrs.items():
            setattr(fold, name, value)
        folds.append(fold)
        return fold

    monkeypatch.setattr(FedAvg, "begin_fold", begin_fold)
    return folds


def _server(s: FedAvg, codec: Codec, tmp_path, **kw) -> Server:
    return Server(
        s, codec, ClientStore(tmp_path / "senders"), max_norm_ratio=kw.pop("max_norm_ratio", 10.0), **kw
    )


def _two_rounds(s: FedAvg, codec: Codec, server: Server, second: list[torch.Tensor]):
    """Round 0 with 4 honest replies (held: no reference yet), then round 1 with ``second``."""
    assert s.spec is not None
    first = server.collect(
        0, s.configure_round(0, list(range(4))), _messages(codec, s.spec, _deltas(s.spec, 4))
    )
    assert all(r.payload is not RELEASED for r in first.replies)  # no reference in the first round
    server.aggregate(0, first.replies)
    messages = _messages(codec, s.spec, second)
    return messages, [bytes(m.message) for m in messages]


@pytest.mark.parametrize("make_codec", [Identity, Blockwise8bit], ids=["identity", "int8"])
def test_replies_with_a_reference_are_released_and_the_result_is_unchanged(make_codec, tmp_path):
    s, codec = _strategy(), make_codec()
    server = _server(s, codec, tmp_path)
    assert s.spec is not None
    messages, raw = _two_rounds(s, codec, server, _deltas(s.spec, 6, seed=5))
    assert len(server.reference) == 1
    want = _reference(s, codec, [ClientMessage(i, m, COUNTS[i]) for i, m in enumerate(raw)], list(range(6)))
    got = server.collect(1, s.configure_round(1, list(range(6))), messages)
    assert [r.client_id for r in got.replies] == list(range(6))
    assert all(r.payload is RELEASED for r in got.replies)
    assert [r.num_examples for r in got.replies] == COUNTS
    with pytest.raises(RuntimeError, match="released"):
        got.replies[0].payload["0.weight"]
    server.aggregate(1, got.replies)
    assert torch.equal(s.global_flat, want)  # bit-identical to decoding, flattening and summing copies
    assert 0 < got.stats["norm_ratio_prev"] < 10


def test_a_scaled_reply_is_rejected_and_the_rest_rescaled(tmp_path):
    s, codec = _strategy(), Identity()
    server = _server(s, codec, tmp_path)
    assert s.spec is not None
    second = _deltas(s.spec, 5, seed=5)
    second[2].mul_(1e6)
    messages, raw = _two_rounds(s, codec, server, second)
    kept = [0, 1, 3, 4]
    exact = _reference(s, codec, [ClientMessage(i, m, COUNTS[i]) for i, m in enumerate(raw)], kept)
    got = server.collect(1, s.configure_round(1, list(range(5))), messages)
    assert [r.client_id for r in got.replies] == kept
    assert got.stats["rejected"] == 1
    assert "client 2 rejected: its norm" in got.reasons[0] and "previous round's median" in got.reasons[0]
    server.aggregate(1, got.replies)
    assert (
        s.global_flat is not None and s.global_flat.abs().max() < 1
    )  # the scaled reply never touched the sum
    assert torch.allclose(s.global_flat, exact, rtol=1e-6, atol=1e-8)


class Summing(Identity):
    """Identity whose server half sums the accepted payloads (as TCS does for its next mask)."""

    reads_accepted = True

    def accept(self, server_round, payloads):
        self.sums = [float(sum(v.sum() for v in p.values())) for p in payloads]


def test_a_codec_that_reads_accepted_payloads_keeps_them(tmp_path):
    s, codec = _strategy(), Summing()
    server = _server(s, codec, tmp_path)
    assert s.spec is not None
    messages, _ = _two_rounds(s, codec, server, _deltas(s.spec, 4, seed=5))
    got = server.collect(1, s.configure_round(1, list(range(4))), messages)
    assert len(got.replies) == 4 and all(r.payload is not RELEASED for r in got.replies)
    server.aggregate(1, got.replies)
    assert len(codec.sums) == 4


def test_every_codec_that_reads_accepted_payloads_says_so():
    """A codec overriding ``accept`` declares ``reads_accepted`` in its own class (or forwards it)."""
    classes = {c for _, c in inspect.getmembers(codecs, inspect.isclass) if issubclass(c, Codec)} | {
        SparseUplink
    }
    overriding = [c for c in classes if "accept" in vars(c)]
    assert TimeCorrelatedTopK in overriding and SparseUplink in overriding
    assert all("reads_accepted" in vars(c) for c in overriding)
    assert TimeCorrelatedTopK.reads_accepted and not Identity.reads_accepted
    assert (
        SparseUplink(Identity()).reads_accepted is False
        and SparseUplink(TimeCorrelatedTopK(0.5)).reads_accepted
    )


def test_streamed_round_holds_one_decoded_reply_at_a_time(tmp_path):
    """Messages made one at a time: when the next is made, every earlier decoded reply is gone."""
    s, codec = _strategy(), Identity()
    server = _server(s, codec, tmp_path)
    assert s.spec is not None
    _two_rounds(s, codec, server, [])
    alive: list[weakref.ref] = []
    decode = codec.decode

    def tracked(message, state, args=DecodeArgs()):
        payload = decode(message, state, args)
        alive.append(weakref.ref(next(iter(payload.values()))))
        return payload

    codec.decode = tracked  # type: ignore[method-assign]
    deltas = _deltas(s.spec, 6, seed=5)
    seen = []

    def stream():
        for i, d in enumerate(deltas):
            seen.append(sum(ref() is not None for ref in alive))
            yield ClientMessage(i, codec.encode(s.spec.unflatten(d), {}), COUNTS[i])

    got = server.collect(1, s.configure_round(1, list(range(6))), stream(), total_examples=sum(COUNTS))
    assert len(got.replies) == 6 and seen == [0] * 6


def test_the_server_lets_go_of_each_message_before_it_reads_the_next(tmp_path):
    """Messages read one at a time (a generator): when the next is made, the server holds none of the earlier
    ones, so a large message can be made in the memory the last one leaves."""
    s, codec = _strategy(), Identity()
    server = _server(s, codec, tmp_path)
    assert s.spec is not None
    _two_rounds(s, codec, server, [])
    refs: list[weakref.ref] = []
    seen = []

    def stream():
        for i, d in enumerate(_deltas(s.spec, 6, seed=5)):
            seen.append(sum(ref() is not None for ref in refs))
            msg = ClientMessage(i, codec.encode(s.spec.unflatten(d), {}), COUNTS[i])
            refs.append(weakref.ref(msg))
            yield msg
            del msg

    got = server.collect(1, s.configure_round(1, list(range(6))), stream(), total_examples=sum(COUNTS))
    assert len(got.replies) == 6 and seen == [0] * 6


def test_the_reference_is_checkpointed(tmp_path):
    s, codec = _strategy(), Identity()
    server = _server(s, codec, tmp_path)
    assert s.spec is not None
    _two_rounds(s, codec, server, [])
    state = server.state_dict()
    fresh = _server(s, codec, tmp_path / "b")
    assert fresh.reference == {}
    fresh.load_state_dict(state)
    assert fresh.reference == server.reference and len(fresh.reference) == 1
    (median,) = fresh.reference.values()
    assert median > 0


def test_the_loop_releases_from_the_second_round_and_rejects_the_hostile_reply(
    make_loop, small_dm, monkeypatch
):
    """FedLoop streams the messages to the server; from round 2 the folded replies come back released, and a
    1e6-scaled reply is rejected in every round (round 1 by its round's median, later by the previous one's)."""
    from test_safe_defaults import Hostile

    kinds, fed = [], []
    original = Server.collect

    def collect(self, server_round, instructions, messages, total_examples=None):
        fed.append(type(messages).__name__)
        got = original(self, server_round, instructions, messages, total_examples)
        kinds.append([r.payload is RELEASED for r in got.replies])
        return got

    monkeypatch.setattr(Server, "collect", collect)
    loop = make_loop(num_clients=5, clients_per_round=5, rounds=3, callbacks=[Hostile(scale=1e6, claim=1)])
    result = loop.fit(seeded(MNIST1DCNN), small_dm)
    assert fed == ["generator"] * 3
    assert [h["rejected"] for h in result.history] == [1, 1, 1]
    assert kinds == [[False] * 4, [True] * 4, [True] * 4]
    assert all(0 < h["norm_ratio_prev"] < 10 for h in result.history[1:])


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        ([], "checked block by block"),
        (["--replay-undo"], "added and measured in one pass"),
        (["--judge-first"], "measured, judged, then added"),
        (["--judge-first", "--ping-pong"], "ping-pong"),
        (["--drop-at-once", "--hold-mb", "0.01"], "dropped at once"),
    ],
    ids=["default", "replay_undo", "judge_first", "ping_pong", "drop_at_once"],
)
def test_aggregation_benchmark_times_released_rows(flags, says, capsys, monkeypatch):
    """The benchmark's timed round releases its replies: nothing held but the accumulator, no row skipped; each
    option sets the fold it names."""
    from conftest import load_benchmark

    bench = load_benchmark("aggregation")
    folds = _folds_with(monkeypatch)
    bench.main(["--replies", "5", "--params", "1e3", "--repeat", "1", "--max-held-gb", "0", *flags])
    out = capsys.readouterr().out
    assert says in out
    fold = folds[-1]
    assert fold.judge_first == ("--judge-first" in flags) and fold.ping_pong == ("--ping-pong" in flags)
    assert fold.lazy == ("--drop-at-once" not in flags) and fold.checked == ("--replay-undo" not in flags)
    rows = [line for line in out.splitlines() if line.startswith(("| identity |", "| int8 |"))]
    assert len(rows) == 2 and all("skipped" not in r for r in rows)
    assert all(r.split("|")[8].strip() == "0" for r in rows)  # held MiB: the 4 KB accumulator only


@pytest.mark.parametrize("make_codec", [Identity, Blockwise8bit], ids=["identity", "int8"])
def test_a_reply_whose_squares_pass_float32_range_is_judged_on_its_true_norm(make_codec, tmp_path):
    """Finite values whose squares pass float32's range (the pass sums float32 squares) are summed again in
    float64: the reply is rejected for its norm, with that norm, not for its values."""
    s, codec = _strategy(), make_codec()
    server = _server(s, codec, tmp_path)
    assert s.spec is not None
    second = _deltas(s.spec, 4, seed=5)
    second[2].mul_(1e22)  # values about 1e20: squares about 1e40
    messages, _ = _two_rounds(s, codec, server, second)
    got = server.collect(1, s.configure_round(1, list(range(4))), messages)
    assert [r.client_id for r in got.replies] == [0, 1, 3]
    (reason,) = got.reasons
    norm = float(reason.split("its norm ")[1].split()[0])
    assert math.isfinite(norm) and norm == pytest.approx(float(second[2].double().norm()), rel=0.02)


@pytest.mark.parametrize("path", ["numba", "torch"])
def test_int8_replies_are_folded_from_their_codes(path, tmp_path, monkeypatch):
    """With a reference, an 8-bit reply is measured and added straight from its codes (never decoded into a
    float32 buffer), bit-identical to decoding it and adding the copy; a reply over ``max_update_abs`` is decoded
    only to name its entry, and rejected before it touches the sum."""
    _on_path(path, monkeypatch, 300)  # several pieces, not whole blocks of the codec's layout
    s, codec = _strategy(), Blockwise8bit(blocksize=64)
    server = _server(s, codec, tmp_path, max_update_abs=0.5)
    assert s.spec is not None
    second = _deltas(s.spec, 5, seed=5)
    second[3][17] = 0.9  # over max_update_abs
    messages, raw = _two_rounds(s, codec, server, second)
    kept = [0, 1, 2, 4]
    total = sum(COUNTS[:5])
    rescaled = _rescaled_from(s, codec, raw, kept, total)
    decoded = []
    decode = codec.decode
    monkeypatch.setattr(codec, "decode", lambda *a, **k: decoded.append(1) or decode(*a, **k))
    got = server.collect(1, s.configure_round(1, list(range(5))), messages)
    assert [r.client_id for r in got.replies] == kept and all(r.payload is RELEASED for r in got.replies)
    assert decoded == []
    assert "client 3 rejected" in got.reasons[0] and "max_abs" in got.reasons[0]
    server.aggregate(1, got.replies)
    assert torch.equal(s.global_flat, rescaled)


def _rescaled_from(s: FedAvg, codec: Codec, raw: list[bytes], keep: list[int], total: int) -> torch.Tensor:
    """Decode each kept message, add its flat copy with ``n / total``, rescale once by ``total / kept``, step."""
    spec = s.spec
    assert spec is not None and s.global_flat is not None
    acc = torch.zeros(spec.numel)
    for i in keep:
        payload = codec.decode(raw[i], {}, DecodeArgs(sender=i, spec=spec.tensor_specs()))
        acc.add_(spec.flatten(payload), alpha=COUNTS[i] / float(total))
    acc.mul_(total / sum(COUNTS[i] for i in keep))
    return s.global_flat.clone().add_(acc)


def _hostile_messages(s: FedAvg, codec: Codec) -> list[ClientMessage]:
    """Six messages of the second round: well-formed ones around a missing entry, a float64 entry, a truncated
    body, a NaN, an extra metadata key and a wrong shape."""
    from lightning_fed.codecs.wire import pack

    assert s.spec is not None
    deltas = _deltas(s.spec, 8, seed=9)
    payloads = [s.spec.unflatten(d) for d in deltas]
    msgs = [ClientMessage(i, codec.encode(p, {}), COUNTS[i % 6]) for i, p in enumerate(payloads)]
    name = s.spec.names[0]
    missing = {k: v for k, v in payloads[1].items() if k != name}
    msgs[1] = ClientMessage(1, codec.encode(missing, {}), COUNTS[1])
    msgs[2] = ClientMessage(2, codec.encode({**payloads[2], name: payloads[2][name].double()}, {}), COUNTS[2])
    msgs[3] = ClientMessage(3, msgs[3].message[:-4], COUNTS[3])
    bad = {k: v.clone() for k, v in payloads[4].items()}
    bad[name].view(-1)[3] = float("nan")
    msgs[4] = ClientMessage(4, codec.encode(bad, {}), COUNTS[4])
    msgs[5] = ClientMessage(5, pack(payloads[5], {"codec": "identity", "x": "1"}), COUNTS[5])
    msgs[6] = ClientMessage(
        6, codec.encode({**payloads[6], name: payloads[6][name].reshape(-1)}, {}), COUNTS[0]
    )
    return msgs


def test_identity_fast_path_rejects_as_the_full_decode(tmp_path, monkeypatch):
    """Messages of the known layout are read as one flat view (no parsing, no split); every other message is
    decoded in full and rejected with the same reasons as on the held path."""
    from lightning_fed.codecs import wire

    results = []
    for release in (False, True):
        s, codec = _strategy(), Identity()
        server = _server(s, codec, tmp_path / str(release), release=release)
        _two_rounds(s, codec, server, [])
        unpacked: list[int] = []

        def counted(*a, _seen=unpacked, **k):
            _seen.append(1)
            return wire.unpack(*a, **k)

        monkeypatch.setattr("lightning_fed.codecs.base.unpack", counted)
        got = server.collect(1, s.configure_round(1, list(range(8))), _hostile_messages(s, codec))
        monkeypatch.undo()
        results.append((got.reasons, [r.client_id for r in got.replies], len(unpacked)))
        assert all((r.payload is RELEASED) == release for r in got.replies)
    (held_reasons, held_ids, held_unpacked), (reasons, ids, fast_unpacked) = results
    assert ids == held_ids == [0, 5, 7]
    assert reasons == held_reasons and len(reasons) == 5
    assert held_unpacked == 8 and fast_unpacked == 6  # the two well-formed messages of the layout: no parse


def test_identity_defers_its_values_as_a_numpy_view_of_the_message():
    """A message of the known layout leaves its values where they lie: a read-only numpy view of the message's
    body (no copy), counted at 4 bytes per value; the torch view is made only when read, over the same memory,
    and the payload it decodes to holds the same values."""
    import numpy as np

    s, codec = _strategy(), Identity()
    assert s.spec is not None
    (delta,) = _deltas(s.spec, 1, seed=3)
    message = codec.encode(s.spec.unflatten(delta), {})
    values = codec.decode_deferred(message, {}, DecodeArgs(sender=0, spec=s.reply_spec(None)))
    assert values is not None and values._flat is None and values.nbytes == 4 * s.spec.numel
    assert not values.array.flags.writeable and np.shares_memory(values.array, np.frombuffer(message, np.uint8))
    assert torch.equal(torch.from_numpy(values.array.copy()), delta)
    flat = values.values()
    assert values._flat is flat and flat.data_ptr() == values.array.ctypes.data and torch.equal(flat, delta)
    assert torch.equal(s.spec.as_flat(values.payload()), delta)


@pytest.mark.parametrize("aside", [True, False], ids=["snapshot_by_the_add", "snapshot_by_a_copy"])
@pytest.mark.parametrize("window", [1, 2, 16])
@pytest.mark.parametrize(
    "make_codec", [Identity, Blockwise8bit, lambda: Cast("fp32")], ids=["identity", "int8", "fp32"]
)
def test_a_rejection_after_the_pass_is_undone_exactly(make_codec, window, aside, tmp_path, monkeypatch):
    """Without the checked pass (``checked=False``; 8-bit codes always) replies are added and measured in one
    pass, then judged: a rejected one is taken out exactly (the snapshot and the window's replies again), whether
    a snapshot was taken before it or not, taken by the add that follows it (float32 replies,
    ``snapshot_aside``) or by a copy, and the payloads are released once the window moves on."""
    s, codec = _strategy(), make_codec()
    server = _server(s, codec, tmp_path)
    assert s.spec is not None
    folds = _folds_with(monkeypatch, window=window, snapshot_aside=aside, checked=False)
    aside_adds = []
    to_measure = aggregate.axpy_to_measure_
    monkeypatch.setattr(aggregate, "axpy_to_measure_", lambda *a, **k: aside_adds.append(1) or to_measure(*a, **k))
    second = _deltas(s.spec, 6, seed=5)
    second[1].mul_(1e6)  # rejected before any snapshot when the window is larger than 1
    second[4].mul_(1e6)  # after one at any window
    messages, raw = _two_rounds(s, codec, server, second)
    kept = [0, 2, 3, 5]
    want = _rescaled_from(s, codec, raw, kept, sum(COUNTS))
    got = server.collect(1, s.configure_round(1, list(range(6))), messages)
    assert [r.client_id for r in got.replies] == kept and all(r.payload is RELEASED for r in got.replies)
    assert got.stats["rejected"] == 2
    assert folds and not any(f.judge_first for f in folds)  # the pass and its undo (the default)
    # Identity's values lie in one float32 buffer: each snapshot is taken by an add aside; 8-bit codes, and a
    # decoded payload in several buffers (fp32), take theirs by a copy
    assert bool(aside_adds) == (aside and window < 6 and codec.name == "identity")
    server.aggregate(1, got.replies)
    assert torch.equal(s.global_flat, want)


@pytest.mark.parametrize("first", [True, False], ids=["first", "second"])
@pytest.mark.parametrize("path", ["numba", "torch"])
def test_the_checked_pass_keeps_a_reply_whose_squares_pass_float32_range_when_the_limit_allows(path, first,
                                                                                              monkeypatch):
    """Without a norm limit, finite values whose float32 squares overflow stop the checked pass at their block (its
    sum is not finite); summed again in float64 the reply is kept, and the rest of it is added: the bits of
    ``add_`` over the whole reply. As the fold's first reply it is written into an accumulator that holds other
    values (never read, and what lies past the stop not kept either)."""
    _on_path(path, monkeypatch, 100)
    s = _strategy()
    assert s.spec is not None
    x, y = _deltas(s.spec, 2, seed=3)
    x[700], x[1300] = 3e19, -2e19  # squares past float32's 3.4e38 in the second and third blocks
    acc = torch.randn(s.spec.numel, generator=torch.Generator().manual_seed(1))  # not zeros: taken as zeros
    fold = MeanFold(s.spec, acc, 10)
    want = torch.zeros_like(acc)
    if not first:
        assert fold.add_released(SimpleNamespace(payload=s.spec.unflatten(y), num_examples=6), None, None,
                                 math.inf)[0] is None
        want.add_(y, alpha=0.6)
    stops = []
    checked = aggregate.axpy_checked_
    monkeypatch.setattr(aggregate, "axpy_checked_", lambda *a, **k: stops.append(checked(*a, **k)) or stops[-1])
    why, norm = fold.add_released(SimpleNamespace(payload=s.spec.unflatten(x), num_examples=4), None, None, math.inf)
    assert why is None and norm == pytest.approx(math.hypot(3e19, 2e19), rel=1e-6)
    assert 0 < stops[0][2] < s.spec.numel  # the pass stopped at the overflow and the fold added the rest
    assert torch.equal(acc, want.add_(x, alpha=0.4))


@pytest.mark.parametrize("bad", ["norm", "nan"])
@pytest.mark.parametrize("path", ["numba", "torch"])
@pytest.mark.parametrize("make_codec", [Identity, lambda: Cast("fp32")], ids=["identity", "fp32"])
def test_a_reply_that_fails_late_in_the_checked_pass_is_subtracted(make_codec, path, bad, tmp_path, monkeypatch):
    """The checked pass (the default for float32 replies) adds a reply block by block while its running norm
    and values pass; one whose last values break the norm limit (or hold a NaN) is rejected after its first
    blocks were added, and those are subtracted again: the weights are the kept replies' mean up to a rounding
    or two per element, no window is held and nothing is undone from a snapshot."""
    _on_path(path, monkeypatch, 100)  # the torch path checks pieces of 100 values
    s, codec = _strategy(), make_codec()
    server = _server(s, codec, tmp_path)
    assert s.spec is not None
    folds = _folds_with(monkeypatch)
    monkeypatch.setattr(MeanFold, "_undo", lambda self: pytest.fail("the checked pass needs no undo"))
    stops: list[tuple[int, int]] = []
    checked = aggregate.axpy_checked_

    def spy(acc, x, w, **kw):
        out = checked(acc, x, w, **kw)
        stops.append((out[2], x.shape[0]))
        return out

    monkeypatch.setattr(aggregate, "axpy_checked_", spy)
    second = _deltas(s.spec, 6, seed=5)
    if bad == "norm":
        second[3][-100:].mul_(1e3)  # the running norm passes 10x the median in the last block
    else:
        second[3][-3] = float("nan")
    messages, raw = _two_rounds(s, codec, server, second)
    got = server.collect(1, s.configure_round(1, list(range(6))), messages, total_examples=sum(COUNTS))
    kept = [0, 1, 2, 4, 5]
    assert [r.client_id for r in got.replies] == kept and all(r.payload is RELEASED for r in got.replies)
    (reason,) = got.reasons
    assert "client 3 rejected" in reason and ("its norm" in reason if bad == "norm" else "NaN or Inf" in reason)
    assert not folds[-1]._window and not folds[-1]._snapped
    per = len(stops) // 6  # calls per reply: one per buffer of its values
    added = sum(stop for stop, _ in stops[3 * per : 4 * per])  # the rejected reply's, added before its pass stopped
    assert 0 < added < s.spec.numel
    want = _rescaled_from(s, codec, raw, kept, sum(COUNTS))
    server.aggregate(1, got.replies)
    assert s.global_flat is not None and torch.isfinite(s.global_flat).all()
    w = COUNTS[3] / sum(COUNTS)
    term = second[3].nan_to_num(0.0).abs() * w
    assert ((s.global_flat - want).abs() <= 2**-21 * (want.abs() + term) + 1e-12).all()


@pytest.mark.parametrize("path", ["numba", "torch"])
@pytest.mark.parametrize("make_codec", [Identity, lambda: Cast("fp32")], ids=["identity", "fp32"])
def test_a_small_reply_is_judged_before_it_is_added(make_codec, path, tmp_path, monkeypatch):
    """With ``judge_first`` a reply of float32 values is measured and judged first: a rejected
    one (its norm; a value not finite) never touches the accumulator (no snapshot, nothing undone), an accepted
    one is added and released at once (no window); the weights and reasons are those of the pass-then-undo
    path (``checked=False``) and of the checked pass (the default; these rejections fail in their first block,
    so nothing of them is added), the norms equal to 1e-6."""
    from lightning_fed import kernels

    if path == "numba" and not kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed (the `fast` extra)")
    results = []
    for mode in ("judge_first", "window", "checked"):
        judge_first = mode == "judge_first"
        monkeypatch.setattr(kernels, "NUMBA", path == "numba")
        s, codec = _strategy(), make_codec()
        server = _server(s, codec, tmp_path / mode)
        assert s.spec is not None
        folds = _folds_with(monkeypatch, judge_first=judge_first, checked=mode == "checked")
        if mode != "window":
            monkeypatch.setattr(MeanFold, "_undo", lambda self: pytest.fail("a judged reply was undone"))
        second = _deltas(s.spec, 6, seed=5)
        second[1].mul_(1e6)
        second[4][7] = float("nan")
        messages, _ = _two_rounds(s, codec, server, second)
        held = []

        def stream(_msgs=messages, _held=held, _folds=folds):
            for m in _msgs:  # before each message: how many replies the fold still holds for an undo
                _held.append(len(_folds[-1]._window))
                yield m

        got = server.collect(1, s.configure_round(1, list(range(6))), stream(), total_examples=sum(COUNTS))
        monkeypatch.undo()
        fold = folds[-1]
        assert [r.client_id for r in got.replies] == [0, 2, 3, 5] and all(
            r.payload is RELEASED for r in got.replies
        )
        if mode == "window":
            assert held == [0, 1, 1, 2, 3, 3]  # the pass-then-undo path holds the replies since its snapshot
        else:
            assert held == [0] * 6 and not fold._snapped and fold.released == 4
        server.aggregate(1, got.replies)
        assert s.global_flat is not None
        results.append((s.global_flat.clone(), got.reasons, got.stats["norm_ratio_prev"]))
    (first, reasons, ratio), (fused, fused_reasons, fused_ratio), (checked, checked_reasons, checked_ratio) = results
    assert torch.equal(first, fused) and reasons == fused_reasons and len(reasons) == 2
    assert torch.equal(checked, fused) and checked_reasons == fused_reasons
    # one float32 buffer: the same compiled squares bit for bit; entries in several buffers: summed by the compiled
    # pass now, by torch in the pass-then-undo path
    assert checked_ratio == (fused_ratio if path == "numba" and codec.name == "identity" else
                             pytest.approx(fused_ratio, rel=1e-6))
    assert "client 1 rejected: its norm" in reasons[0] and "client 4 rejected" in reasons[1]
    assert "NaN or Inf" in reasons[1]  # named by the full validation
    assert ratio == pytest.approx(fused_ratio, rel=1e-6)  # the pass sums float32 squares per block, the measure in float64


def test_small_replies_are_added_first_unless_judging_first_is_asked():
    """By default every reply is added and measured in one pass; ``judge_first_bytes`` (the accumulator's bytes)
    turns judging first on for accumulators up to that size."""
    s = _strategy()
    assert s.spec is not None
    acc = torch.empty(s.spec.numel)
    size = acc.numel() * 4
    assert size <= SMALL_BYTES and not MeanFold(s.spec, acc, 10).judge_first
    assert MeanFold(s.spec, acc, 10, judge_first_bytes=size).judge_first
    assert not MeanFold(s.spec, acc, 10, judge_first_bytes=size - 1).judge_first


def test_a_small_fold_holds_less_and_lets_its_replies_go_lazily():
    """An accumulator of at most ``SMALL_BYTES`` makes a small fold: its window holds at most ``SMALL_HOLD_BYTES``
    by default and lets its replies go one per arriving reply; a larger one holds 2 GiB and lets them go at once.
    An explicit ``hold_bytes`` is kept either way."""
    s = _strategy()
    assert s.spec is not None
    acc = torch.empty(s.spec.numel)
    size = acc.numel() * 4
    small = MeanFold(s.spec, acc, 10)
    assert small.small and small.lazy and small.hold_bytes == SMALL_HOLD_BYTES
    large = MeanFold(s.spec, acc, 10, small_bytes=size - 1)
    assert not large.small and not large.lazy and large.hold_bytes == 2 << 30
    assert MeanFold(s.spec, acc, 10, hold_bytes=123).hold_bytes == 123
    assert MeanFold(s.spec, acc, 10, hold_bytes=123, small_bytes=0).hold_bytes == 123


@pytest.mark.parametrize("lazy", [True, False], ids=["small_fold", "large_fold"])
@pytest.mark.parametrize("make_codec", [Identity, Blockwise8bit], ids=["identity", "int8"])
def test_a_small_fold_drops_what_it_let_go_one_reply_at_a_time(make_codec, lazy, tmp_path, monkeypatch):
    """The replies a small fold's window lets go keep their messages alive until one is dropped per arriving
    reply, oldest first (the next message is made in the memory of the one dropped); the end of the round drops
    the rest. A large fold drops them when it lets them go. The weights are the same either way."""
    results = []
    for drop_lazily in (lazy, not lazy):
        s, codec = _strategy(), make_codec()
        server = _server(s, codec, tmp_path / str(drop_lazily))
        assert s.spec is not None
        folds = _folds_with(monkeypatch, window=2, lazy=drop_lazily, checked=False)
        messages, _ = _two_rounds(s, codec, server, _deltas(s.spec, 6, seed=5))
        waiting: list[tuple[int, int]] = []

        def stream(_msgs=messages, _waiting=waiting, _folds=folds):
            for m in _msgs:  # before each message: (replies held to undo, let go but not yet dropped)
                _waiting.append((len(_folds[-1]._window), len(_folds[-1]._letgo)))
                yield m

        got = server.collect(1, s.configure_round(1, list(range(6))), stream(), total_examples=sum(COUNTS))
        monkeypatch.undo()
        assert len(got.replies) == 6 and not folds[-1]._letgo and not folds[-1]._window  # all dropped at the end
        if drop_lazily:  # a window of 2, let go after its second reply; one dropped per reply after that
            assert waiting == [(0, 0), (1, 0), (0, 2), (1, 1), (0, 2), (1, 1)]
        else:
            assert waiting == [(0, 0), (1, 0), (0, 0), (1, 0), (0, 0), (1, 0)]
        server.aggregate(1, got.replies)
        assert s.global_flat is not None
        results.append(s.global_flat.clone())
    assert torch.equal(results[0], results[1])


def _held_before_each(
    s: FedAvg, codec: Codec, server: Server, second: list[torch.Tensor], hold_bytes: int, monkeypatch
) -> tuple[list[int], MeanFold, list[bytes], object]:
    """Round 1 of ``second`` through a fold of ``hold_bytes`` (its pass and undo, no judging first): how many
    replies the window holds before each message, the fold, the raw messages and what ``collect`` returned."""
    folds = _folds_with(monkeypatch, hold_bytes=hold_bytes, judge_first=False, checked=False)
    messages, raw = _two_rounds(s, codec, server, second)
    held: list[int] = []

    def stream():
        for m in messages:
            held.append(len(folds[-1]._window))
            yield m

    got = server.collect(1, s.configure_round(1, list(range(6))), stream(), total_examples=sum(COUNTS))
    monkeypatch.undo()
    return held, folds[-1], raw, got


@pytest.mark.parametrize(
    "make_codec, held_want",
    [
        (Blockwise8bit, [0, 1, 1, 2, 3, 3]),  # codes and scales: 9 fit in 10 bytes per value
        (Identity, [0, 1, 1, 0, 1, 1]),  # float32 values: 2 fit
        (lambda: Cast("fp32"), [0, 1, 1, 0, 1, 1]),  # a decoded float32 payload: 2 fit
    ],
    ids=["int8", "identity", "fp32"],
)
def test_the_window_counts_what_its_replies_hold_and_undoes_exactly(
    make_codec, held_want, tmp_path, monkeypatch
):
    """The undo window is counted by the bytes its replies keep alive: with ``hold_bytes`` of 10 bytes per
    parameter, an 8-bit fold of the model holds every reply added since the start (no snapshot taken), a float32
    fold of the same size at most 2 (a snapshot before every 3rd); both take the rejected replies out exactly."""
    s, codec = _strategy(), make_codec()
    server = _server(s, codec, tmp_path)
    assert s.spec is not None
    second = _deltas(s.spec, 6, seed=5)
    second[1].mul_(1e6)
    second[4].mul_(1e6)
    held, fold, raw, got = _held_before_each(s, codec, server, second, 10 * s.spec.numel, monkeypatch)
    assert held == held_want
    assert fold._snapped == (held_want[3] == 0) and fold.hold_bytes == 10 * s.spec.numel
    kept = [0, 2, 3, 5]
    assert [r.client_id for r in got.replies] == kept and all(r.payload is RELEASED for r in got.replies)
    want = _rescaled_from(s, codec, raw, kept, sum(COUNTS))
    server.aggregate(1, got.replies)
    assert torch.equal(s.global_flat, want)


@pytest.mark.parametrize("below", [0, 1], ids=["at_the_limit", "one_byte_less"])
def test_the_window_is_let_go_at_the_byte_limit(below, tmp_path, monkeypatch):
    """``hold_bytes`` exactly two 8-bit replies' codes and scales: the window holds two, then is let go right after
    the second (a next reply as large would pass); one byte less, each reply is let go once added. The weights are
    the same bits either way."""
    s, codec = _strategy(), Blockwise8bit()
    server = _server(s, codec, tmp_path)
    assert s.spec is not None
    size = s.spec.numel + 4 * -(
        -s.spec.numel // codec.blocksize
    )  # one byte per code, a float32 scale per block
    held, fold, raw, got = _held_before_each(
        s, codec, server, _deltas(s.spec, 6, seed=5), 2 * size - below, monkeypatch
    )
    assert held == ([0, 1, 0, 1, 0, 1] if below == 0 else [0] * 6)
    assert fold._snapped and not fold._window  # flushed at the end of the round
    assert len(got.replies) == 6 and all(r.payload is RELEASED for r in got.replies)
    want = _reference(s, codec, [ClientMessage(i, m, COUNTS[i]) for i, m in enumerate(raw)], list(range(6)))
    server.aggregate(1, got.replies)
    assert torch.equal(s.global_flat, want)


def test_a_larger_reply_lets_the_window_go_before_it_is_added():
    """Two 8-bit replies fit in ``hold_bytes`` (three of them would); a float32 reply of the same model does
    not: the window is released and the snapshot taken when it comes, before its pass, so its rejection
    restores the accumulator as it was after the two, bit for bit."""
    s = _strategy()
    assert s.spec is not None
    spec, rspec = s.spec, s.spec.tensor_specs()
    deltas = _deltas(spec, 4, seed=3)
    deltas[2].mul_(1e6)
    int8, ident = Blockwise8bit(), Identity()
    codecs_ = [int8, int8, ident, int8]
    msgs = [c.encode(spec.unflatten(d), {}) for c, d in zip(codecs_, deltas, strict=True)]
    values = [
        c.decode_deferred(m, {}, DecodeArgs(sender=i, spec=rspec))
        for i, (c, m) in enumerate(zip(codecs_, msgs))
    ]
    assert values[0].nbytes < values[2].nbytes == 4 * spec.numel
    replies = [SimpleNamespace(payload={}, num_examples=n) for n in COUNTS[:4]]
    total = sum(COUNTS[:4])
    acc = torch.empty(spec.numel)
    fold = MeanFold(spec, acc, total, hold_bytes=3 * values[0].nbytes, judge_first_bytes=0, checked=False)
    for i in range(2):
        assert fold.add_released(replies[i], values[i], None, 1.0)[0] is None
    assert len(fold._window) == 2 and not fold._snapped and replies[0].payload is not RELEASED
    after_two = acc.clone()
    assert fold.add_released(replies[2], values[2], None, 1.0)[0] == "norm"
    assert (
        fold._snapped
        and not fold._window
        and replies[0].payload is RELEASED
        and replies[1].payload is RELEASED
    )
    assert torch.equal(fold._acc, after_two)  # where the sum is now (the snapshot was taken by the add, aside)
    assert fold.add_released(replies[3], values[3], None, 1.0)[0] is None
    want = torch.zeros(spec.numel)
    for i in (0, 1, 3):
        want.add_(spec.flatten(values[i].payload()), alpha=COUNTS[i] / float(total))
    kept = sum(COUNTS[i] for i in (0, 1, 3))
    assert fold.result() is acc and torch.equal(acc, want.mul_(total / kept))  # the sum back in the buffer given


def test_the_snapshot_is_taken_aside_when_the_window_is_cut_by_bytes():
    """``snapshot_aside=None``: by the add aside when ``hold_bytes`` holds fewer than ``window`` replies of the
    accumulator's size (a copy would recur every few replies), by a copy otherwise; ``True`` / ``False`` force it."""
    s = _strategy()
    assert s.spec is not None
    size = 4 * s.spec.numel
    for hold, want in ((2 << 30, False), (16 * size, False), (16 * size - 1, True), (3 * size, True)):
        fold = MeanFold(s.spec, torch.empty(s.spec.numel), 10, hold_bytes=hold, judge_first_bytes=0)
        assert fold.snapshot_aside is None and fold._aside() == want
    for forced in (True, False):
        fold = MeanFold(s.spec, torch.empty(s.spec.numel), 10, hold_bytes=3 * size, snapshot_aside=forced)
        assert fold._aside() == forced


def test_hold_bytes_must_not_be_negative():
    s = _strategy()
    assert s.spec is not None
    with pytest.raises(ValueError, match=r"hold_bytes=-1 is not allowed; hold_bytes must be >= 0"):
        MeanFold(s.spec, torch.empty(s.spec.numel), 10, hold_bytes=-1)


@pytest.mark.parametrize("path", ["numba", "torch"])
def test_a_fold_takes_its_accumulator_as_zeros_whatever_it_holds(path, monkeypatch):
    """The fold does not zero its accumulator up front: the first reply of the checked pass is written into it,
    and every other way in (a rejected first reply, ``add``, the window's pass for ``checked=False``, a fold with
    no reply) still gives the sums of a zeroed accumulator, bit for bit."""
    _on_path(path, monkeypatch, 100)
    s = _strategy()
    assert s.spec is not None
    x, y = _deltas(s.spec, 2, seed=5)
    bad = x.clone()
    bad[900] = math.nan

    def garbage() -> torch.Tensor:
        return torch.randn(s.spec.numel, generator=torch.Generator().manual_seed(2)) * 1e3

    def reply(v: torch.Tensor, n: int) -> SimpleNamespace:
        return SimpleNamespace(payload=s.spec.unflatten(v.clone()), num_examples=n)

    want = torch.zeros(s.spec.numel).add_(x, alpha=0.4).add_(y, alpha=0.6)
    for checked in (True, False):  # (checked: a rejected first reply), then two kept ones
        fold = MeanFold(s.spec, garbage(), 10, checked=checked)
        if checked:
            assert fold.add_released(reply(bad, 4), None, None, math.inf)[0] == "values"
        for v, n in ((x, 4), (y, 6)):
            assert fold.add_released(reply(v, n), None, None, math.inf)[0] is None
        fold.flush()
        assert torch.equal(fold.result(), want), checked
    fold = MeanFold(s.spec, garbage(), 10)  # the plain add
    assert fold.add(reply(x, 4)) and fold.add(reply(y, 6)) and fold.settle()
    assert torch.equal(fold.result(), want)
    assert torch.equal(MeanFold(s.spec, garbage(), 10).result(), torch.zeros(s.spec.numel))  # no reply
