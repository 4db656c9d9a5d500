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
