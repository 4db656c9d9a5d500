"""Server aggregation at memory speed: zero-copy decoding, the fold that checks and adds each reply in one pass,
and that it changes no result (bit-identical to flattening copies and summing them)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_fed import kernels as fused
from lightning_fed.codecs import QSGD, Blockwise8bit, Cast, Codec, DecodeArgs, Identity, TopK
from lightning_fed.flat import FlatSpec
from lightning_fed.loop import _overrides
from lightning_fed.protocol import RELEASED, ClientMessage, Reply
from lightning_fed.report import without_wall_clock
from lightning_fed.server import Server
from lightning_fed.store import ClientStore
from lightning_fed.strategies import FedAvg
from lightning_fed.strategies.aggregate import example_weights, weighted_sum_
from lightning_fed.strategies.aggregators import Aggregator, WeightedMean

KERNELS = ["numba", "torch"]


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch) -> str:
    """The fold's fused pass: compiled (numba, the `fast` extra) or torch's calls over pieces."""
    if request.param == "numba" and not fused.HAVE_NUMBA:
        pytest.skip("numba is not installed (the `fast` extra)")
    monkeypatch.setattr(fused, "NUMBA", request.param == "numba")
    monkeypatch.setattr(fused, "PIECE", 333)  # several pieces per reply on the torch path
    return request.param


CODECS = [Identity, Blockwise8bit, lambda: TopK(0.1), lambda: Cast("bf16"), lambda: QSGD(levels=7)]
COUNTS = [10, 13, 16, 19, 22, 25]


def _strategy(**kw) -> FedAvg:
    torch.manual_seed(0)
    s = FedAvg(**kw)
    s.setup(nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 7)))
    return s


def _deltas(spec: FlatSpec, count: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(spec.numel, generator=g) * 0.01 for _ in range(count)]


def _messages(codec: Codec, spec: FlatSpec, deltas: list[torch.Tensor]) -> list[ClientMessage]:
    return [ClientMessage(i, codec.encode(spec.unflatten(d), {}), COUNTS[i]) for i, d in enumerate(deltas)]


def _reference(strategy: FedAvg, codec: Codec, messages: list[ClientMessage], keep: list[int]) -> torch.Tensor:
    """What the server computed before: decode, flatten a copy of each kept reply, weighted sum, plain step."""
    spec = strategy.spec
    assert spec is not None and strategy.global_flat is not None
    rspec = spec.tensor_specs()
    flats = [spec.flatten(codec.decode(bytes(bytearray(messages[i].message)), {}, DecodeArgs(sender=i, spec=rspec)))
             for i in keep]
    update = weighted_sum_(torch.empty(spec.numel), flats, example_weights([COUNTS[i] for i in keep]))
    return strategy.global_flat.clone().add_(update, alpha=1.0)


def _server(strategy: FedAvg, codec: Codec, tmp_path, **kw) -> Server:
    return Server(strategy, codec, ClientStore(tmp_path / "senders"), **kw)


def _bytes_range(message: bytes) -> tuple[int, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        start = torch.frombuffer(message, dtype=torch.uint8).data_ptr()
    return start, start + len(message)


def test_identity_uplink_decodes_to_views_of_the_message():
    s = _strategy()
    spec = s.spec
    assert spec is not None
    message = Identity().encode(spec.unflatten(_deltas(spec, 1)[0]), {})
    payload = Identity().decode(message, {}, DecodeArgs(sender=3, spec=spec.tensor_specs()))
    start, end = _bytes_range(message)
    flat = spec.flat_view(payload)
    assert flat is not None  # one flat buffer in the strategy's layout: aggregation reads the message itself
    assert start <= flat.data_ptr() and flat.data_ptr() + 4 * flat.numel() <= end
    assert flat.data_ptr() == next(iter(payload.values())).data_ptr()
    assert spec.as_flat(payload).data_ptr() == flat.data_ptr()  # as_flat makes no copy either
    downlink = Identity().decode(message, {}, DecodeArgs())  # the downlink is shared by clients: a private copy
    assert not start <= next(iter(downlink.values())).data_ptr() < end
    assert torch.equal(spec.flatten(downlink), flat)


@pytest.mark.parametrize("make_codec", CODECS, ids=["identity", "int8", "topk", "bf16", "qsgd"])
def test_fold_is_bit_identical_to_summing_flattened_copies(make_codec, kernel, tmp_path, monkeypatch):
    s, codec = _strategy(), make_codec()
    assert s.spec is not None
    messages = _messages(codec, s.spec, _deltas(s.spec, 6))
    want = _reference(s, codec, messages, list(range(6)))
    folds = []
    begin = s.begin_fold
    monkeypatch.setattr(s, "begin_fold", lambda r, n: folds.append(begin(r, n)) or folds[-1])
    server = _server(s, codec, tmp_path)
    got = server.collect(0, s.configure_round(0, list(range(6))), messages)
    assert not messages and len(got.replies) == 6
    assert folds[0] is not None and folds[0].covers(got.replies)  # the fold is what aggregation uses
    server.aggregate(0, got.replies)
    assert torch.equal(s.global_flat, want)


def test_without_a_fold_aggregation_is_still_bit_identical(tmp_path):
    s, codec = _strategy(), Blockwise8bit()  # decoded entries in the codec's sorted order: added entry by entry
    assert s.spec is not None
    messages = _messages(codec, s.spec, _deltas(s.spec, 4))
    want = _reference(s, codec, messages, list(range(4)))
    server = _server(s, codec, tmp_path, fold=False)
    got = server.collect(0, s.configure_round(0, list(range(4))), messages)
    assert s.spec.flat_view(got.replies[0].payload) is None
    server.aggregate(0, got.replies)
    assert torch.equal(s.global_flat, want)


def _rescaled(strategy: FedAvg, codec: Codec, messages: list[ClientMessage], keep: list[int], total: int
              ) -> torch.Tensor:
    """What a fold that released replies computes when the kept counts do not sum to its bet ``total``: the kept
    replies added with ``n / total``, the sum scaled by ``total / kept`` once, then the plain step."""
    spec = strategy.spec
    assert spec is not None and strategy.global_flat is not None
    rspec = spec.tensor_specs()
    acc = torch.zeros(spec.numel)
    for i in keep:
        acc.add_(spec.flatten(codec.decode(bytes(bytearray(messages[i].message)), {}, DecodeArgs(sender=i, spec=rspec))),
                 alpha=COUNTS[i] / float(total))
    acc.mul_(total / sum(COUNTS[i] for i in keep))
    return strategy.global_flat.clone().add_(acc, alpha=1.0)


@pytest.mark.parametrize("release", [False, True], ids=["held", "released"])
@pytest.mark.parametrize("bad", ["nan", "max_abs"])
def test_a_rejected_reply_is_never_added(bad, release, kernel, tmp_path):  # the bad value in a later piece
    """Held replies are aggregated again exactly without the rejected one; released replies were judged before
    their add, so the rejected one never touched the sum, which is rescaled to the kept replies' total."""
    s, codec = _strategy(), Identity()
    assert s.spec is not None
    deltas = _deltas(s.spec, 5)
    deltas[2][250] = float("nan") if bad == "nan" else 5.0
    messages = _messages(codec, s.spec, deltas)
    keep = [0, 1, 3, 4]
    exact, rescaled = _reference(s, codec, messages, keep), _rescaled(s, codec, messages, keep, sum(COUNTS[:5]))
    assert not torch.equal(exact, rescaled)  # the two paths are told apart
    want = rescaled if release else exact
    server = _server(s, codec, tmp_path, max_update_abs=1.0, release=release)
    got = server.collect(0, s.configure_round(0, list(range(5))), messages)
    assert [r.client_id for r in got.replies] == keep
    assert got.stats["rejected"] == 1 and "client 2" in got.reasons[0]
    assert all((r.payload is RELEASED) == release for r in got.replies)
    server.aggregate(0, got.replies)
    assert torch.equal(s.global_flat, want)
    assert torch.allclose(exact, rescaled, rtol=1e-6, atol=1e-8)  # the same mean, up to one rounding


@pytest.mark.parametrize("make_codec", [Identity, lambda: Cast("fp32")], ids=["identity", "fp32"])
def test_without_a_bound_bad_replies_are_found_after_the_fold_and_rejected_in_order(make_codec, tmp_path):
    """No max_update_abs: finiteness is checked once on the round's sum; when it fails every reply is checked,
    the culprits are rejected (reasons in message order, failures included) and the fold is not used."""
    s, codec = _strategy(), make_codec()
    assert s.spec is not None
    deltas = _deltas(s.spec, 6)
    deltas[2][7] = float("inf")
    deltas[4][-1] = float("nan")
    messages = _messages(codec, s.spec, deltas)
    messages[1] = ClientMessage(1, b"", COUNTS[1], failure="out of memory")
    want = _reference(s, codec, messages, [0, 3, 5])
    server = _server(s, codec, tmp_path, release=False)
    got = server.collect(0, s.configure_round(0, list(range(6))), messages)
    assert [r.client_id for r in got.replies] == [0, 3, 5]
    assert [reason.split(":")[0] for reason in got.reasons] == [
        "client 1 dropped", "reply of client 2 rejected", "reply of client 4 rejected"]
    assert got.stats["rejected"] == 2 and got.stats["failed"] == 1
    server.aggregate(0, got.replies)
    assert torch.equal(s.global_flat, want)


def test_a_round_below_min_clients_leaves_the_global_model_unchanged(tmp_path):
    s, codec = _strategy(), Identity()
    assert s.spec is not None and s.global_flat is not None
    before = s.global_flat.clone()
    server = _server(s, codec, tmp_path)
    got = server.collect(0, s.configure_round(0, list(range(3))), _messages(codec, s.spec, _deltas(s.spec, 3)))
    assert len(got.replies) == 3  # folded, but the loop decides not to aggregate (say min_clients=4)
    assert torch.equal(s.global_flat, before)
    # the next round aggregates other replies: the stale fold is not used for them
    messages = _messages(codec, s.spec, _deltas(s.spec, 2, seed=7))
    want = _reference(s, codec, messages, [0, 1])
    got = _server(s, codec, tmp_path, fold=False).collect(1, s.configure_round(1, [0, 1]), messages)
    server.aggregate(1, got.replies)
    assert torch.equal(s.global_flat, want)


@pytest.mark.parametrize("change", ["drop", "replace", "in_place"])
def test_replies_changed_after_the_fold_are_aggregated_again(change, tmp_path):
    s, codec = _strategy(), Blockwise8bit()  # writable decoded buffers: an in-place edit is possible
    assert s.spec is not None
    messages = _messages(codec, s.spec, _deltas(s.spec, 4))
    keep = [0, 2, 3] if change == "drop" else [0, 1, 2, 3]
    server = _server(s, codec, tmp_path, release=False)  # what the loop makes of a callback that sees replies
    got = server.collect(0, s.configure_round(0, list(range(4))), list(messages))
    replies = got.replies
    name = s.spec.names[0]
    if change == "drop":  # what a callback's on_aggregate_start may do
        replies.pop(1)
        want = _reference(s, codec, messages, keep)
    else:
        edited = replies[1].payload[name] * 0.5
        if change == "replace":
            replies[1].payload[name] = edited
        else:
            replies[1].payload[name].mul_(0.5)
        spec = s.spec
        flats = [spec.flatten(r.payload) for r in replies]
        update = weighted_sum_(torch.empty(spec.numel), flats, example_weights(COUNTS[:4]))
        want = s.global_flat.clone().add_(update)
    server.aggregate(0, replies)
    assert torch.equal(s.global_flat, want)


def test_streamed_messages_leave_no_flat_copies(tmp_path, monkeypatch):
    """Messages read one at a time from a generator: the server holds one buffer per accepted reply (for Identity
    the message itself) and makes no flat copy of any reply (no scratch buffer is written, none allocated)."""
    s, codec = _strategy(), Identity()
    spec = s.spec
    assert spec is not None
    messages = _messages(codec, spec, _deltas(spec, 6))
    want = _reference(s, codec, messages, list(range(6)))
    made = []
    for name in ("flatten", "empty"):
        original = getattr(FlatSpec, name)
        monkeypatch.setattr(FlatSpec, name, lambda self, *a, _o=original, _n=name, **k: made.append(_n) or _o(self, *a, **k))
    server = _server(s, codec, tmp_path, release=False)
    got = server.collect(0, s.configure_round(0, list(range(6))), iter(messages), total_examples=sum(COUNTS))
    ranges = [_bytes_range(m.message) for m in messages]
    storages = {r.payload[spec.names[0]].untyped_storage().data_ptr() for r in got.replies}
    assert len(storages) == 6  # K = one buffer per accepted reply
    for r, (start, end) in zip(got.replies, ranges):
        assert start <= spec.as_flat(r.payload).data_ptr() < end  # that buffer is the message
    server.aggregate(0, got.replies)
    assert made == []
    assert torch.equal(s.global_flat, want)


def test_other_aggregators_and_strategies_do_not_fold():
    class Median(Aggregator):
        streaming = False

        def __call__(self, out, flats, weights):
            return out.copy_(torch.stack(flats).median(dim=0).values)

    class Custom(WeightedMean):
        pass

    assert _strategy(aggregator=Median()).begin_fold(0, 10) is None
    assert _strategy(aggregator=Custom()).begin_fold(0, 10) is None
    assert _strategy().begin_fold(0, 10) is not None


def test_the_loop_folds_unless_a_callback_sees_replies_first():
    from lightning_fed.callbacks import FedCallback

    class Dropper(FedCallback):
        def on_aggregate_start(self, trainer, pl_module, replies: list[Reply]) -> None:
            replies.pop()

    assert _overrides(Dropper(), "on_aggregate_start")
    assert not _overrides(FedCallback(), "on_aggregate_start")
    assert not _overrides(object(), "on_aggregate_start")


def test_fedavg_loop_results_do_not_depend_on_the_fold(make_loop, small_dm, monkeypatch):
    """Two short FedLoop runs, with and without the fold: identical global weights and metrics."""
    from conftest import seeded

    from lightning_fed.models import MNIST1DFFN

    results = []
    for fold in (True, False):
        loop = make_loop(strategy=FedAvg(), seed=3)
        original = Server.collect

        def collect(self, *a, _fold=fold, _original=original, **k):
            self.fold = _fold
            return _original(self, *a, **k)

        monkeypatch.setattr(Server, "collect", collect)
        result = loop.fit(seeded(MNIST1DFFN), small_dm)
        monkeypatch.undo()
        results.append((loop.strategy.global_flat.clone(), without_wall_clock(result.history)))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]

