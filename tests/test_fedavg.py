import pytest
import torch
from torch import nn

from lightning_fed.protocol import Instruction, Reply
from lightning_fed.strategies import FedAvg
from lightning_fed.strategies.aggregate import example_weights, weighted_sum_


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_example_weights_by_hand():
    assert example_weights([1, 3]) == [0.25, 0.75]
    with pytest.raises(ValueError):
        example_weights([])


def test_weighted_sum_by_hand():
    out = torch.empty(2)
    weighted_sum_(out, [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])], [0.25, 0.75])
    assert torch.allclose(out, torch.tensor([2.5, 5.0]))


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_fedavg_aggregates_weighted_deltas(server_lr):
    model = _model()
    s = FedAvg(server_lr=server_lr)
    s.setup(model)
    g0 = {k: v.clone() for k, v in s.global_payload().items()}
    assert "1.num_batches_tracked" not in g0  # integer buffers are local
    ins = s.configure_round(0, [0, 1])
    d1 = {k: torch.full_like(v, 1.0) for k, v in g0.items()}
    d2 = {k: torch.full_like(v, 5.0) for k, v in g0.items()}
    s.aggregate(0, [Reply(0, d1, 30), Reply(1, d2, 10)])
    for k, v in s.global_payload().items():
        assert torch.allclose(v, g0[k] + server_lr * 2.0)  # (30*1 + 10*5) / 40 = 2
    assert ins[0].payload is ins[1].payload  # one shared downlink payload


def test_client_reply_is_a_delta_and_load_global_writes_in_place():
    model = _model()
    s = FedAvg()
    s.setup(model)
    instr = s.configure_round(0, [0])[0]
    received = {k: v.clone() for k, v in instr.payload.items()}
    with torch.no_grad():
        model[0].weight.add_(0.5)
    delta = s.client_reply(model, Instruction(0, received))
    assert torch.allclose(delta["0.weight"], torch.full((2, 3), 0.5))
    assert torch.count_nonzero(delta["0.bias"]) == 0
    ptr = model[0].weight.data_ptr()
    s.load_global(model)
    assert model[0].weight.data_ptr() == ptr and torch.allclose(model[0].weight, received["0.weight"])


def test_state_dict_roundtrip_and_mismatch():
    s = FedAvg()
    s.setup(_model())
    state = s.state_dict()
    s2 = FedAvg()
    s2.setup(_model())
    s2.load_state_dict(state)
    assert torch.equal(s2.global_flat, s.global_flat)
    s3 = FedAvg()
    s3.setup(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="does not match"):
        s3.load_state_dict(state)


def test_bad_server_lr():
    with pytest.raises(ValueError, match="server_lr must be > 0"):
        FedAvg(server_lr=0)
