"""Downlink delta coding: each client receives the change to the model it last received, through an inner codec;
the server's and the client's references stay identical across dropouts, failures and resume."""

import pytest
import torch
from safetensors.torch import load_file

from lightning_fed.codecs import Blockwise4bit, Blockwise8bit, DownlinkDelta, Identity, MalformedMessage
from lightning_fed.codecs.base import DecodeArgs, EncodeArgs
from lightning_fed.protocol import spec_of
from lightning_fed.systems import ClientProfiles, SimulatedClock


def _models(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {
        "a.weight": torch.randn(64, 32, generator=g),
        "a.bias": torch.randn(64, generator=g),
        "steps": torch.tensor([3], dtype=torch.int64),
    }
    out = []
    for _ in range(n):
        w = {
            k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 1)
            for k, v in w.items()
        }
        out.append(w)
    return out


def test_server_and_client_references_stay_identical():
    codec = DownlinkDelta(Blockwise8bit())
    server, client = {}, {}
    errs = []
    for r, w in enumerate(_models()):
        msg = codec.encode(w, server, EncodeArgs(round=r))
        got = codec.decode(msg, client, DecodeArgs(round=r, spec=spec_of(w)))
        assert list(got) == list(w) and torch.equal(
            got["steps"], w["steps"]
        )  # integer entries travel as they are
        for k in server["reference"]:
            assert torch.equal(server["reference"][k], client["reference"][k])
            assert torch.equal(got[k], client["reference"][k])
        errs.append(float((got["a.weight"] - w["a.weight"]).abs().max()))
    # the first message quantizes the weights, the later ones only the small change: a far smaller error
    assert max(errs[1:]) < errs[0] / 10


def test_delta_beats_quantizing_the_weights_at_the_same_bytes():
    models = _models(6)
    plain, delta = Blockwise4bit(), DownlinkDelta(Blockwise4bit())
    server, client = {}, {}
    for r, w in enumerate(models):
        m_delta = delta.encode(w, server, EncodeArgs(round=r))
        got_delta = delta.decode(m_delta, client, DecodeArgs(round=r, spec=spec_of(w)))
        m_plain = plain.encode(w, {}, EncodeArgs(round=r))
        got_plain = plain.decode(m_plain, {}, DecodeArgs(round=r, spec=spec_of(w)))
    assert len(m_delta) < len(m_plain) + 400  # the frame and the digest
    err = lambda got: float((got["a.weight"] - models[-1]["a.weight"]).norm())
    assert err(got_delta) < err(got_plain) / 5


def test_a_receiver_with_another_reference_refuses_the_message():
    codec = DownlinkDelta(Identity())
    w0, w1 = _models(2)
    server, client = {}, {}
    codec.decode(codec.encode(w0, server), client, DecodeArgs(spec=spec_of(w0)))
    with pytest.raises(MalformedMessage, match="coded against reference"):
        codec.decode(codec.encode(w1, server), {}, DecodeArgs(spec=spec_of(w1)))
    with pytest.raises(ValueError, match="DownlinkDelta: inner=DownlinkDelta is not allowed"):
        DownlinkDelta(DownlinkDelta())


def _loop(make_loop, tmp_path, **kw):
    rows = "client_id,flops_per_s,up_bps,down_bps,dropout\n" + "".join(
        f"{c},1e9,1e6,1e6,0.5\n" for c in range(4)
    )
    (tmp_path / "p.csv").write_text(rows)
    clock = SimulatedClock(profiles=ClientProfiles(csv=str(tmp_path / "p.csv")))
    return make_loop(
        num_clients=4, clients_per_round=4, downlink_codec=DownlinkDelta(Blockwise8bit()), clock=clock, **kw
    )


def test_dropouts_keep_both_references_in_step_and_resume_is_exact(tmp_path, make_loop, small_dm):
    from conftest import seeded

    from lightning_fed.models import MNIST1DMLP

    # half the clients drop out of each round: a reference advanced on one side only would be refused
    full = _loop(make_loop, tmp_path, rounds=4, checkpoint_every=1, output_dir=str(tmp_path / "full"))
    res = full.fit(seeded(MNIST1DMLP), small_dm)
    assert sum(h["sim_dropouts"] for h in res.history) >= 2
    first, later = res.history[0], res.history[-1]
    assert later["bytes_down"] / later["raw_bytes_down"] < 0.3  # 8-bit codes of the deltas
    assert first["bytes_down"] > 0
    part = _loop(make_loop, tmp_path, rounds=2, checkpoint_every=1, output_dir=str(tmp_path / "part"))
    done = part.fit(seeded(MNIST1DMLP), small_dm)
    resumed = _loop(make_loop, tmp_path, rounds=4, checkpoint_every=1, output_dir=str(tmp_path / "part")).fit(
        seeded(MNIST1DMLP), small_dm, resume=str(done.run_dir)
    )
    a, b = load_file(res.run_dir / "final.safetensors"), load_file(resumed.run_dir / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["bytes_down"] for h in res.history] == [h["bytes_down"] for h in resumed.history]
