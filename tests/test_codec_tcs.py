"""TimeCorrelatedTopK: the shared mask, its digest check, broadcast bytes, error feedback, resume, loop counts."""

from __future__ import annotations

import pytest
import torch

from lightning_fed.codecs import MalformedMessage, Sign, TimeCorrelatedTopK
from lightning_fed.codecs.bits import ef_encode
from lightning_fed.protocol import spec_of


def vec(seed: int, n: int = 200) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g)}


def test_first_round_has_no_mask_then_mask_is_top_of_decoded_sum():
    c = TimeCorrelatedTopK(ratio=0.05, mask_ratio=0.1)
    spec = spec_of(vec(0))
    c.on_round_start(0)
    assert c.broadcast() == b"" and len(c.mask) == 0
    outs = [c.decode(c.encode(vec(s), {}), spec=spec)["w"] for s in range(3)]
    total = sum(outs)
    c.on_round_start(1)
    want = torch.topk(total.abs(), 20).indices.sort().values  # 3 clients x 10 entries >= 20 non-zeros
    assert torch.equal(c.mask, want)
    # the broadcast is the mask's size and Elias-Fano code (what each sampled client receives)
    assert c.broadcast() == bytes([20]) + ef_encode(want, 200)


def test_values_sent_at_mask_without_index_bytes_plus_own_top_outside():
    c = TimeCorrelatedTopK(ratio=0.05, mask_ratio=0.1, error_feedback=False)
    spec = spec_of(vec(0))
    c.on_round_start(0)
    c.decode(c.encode(vec(1), {}), spec=spec)
    c.on_round_start(1)
    p = vec(2)
    msg = c.encode(p, {})
    out = c.decode(msg, spec=spec)["w"]
    x = p["w"]
    assert torch.equal(out[c.mask], x[c.mask])  # float32 values: exact at every mask position
    outside = torch.ones(200, dtype=torch.bool)
    outside[c.mask] = False
    top_out = torch.topk(torch.where(outside, x.abs(), torch.tensor(-1.0)), 10).indices
    assert torch.equal(out[top_out], x[top_out])
    assert int((out != 0).sum()) == len(c.mask) + 10
    # mask positions cost no index bytes: header 8 + digest 2 + varint 1 + EF(10 of 200) + 4 bytes per value
    from lightning_fed.codecs.bits import ef_size

    assert len(msg) == 8 + 2 + 1 + ef_size(10, 200) + 4 * (len(c.mask) + 10)


def test_error_feedback_conserves_the_update():
    c = TimeCorrelatedTopK(ratio=0.03, mask_ratio=0.2, values=Sign(block=16, scale_dtype="float16"))
    spec = spec_of(vec(0))
    state: dict = {}
    total_in, total_sent = torch.zeros(200), torch.zeros(200)
    for r in range(6):
        c.on_round_start(r)
        p = vec(10 + r)
        total_in += p["w"]
        total_sent += c.decode(c.encode(p, state), spec=spec)["w"]
    assert torch.allclose(total_sent + state["residual"], total_in, atol=1e-4)


def test_message_against_another_mask_is_rejected():
    c = TimeCorrelatedTopK(ratio=0.05, mask_ratio=0.1)
    spec = spec_of(vec(0))
    c.on_round_start(0)
    stale = c.encode(vec(1), {})  # encoded against the empty mask of round 0
    c.decode(c.encode(vec(2), {}), spec=spec)
    c.on_round_start(1)
    with pytest.raises(MalformedMessage, match="another global mask"):
        c.decode(stale, spec=spec)
    good = c.encode(vec(3), {})
    with pytest.raises(MalformedMessage):
        c.decode(good[:-1], spec=spec)
    with pytest.raises(MalformedMessage):
        c.decode(good + b"\x00", spec=spec)


def test_state_dict_resumes_the_same_mask():
    spec = spec_of(vec(0))
    a = TimeCorrelatedTopK(ratio=0.05, mask_ratio=0.1)
    a.on_round_start(0)
    a.decode(a.encode(vec(1), {}), spec=spec)
    b = TimeCorrelatedTopK(ratio=0.05, mask_ratio=0.1)
    b.load_state_dict(a.state_dict())  # a checkpoint between decoding and the next round
    a.on_round_start(1)
    b.on_round_start(1)
    assert torch.equal(a.mask, b.mask) and a.broadcast() == b.broadcast()


def test_bad_settings_rejected():
    with pytest.raises(ValueError, match="mask_ratio=1.5"):
        TimeCorrelatedTopK(mask_ratio=1.5)
    with pytest.raises(ValueError, match="ratio=0"):
        TimeCorrelatedTopK(ratio=0)


def test_loop_counts_mask_bytes_downlink(tmp_path):
    from lightning_fed import FedLoop
    from lightning_fed.data import IID, MNIST1DDataModule
    from lightning_fed.models import MNIST1DMLP

    torch.manual_seed(0)
    codec = TimeCorrelatedTopK(ratio=0.01, mask_ratio=0.1)
    loop = FedLoop(num_clients=4, clients_per_round=2, rounds=2, local_epochs=1, partition=IID(), codec=codec,
                   eval_every=2, checkpoint_every=0, output_dir=str(tmp_path), verbose=False, plot=False, loggers=[])
    dm = MNIST1DDataModule(batch_size=64, num_samples=400)
    res = loop.fit(MNIST1DMLP(hidden=16), dm)
    h0, h1 = res.history
    assert h0["rejected"] == 0 and h1["rejected"] == 0
    mask_bytes = h1["bytes_down"] - h0["bytes_down"]  # same model both rounds: the difference is the mask
    assert mask_bytes > 0 and mask_bytes == 2 * len(codec.broadcast())  # round 2's mask, to each of 2 clients
