import pytest
import torch

from lightning_fed.flat import FlatSpec
from lightning_fed.protocol import RejectedReply, Reply, TensorSpec, spec_of, validate_payload, validate_reply

GOOD = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
SPEC = spec_of(GOOD)


def test_valid_payload_passes():
    validate_payload({k: v.clone() for k, v in GOOD.items()}, SPEC)


@pytest.mark.parametrize(
    "payload, match",
    [
        ({"w": torch.ones(2, 3)}, "missing=\\['b'\\]"),
        ({**GOOD, "evil": torch.ones(1)}, "extra=\\['evil'\\]"),
        ({"w": torch.ones(3, 2), "b": torch.zeros(3)}, "shape"),
        ({"w": torch.ones(2, 3, dtype=torch.float64), "b": torch.zeros(3)}, "dtype"),
        ({"w": torch.full((2, 3), float("nan")), "b": torch.zeros(3)}, "NaN or Inf"),
        ({"w": torch.full((2, 3), float("inf")), "b": torch.zeros(3)}, "NaN or Inf"),
        ({"w": [1, 2], "b": torch.zeros(3)}, "not a tensor"),
        ("not a dict", "must be a dict"),
    ],
)
def test_bad_payloads_are_rejected(payload, match):
    with pytest.raises(RejectedReply, match=match):
        validate_payload(payload, SPEC)


def test_norm_bound():
    with pytest.raises(RejectedReply, match="max_abs"):
        validate_payload({"w": torch.full((2, 3), 1e6), "b": torch.zeros(3)}, SPEC, max_abs=100.0)


def test_wildcard_and_optional_specs():
    spec = {"experts": TensorSpec((-1, 4), torch.float32, max_numel=40), "opt": TensorSpec((2,), torch.float32, optional=True)}
    validate_payload({"experts": torch.zeros(3, 4)}, spec)
    validate_payload({"experts": torch.zeros(0, 4), "opt": torch.zeros(2)}, spec)
    with pytest.raises(RejectedReply, match="max_numel"):
        validate_payload({"experts": torch.zeros(11, 4)}, spec)
    with pytest.raises(RejectedReply, match="shape"):
        validate_payload({"experts": torch.zeros(3, 5)}, spec)


@pytest.mark.parametrize("n", [0, -5, 2.5, True])
def test_reply_example_count_must_be_positive_int(n):
    with pytest.raises(RejectedReply, match="num_examples"):
        validate_reply(Reply(0, dict(GOOD), n), SPEC)


def test_reply_metrics_must_be_finite():
    with pytest.raises(RejectedReply, match="metric 'train_loss'"):
        validate_reply(Reply(0, dict(GOOD), 5, {"train_loss": float("nan")}), SPEC)


def test_flatspec_roundtrip_shares_memory():
    spec = FlatSpec.from_payload(GOOD)
    flat = spec.flatten(GOOD)
    assert flat.shape == (9,)
    views = spec.unflatten(flat)
    assert torch.equal(views["w"], GOOD["w"]) and torch.equal(views["b"], GOOD["b"])
    flat.add_(1)
    assert torch.equal(views["b"], torch.ones(3))


def test_contiguous_span_only_for_back_to_back_entries_of_one_buffer():
    from lightning_fed.flat import contiguous_span

    payload = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    spec = FlatSpec.from_payload(payload)
    flat = spec.flatten(payload)
    views = list(spec.unflatten(flat).values())
    span = contiguous_span(views)
    assert span is not None and span.data_ptr() == flat.data_ptr() and torch.equal(span, flat)
    assert spec.as_flat(spec.unflatten(flat)).data_ptr() == flat.data_ptr()  # no copy
    assert contiguous_span(list(payload.values())) is None  # separate allocations
    assert contiguous_span(views[::-1]) is None  # out of order
    assert contiguous_span([flat[0:4], flat[3:8]]) is None  # overlapping
    assert contiguous_span([flat[0:4], flat[5:8]]) is None  # gap
    assert contiguous_span([flat[:4].view(2, 2).t(), flat[4:8]]) is None  # not contiguous
    assert contiguous_span([flat[:4], flat.view(torch.int32)[4:8]]) is None  # mixed dtypes
    copied = spec.as_flat(payload)  # falls back to a copy
    assert copied.data_ptr() != flat.data_ptr() and torch.equal(copied, flat)


def test_validation_checks_every_entry_of_a_shared_buffer():
    spec = {"a": TensorSpec((3,), torch.float32), "b": TensorSpec((2,), torch.float32)}
    flat = torch.zeros(5)
    flat[4] = float("nan")
    with pytest.raises(RejectedReply, match="'b' contains NaN"):
        validate_payload({"a": flat[:3], "b": flat[3:]}, spec)
    flat[4] = 0.0
    flat[0] = float("-inf")
    with pytest.raises(RejectedReply, match="'a' contains NaN or Inf"):
        validate_payload({"a": flat[:3], "b": flat[3:]}, spec)
    flat[0] = -7.0
    with pytest.raises(RejectedReply, match="max_abs"):
        validate_payload({"a": flat[:3], "b": flat[3:]}, spec, max_abs=5.0)
    validate_payload({"a": flat[:3], "b": flat[3:]}, spec, max_abs=8.0)


def test_eval_batches_equal_the_dataloaders():
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_fed.data.loaders import TensorSliceLoader, eval_batches

    ds = TensorDataset(torch.randn(103, 4), torch.randint(0, 3, (103,)))
    for loader in (DataLoader(ds, batch_size=10), DataLoader(ds, batch_size=10, drop_last=True)):
        fast = eval_batches(loader)
        assert isinstance(fast, TensorSliceLoader) and len(fast) == len(loader)
        for a, b in zip(loader, fast, strict=True):
            assert type(a) is type(b) and all(torch.equal(u, v) and u.dtype == v.dtype for u, v in zip(a, b))
        next(iter(fast))[0].zero_()  # batches are copies
        assert ds.tensors[0].abs().sum() > 0
    shuffled = DataLoader(ds, batch_size=10, shuffle=True)
    assert eval_batches(shuffled) is shuffled


def test_delta_of_model_weights():
    from torch import nn

    from lightning_fed.errors import ModelMismatch
    from lightning_fed.weights import delta, float_state, load_into

    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ref = {k: v.clone() for k, v in float_state(model).items()}
    with torch.no_grad():
        model[0].weight.add_(0.5)
    d = delta(model, ref)
    assert list(d) == list(ref)
    assert torch.allclose(d["0.weight"], torch.full((2, 3), 0.5)) and d["0.bias"].abs().max() == 0
    assert all(v.dtype == torch.float32 for v in d.values())
    model_bf16 = nn.Linear(3, 2).to(torch.bfloat16)
    d = delta(model_bf16, {k: torch.zeros(v.shape) for k, v in float_state(model_bf16).items()})
    assert d["weight"].dtype == torch.float32 and torch.equal(d["weight"], model_bf16.weight.float())
    with pytest.raises(ModelMismatch, match="not floating-point state entries"):
        delta(model, {"nope": torch.zeros(1)})
    with pytest.raises(ModelMismatch, match=r"changed shape during local training .*'0.weight': \(2, 3\), sent \(3, 3\)"):
        delta(model, {"0.weight": torch.zeros(3, 3)})
    with pytest.raises(ModelMismatch, match="has shape"):
        load_into(model, {"0.weight": torch.zeros(3, 3)})
    load_into(model, ref)
    assert torch.equal(model[0].weight, ref["0.weight"])
