"""TimeCorrelatedTopK: the shared mask, its digest check, broadcast bytes, error feedback, resume, loop counts;
the mask comes only from the replies the server accepts, and decoding changes nothing."""

from __future__ import annotations

import pytest
import torch

from lightning_fed.codecs import DecodeArgs, EncodeArgs, MalformedMessage, Sign, TimeCorrelatedTopK
from lightning_fed.codecs.bits import ef_encode, ef_size
from lightning_fed.protocol import spec_of


def vec(seed: int, n: int = 200) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g)}


def send(c: TimeCorrelatedTopK, r: int, p: dict, state: dict | None = None, bc: bytes | None = None) -> bytes:
    """A client's message in round ``r``: it encodes against the broadcast it received (the server's, by default)."""
    return c.encode(p, {} if state is None else state, EncodeArgs(round=r, broadcast=c.broadcast(r) if bc is None else bc))


def receive(c: TimeCorrelatedTopK, r: int, msg: bytes, sender: int = 0) -> dict:
    return c.decode(msg, {}, DecodeArgs(round=r, sender=sender, spec=spec_of(vec(0))))


def test_first_round_has_no_mask_then_mask_is_top_of_accepted_sum():
    c = TimeCorrelatedTopK(ratio=0.05, mask_ratio=0.1)
    assert c.broadcast(0) == b"" and len(c.mask) == 0
    outs = [receive(c, 0, send(c, 0, vec(s)), s) for s in range(3)]
    total = sum(o["w"] for o in outs)
    c.accept(0, outs)
    want = torch.topk(total.abs(), 20).indices.sort().values  # 3 clients x 10 entries >= 20 non-zeros
    assert torch.equal(c.mask, want)
    # the broadcast is the mask's size and Elias-Fano code (what each sampled client receives)
    assert c.broadcast(1) == bytes([20]) + ef_encode(want, 200)


def test_values_sent_at_mask_without_index_bytes_plus_own_top_outside():
    c = TimeCorrelatedTopK(ratio=0.05, mask_ratio=0.1, error_feedback=False)
    c.accept(0, [receive(c, 0, send(c, 0, vec(1)))])
    p = vec(2)
    msg = send(c, 1, p)
    out = receive(c, 1, msg)["w"]
    x = p["w"]
    assert torch.equal(out[c.mask], x[c.mask])  # float32 values: exact at every mask position
    outside = torch.ones(200, dtype=torch.bool)
    outside[c.mask] = False
    top_out = torch.topk(torch.where(outside, x.abs(), torch.tensor(-1.0)), 10).indices
    assert torch.equal(out[top_out], x[top_out])
    assert int((out != 0).sum()) == len(c.mask) + 10
    # mask positions cost no index bytes: header 8 + digest 2 + varint 1 + EF(10 of 200) + 4 bytes per value
    assert len(msg) == 8 + 2 + 1 + ef_size(10, 200) + 4 * (len(c.mask) + 10)


def test_client_reads_the_mask_from_the_broadcast_only():
    """The client half uses the bytes it received, not the server's object: another codec object (a remote
    client) encodes the same message from the same broadcast."""
    server = TimeCorrelatedTopK(ratio=0.05, mask_ratio=0.1)
    server.accept(0, [receive(server, 0, send(server, 0, vec(1)))])
    remote = TimeCorrelatedTopK(ratio=0.05, mask_ratio=0.1)  # a fresh object: no mask of its own
    bc = server.broadcast(1)
    msg = send(remote, 1, vec(2), bc=bc)
    assert msg == send(server, 1, vec(2))
    assert torch.equal(receive(server, 1, msg)["w"], receive(server, 1, send(server, 1, vec(2)))["w"])
    assert send(remote, 1, vec(2), bc=b"") != msg  # without the broadcast it encodes against no mask…
    with pytest.raises(MalformedMessage, match="another global mask"):  # …which the server refuses
        receive(server, 1, send(remote, 1, vec(2), bc=b""))


def test_error_feedback_conserves_the_update():
    c = TimeCorrelatedTopK(ratio=0.03, mask_ratio=0.2, values=Sign(block=16, scale_dtype="float16"))
    state: dict = {}
    total_in, total_sent = torch.zeros(200), torch.zeros(200)
    for r in range(6):
        p = vec(10 + r)
        total_in += p["w"]
        out = receive(c, r, send(c, r, p, state))
        total_sent += out["w"]
        c.accept(r, [out])
    assert len(c.mask) > 0
    assert torch.allclose(total_sent + state["residual"], total_in, atol=1e-4)


def test_message_against_another_mask_is_rejected():
    c = TimeCorrelatedTopK(ratio=0.05, mask_ratio=0.1)
    stale = send(c, 0, vec(1))  # encoded against the empty mask of round 0
    c.accept(0, [receive(c, 0, send(c, 0, vec(2)))])
    with pytest.raises(MalformedMessage, match="another global mask"):
        receive(c, 1, stale)
    good = send(c, 1, vec(3))
    with pytest.raises(MalformedMessage):
        receive(c, 1, good[:-1])
    with pytest.raises(MalformedMessage):
        receive(c, 1, good + b"\x00")


def test_decode_alone_changes_nothing():
    """Decoding only reads the server's mask: the codec's state is the same after any number of decodes, so a
    reply decoded and then rejected leaves no trace."""
    c = TimeCorrelatedTopK(ratio=0.05, mask_ratio=0.1)
    c.accept(0, [receive(c, 0, send(c, 0, vec(1)))])
    before = c.state_dict()
    state: dict = {}
    for s in range(4):
        out = c.decode(send(c, 1, vec(10 + s)), state, DecodeArgs(round=1, sender=s, spec=spec_of(vec(0))))
        assert int((out["w"] != 0).sum()) > 0
    after = c.state_dict()
    assert state == {} and before.keys() == after.keys()
    assert torch.equal(before["mask"], after["mask"]) and before["mask_numel"] == after["mask_numel"]
    assert c.broadcast(2) == c.broadcast(1)


def test_rejected_or_dropped_replies_do_not_shape_the_next_mask():
    """The old decoder summed every vector it decoded: a reply decoded and then rejected (a NaN update, a reply
    a callback dropped) still moved the next mask. Now only the accepted replies do."""
    c = TimeCorrelatedTopK(ratio=0.1, mask_ratio=0.1)
    good = [receive(c, 0, send(c, 0, vec(s)), s) for s in range(3)]
    bad = vec(99)
    bad["w"] = bad["w"] * 1e3  # a huge reply: decoded fine, then rejected (norm check) or dropped by a callback
    bad_out = receive(c, 0, send(c, 0, bad), 3)
    nan = vec(98)
    nan["w"][5] = float("nan")  # a NaN reply decodes too (NaN values); validation rejects it
    receive(c, 0, send(c, 0, nan), 4)
    c.accept(0, good)  # the server aggregates only the good replies
    total = sum(o["w"] for o in good)
    k = min(int((total != 0).sum()), 20)
    want = torch.topk(total.abs(), k).indices.sort().values
    assert torch.equal(c.mask, want)
    with_bad = torch.topk((total + bad_out["w"]).abs(), k).indices.sort().values
    assert not torch.equal(with_bad, want)  # the rejected reply would have moved the mask


def test_a_round_without_accepted_replies_keeps_the_mask():
    c = TimeCorrelatedTopK(ratio=0.05, mask_ratio=0.1)
    c.accept(0, [receive(c, 0, send(c, 0, vec(1)))])
    mask, bc = c.mask.clone(), c.broadcast(1)
    receive(c, 1, send(c, 1, vec(2)))  # decoded, then every reply of the round rejected
    c.accept(1, [])
    assert torch.equal(c.mask, mask) and c.broadcast(2) == bc


def test_state_dict_resumes_the_same_mask():
    a = TimeCorrelatedTopK(ratio=0.05, mask_ratio=0.1)
    a.accept(0, [receive(a, 0, send(a, 0, vec(1)))])
    b = TimeCorrelatedTopK(ratio=0.05, mask_ratio=0.1)
    b.load_state_dict(a.state_dict())  # a checkpoint between rounds
    assert torch.equal(a.mask, b.mask) and a.broadcast(1) == b.broadcast(1)
    msg = send(a, 1, vec(2))
    assert torch.equal(receive(a, 1, msg)["w"], receive(b, 1, msg)["w"])


def test_bad_settings_rejected():
    with pytest.raises(ValueError, match="mask_ratio=1.5"):
        TimeCorrelatedTopK(mask_ratio=1.5)
    with pytest.raises(ValueError, match="ratio=0"):
        TimeCorrelatedTopK(ratio=0)


def test_loop_counts_mask_bytes_downlink(tmp_path):
    from lightning_fed import FedLoop
    from lightning_fed.callbacks import FedCallback
    from lightning_fed.data import IID, MNIST1DDataModule
    from lightning_fed.models import MNIST1DMLP

    class Seen(FedCallback):
        def __init__(self):
            self.sent = {}

        def on_round_start(self, trainer, pl_module, instructions):
            self.sent[trainer.fed.round] = codec.broadcast(trainer.fed.round)

    torch.manual_seed(0)
    codec = TimeCorrelatedTopK(ratio=0.01, mask_ratio=0.1)
    seen = Seen()
    loop = FedLoop(num_clients=4, clients_per_round=2, rounds=2, local_epochs=1, partition=IID(), codec=codec,
                   eval_every=2, checkpoint_every=0, output_dir=str(tmp_path), verbose=False, plot=False, loggers=[],
                   callbacks=[seen])
    dm = MNIST1DDataModule(batch_size=64, num_samples=400)
    res = loop.fit(MNIST1DMLP(hidden=16), dm)
    h0, h1 = res.history
    assert h0["rejected"] == 0 and h1["rejected"] == 0
    mask_bytes = h1["bytes_down"] - h0["bytes_down"]  # same model both rounds: the difference is the mask
    # round 1's mask (built from round 0's accepted replies) to each of 2 clients; round 0 has none
    assert seen.sent[0] == b"" and mask_bytes > 0 and mask_bytes == 2 * len(seen.sent[1])


def test_in_fedloop_a_rejected_reply_does_not_shape_the_next_mask(tmp_path):
    """A whole run: client 0's reply is huge (rejected by max_update_abs after decoding); the mask the clients get
    in the next round is the top of the sum of the round's accepted replies only."""
    from lightning_fed import FedLoop
    from lightning_fed.callbacks import FedCallback
    from lightning_fed.data import IID, MNIST1DDataModule
    from lightning_fed.models import MNIST1DMLP

    class Huge(FedCallback):
        def on_client_end(self, trainer, pl_module, reply):
            if trainer.fed.client_id == 0 and trainer.fed.round == 0:
                for v in reply.payload.values():
                    v.mul_(1e6)

    class Record(FedCallback):
        def __init__(self):
            self.accepted, self.sent = {}, {}

        def on_round_start(self, trainer, pl_module, instructions):
            self.sent[trainer.fed.round] = codec.broadcast(trainer.fed.round)

        def on_aggregate_start(self, trainer, pl_module, replies):
            self.accepted[trainer.fed.round] = [{k: v.clone() for k, v in r.payload.items()} for r in replies]

    torch.manual_seed(0)
    codec = TimeCorrelatedTopK(ratio=0.02, mask_ratio=0.1)
    rec = Record()
    loop = FedLoop(num_clients=3, clients_per_round=3, rounds=2, local_epochs=1, partition=IID(), codec=codec,
                   max_update_abs=100.0, eval_every=2, checkpoint_every=0, output_dir=str(tmp_path), verbose=False,
                   plot=False, loggers=[], callbacks=[Huge(), rec])
    res = loop.fit(MNIST1DMLP(hidden=16), MNIST1DDataModule(batch_size=64, num_samples=400))
    assert res.history[0]["rejected"] == 1 and res.history[0]["good"] == 2
    ref = TimeCorrelatedTopK(ratio=0.02, mask_ratio=0.1)
    ref.accept(0, rec.accepted[0])  # the two accepted replies of round 0
    assert rec.sent[1] == ref.broadcast(1) != b""  # round 1's clients got exactly that mask
