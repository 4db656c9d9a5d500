"""Safe server defaults without any configured defence: a reply is weighted by the client's partition size at
most, never by its own claim, and a reply whose norm is far outside the round's is rejected."""

import torch
from conftest import seeded

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.codecs.base import Identity
from lightning_fed.models import MNIST1DCNN
from lightning_fed.protocol import ClientMessage, Instruction, Reply
from lightning_fed.server import Collected, Server, payload_norm
from lightning_fed.store import ClientStore
from lightning_fed.strategies import FedAvg


class Hostile(FedCallback):
    """Client ``cid`` claims ``claim`` training examples and scales its update by ``scale``."""

    def __init__(self, cid=0, claim=10**9, scale=1e6):
        self.cid, self.claim, self.scale = cid, claim, scale

    def on_client_end(self, trainer, pl_module, reply: Reply) -> None:
        if trainer.fed.client_id == self.cid:
            reply.num_examples = self.claim
            for v in reply.payload.values():
                v.mul_(self.scale)


def _weights(result_dir):
    from safetensors.torch import load_file

    return load_file(str(result_dir / "final.safetensors"))


def test_scaled_reply_claiming_a_billion_examples_is_rejected(make_loop, small_dm):
    loop = make_loop(num_clients=5, clients_per_round=5, rounds=3, callbacks=[Hostile()])
    result = loop.fit(seeded(MNIST1DCNN), small_dm)
    assert [h["skipped"] for h in result.history] == [0, 0, 0]
    assert [h["rejected"] for h in result.history] == [1, 1, 1]
    assert all(v.abs().max() < 10 for v in _weights(result.run_dir).values())
    assert all(h["update_norm"] < 10 for h in result.history)  # only the honest clients moved the model


def test_an_inflated_claim_alone_is_weighted_at_the_partition_size(make_loop, small_dm, tmp_path):
    honest = make_loop(num_clients=4, clients_per_round=4, rounds=2, output_dir=str(tmp_path / "h")).fit(
        seeded(MNIST1DCNN), small_dm)
    claim = make_loop(num_clients=4, clients_per_round=4, rounds=2, output_dir=str(tmp_path / "c"),
                      callbacks=[Hostile(cid=2, scale=1.0)]).fit(seeded(MNIST1DCNN), small_dm)
    a, b = _weights(honest.run_dir), _weights(claim.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the claim changed nothing: the partition size was used
    assert [h["rejected"] for h in claim.history] == [0, 0]


def _server(tmp_path, ratio=50.0, trusted=None):
    model = torch.nn.Linear(2, 1)
    strategy = FedAvg()
    strategy.setup(model)
    return Server(strategy, Identity(), ClientStore(tmp_path / "s"), max_norm_ratio=ratio, trusted_examples=trusted,
                  fold=False), model


def _message(model, cid, scale, n=10):
    payload = {k: torch.full_like(v, float(scale)) for k, v in model.state_dict().items()}
    return ClientMessage(cid, Identity().encode(payload, {}, _args()), n)


def _args():
    from lightning_fed.codecs.base import EncodeArgs

    return EncodeArgs(round=0, share=1.0, broadcast={})


def test_norm_outlier_rejected_against_the_median(tmp_path):
    server, model = _server(tmp_path)
    msgs = [_message(model, 0, 1.0), _message(model, 1, 1.2), _message(model, 2, 100.0), _message(model, 3, 0.8)]
    got: Collected = server.collect(0, [Instruction(c, {}) for c in range(4)], msgs)
    assert [r.client_id for r in got.replies] == [0, 1, 3]
    assert got.stats["rejected"] == 1 and "client 2 rejected: its norm" in got.reasons[0]
    assert abs(got.stats["norm_ratio"] - 100 / 1.1) < 1e-3  # 100 against the median of (0.8, 1, 1.2, 100) = 1.1
    server, model = _server(tmp_path, ratio=None)
    msgs = [_message(model, c, s) for c, s in enumerate([1.0, 1.2, 100.0])]
    assert len(server.collect(0, [Instruction(c, {}) for c in range(3)], msgs).replies) == 3  # check disabled


def test_two_replies_are_never_judged_by_norm(tmp_path):
    server, model = _server(tmp_path)
    msgs = [_message(model, 0, 1.0), _message(model, 1, 1e6)]
    assert len(server.collect(0, [Instruction(c, {}) for c in range(2)], msgs).replies) == 2


def test_claims_are_capped_and_non_positive_claims_still_rejected(tmp_path):
    server, model = _server(tmp_path, trusted=lambda cid: 7)
    msgs = [_message(model, 0, 1.0, n=10**9), _message(model, 1, 1.0, n=3), _message(model, 2, 1.0, n=0)]
    got = server.collect(0, [Instruction(c, {}) for c in range(3)], msgs)
    assert [(r.client_id, r.num_examples) for r in got.replies] == [(0, 7), (1, 3)]
    assert got.stats["rejected"] == 1 and "client 2 rejected" in got.reasons[0]  # not a positive count


def test_payload_norm_skips_integer_entries():
    assert payload_norm({"a": torch.tensor([3.0, 4.0]), "idx": torch.tensor([100, 200])}) == 5.0


def test_the_fold_measures_the_same_norms(tmp_path):
    """With the fold (the default FedAvg path) the norms come from the pass that adds the replies."""
    ratios = []
    for fold in (False, True):
        server, model = _server(tmp_path / str(fold))
        server.fold = fold
        msgs = [_message(model, c, s) for c, s in enumerate([1.0, 1.2, 100.0, 0.8])]
        got = server.collect(0, [Instruction(c, {}) for c in range(4)], msgs)
        assert [r.client_id for r in got.replies] == [0, 1, 3]
        ratios.append(got.stats["norm_ratio"])
    assert abs(ratios[0] - ratios[1]) < 1e-4
