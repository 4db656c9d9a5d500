"""FedGKT: features/logits/labels payloads, server KD, client KD, malformed replies."""

from __future__ import annotations

import math

import pytest
import torch
from _distill_common import Corrupt, Spy, cnn, fit_rejected, tiny_dm, tiny_loop, trainer

from lightning_fed.protocol import Reply
from lightning_fed.strategies import FedGKT, ModelTiers
from lightning_fed.strategies.fedgkt import GKTClient, GKTComposed, GKTConvServer, GKTServerModel
from lightning_fed.weights import load_into


def test_fedgkt_heterogeneous_run_payload_shapes(tmp_path):
    torch.manual_seed(0)
    spy = Spy()
    tiers = ModelTiers(models=[cnn(6)])
    s = FedGKT(tiers=tiers, server_hidden=32, server_epochs=1, eval_clients=2)
    loop, dm, default = tiny_loop(tmp_path, s, rounds=3, callbacks=[spy]), tiny_dm(), cnn(4)
    res = loop.fit(default, dm)
    shapes = {0: (4, 19), 1: (6, 19)}  # [channels, length] after the first convolution (split=1, the default)
    assert s.feature_shapes == [shapes[0], shapes[1]]
    for cid, p in spy.replies:
        n = len(loop.shards[cid])
        assert p == {"features": ((n, *shapes[tiers.tier_of(cid)]), torch.float32),
                     "logits": ((n, 10), torch.float32), "labels": ((n,), torch.int64)}
    # server logits come back to clients that sent features before
    assert any("server_logits" in keys for _, keys in spy.instructions)
    for cid, logits in s.server_logits.items():
        assert logits.shape == (len(loop.shards[cid]), 10)
    last = res.history[-1]
    assert last["rejected"] == 0 and last["gkt_rejected"] == 0
    assert "server/test_acc" in last and "clients/test_acc" in last
    # clients/test_acc: mean test accuracy of the stored client models; server/test_acc: the server model on those
    # clients' extractors (split inference); <= 2 clients per tier, so every stored client is evaluated
    x, y = dm.test_set.tensors
    last_clients = [cid for cid, _ in spy.replies[-2:]]
    accs, server_accs = [], []
    for cid in sorted(loop.store.ids()):
        tier = tiers.tier_of(cid)
        m = tiers.module(tier, default).eval()
        state = loop.store.load(cid)
        load_into(m, state["model"])
        assert not torch.equal(m.state_dict()["head.weight"], s._initial(tier)["head.weight"])  # it trained
        with torch.no_grad():
            accs.append((m(x).argmax(1) == y).float().mean().item())
            server_accs.append((s.server(s.extract(m, x), tier).argmax(1) == y).float().mean().item())
            if cid in last_clients:  # the server logits it gets next are the server model's on the features it sent
                assert torch.allclose(s.server_logits[cid], s.server(s.extract(m, state["gkt_x"]), tier), atol=1e-5)
    assert len(accs) == 3
    assert last["clients/test_acc"] == pytest.approx(sum(accs) / len(accs), abs=1e-6)
    assert last["server/test_acc"] == pytest.approx(sum(server_accs) / len(server_accs), abs=1e-6)
    # the last round's uplink is exactly its replies' features, logits and int64 labels (+ safetensors headers)
    raw = sum(len(loop.shards[cid]) * (math.prod(shapes[tiers.tier_of(cid)]) * 4 + 10 * 4 + 8) for cid in last_clients)
    assert last["raw_bytes_up"] == raw and raw <= last["bytes_up"] < raw + 2 * 400


def test_inconsistent_rows_and_labels_rejected_in_aggregate():
    s = FedGKT(server_hidden=8, server_epochs=1)
    s.setup(cnn(4))
    f = s.feature_shapes[0]
    good = Reply(0, {"features": torch.randn(5, *f), "logits": torch.randn(5, 10), "labels": torch.arange(5)}, 5)
    rows = Reply(1, {"features": torch.randn(4, *f), "logits": torch.randn(5, 10), "labels": torch.arange(5)}, 5)
    labels = Reply(2, {"features": torch.randn(5, *f), "logits": torch.randn(5, 10), "labels": torch.arange(5) + 8}, 5)
    m = s.aggregate(0, [good, rows, labels])
    assert m["gkt_rejected"] == 2 and set(s.server_logits) == {0}


def test_malformed_features_rejected_by_loop(tmp_path):
    s = FedGKT(server_hidden=8, server_epochs=1)
    bad = Corrupt("features", lambda t: t[:, :-1])
    history = fit_rejected(tiny_loop(tmp_path / "a", s, callbacks=[bad]), cnn(4), tiny_dm())
    assert [h["rejected"] for h in history] == [2, 2]
    bad_dtype = Corrupt("labels", lambda t: t.float())
    history = fit_rejected(tiny_loop(tmp_path / "b", FedGKT(server_hidden=8), callbacks=[bad_dtype]), cnn(4),
                           tiny_dm())
    assert [h["rejected"] for h in history] == [2, 2]


def test_gkt_client_under_trainer_collects_and_distils():
    torch.manual_seed(0)
    dm = tiny_dm()
    dm.setup()
    x_all = dm.train_set.tensors[0]
    cb = GKTClient(alpha=1.0, temperature=3.0)
    cb.set_server_logits(x_all, torch.zeros(len(x_all), 10).index_fill_(1, torch.tensor([3]), 10.0))
    t = trainer(batches=None, epochs=2)
    t.callbacks.append(cb)
    model = cnn(4)
    t.fit(model, dm)
    x, y = cb.collected
    assert x.shape == (400, 40) and y.shape == (400,)  # the last epoch's samples, each once
    assert sorted(map(tuple, x.tolist())) == sorted(map(tuple, x_all.tolist()))
    # strong KD toward class 3 shows in the predictions
    assert (model(x_all).argmax(1) == 3).float().mean() > 0.3


def test_fedgkt_needs_a_splittable_model():
    from lightning_fed.models import MNIST1DMLP

    with pytest.raises(ValueError, match=r"extract\(x, split\)"):
        FedGKT().setup(MNIST1DMLP(hidden=8))
    with pytest.raises(ValueError, match="features"):
        FedGKT(split=None).setup(MNIST1DMLP(hidden=8))
    with pytest.raises(ValueError, match="split=4 is not allowed"):
        FedGKT(split=4).setup(cnn(4))
    with pytest.raises(ValueError, match="server_hidden=0"):
        FedGKT(server_hidden=0)
    with pytest.raises(ValueError, match="server_channels=0"):
        FedGKT(server_channels=0)


@pytest.mark.parametrize("split", [1, 2, 3])
def test_mnist1dcnn_split_halves_compose_to_forward(split):
    torch.manual_seed(0)
    model = cnn(5)
    x = torch.randn(3, 40)
    h = model.extract(x, split)
    assert tuple(h.shape[1:]) == model.extract_shape(split)
    torch.testing.assert_close(model.classify(h, split), model(x))


def test_split_inference_is_extractor_then_server():
    torch.manual_seed(0)
    s = FedGKT(tiers=ModelTiers(models=[cnn(6)]), server_channels=8, server_hidden=16)
    small, large = cnn(4), s.tiers.models[0]
    s.setup(small)
    assert isinstance(s.server, GKTConvServer) and s.feature_shapes == [(4, 19), (6, 19)]
    x = torch.randn(3, 40)
    composed = GKTComposed(large, s.server, 1, s.extract)
    torch.testing.assert_close(composed(x), s.server(large.extract(x, 1), 1))
    s.server(small.extract(x, 1), 0).sum().backward()  # each tier's maps go through its own adapter
    assert s.server.adapters[0].weight.grad is not None and s.server.adapters[1].weight.grad is None


def test_split_none_uses_flat_features_and_mlp_server(tmp_path):
    torch.manual_seed(0)
    spy = Spy()
    s = FedGKT(split=None, server_hidden=8, server_epochs=1)
    loop = tiny_loop(tmp_path, s, callbacks=[spy])
    loop.fit(cnn(4), tiny_dm())
    assert isinstance(s.server, GKTServerModel) and s.feature_shapes == [(4 * 5,)]
    for cid, p in spy.replies:
        assert p["features"] == ((len(loop.shards[cid]), 20), torch.float32)


def test_feature_cache_trains_server_on_clients_that_sat_out():
    """With the cache, round 2's server pass also uses client 0's round-1 features; without it, only round 2's."""
    def reply(cid: int, n: int, f: int) -> Reply:
        g = torch.Generator().manual_seed(cid)
        return Reply(cid, {"features": torch.randn(n, *f, generator=g), "logits": torch.randn(n, 10, generator=g),
                           "labels": torch.randint(0, 10, (n,), generator=g)}, n)

    seen: dict[bool, list[int]] = {}
    for cache in (True, False):
        s = FedGKT(server_hidden=8, server_epochs=1, server_batch_size=4, feature_cache=cache)
        s.setup(cnn(4))
        f = s.feature_shapes[0]
        s.aggregate(0, [reply(0, 6, f)])
        rows: list[int] = []

        def count(_m, inp, _o, rows=rows):
            rows.append(len(inp[0]))

        hook = s.server.adapters[0].register_forward_hook(count)
        s.aggregate(1, [reply(1, 5, f)])
        hook.remove()
        seen[cache] = rows
        assert set(s.server_logits) == {0, 1}  # round 1's logits stay (with the cache: refreshed)
        if cache:
            state = s.state_dict()
            s2 = FedGKT(server_hidden=8, server_epochs=1, server_batch_size=4)
            s2.setup(cnn(4))
            s2.load_state_dict(state)
            assert set(s2.cache) == {0, 1} and torch.equal(s2.cache[0]["features"], s.cache[0]["features"])
    # training batches (4 + 2 rows from client 0, 4 + 1 from client 1) then the logits pass over both clients
    assert sum(seen[True][:-2]) == 11 and seen[True][-2:] == [6, 5]
    assert sum(seen[False][:-1]) == 5 and seen[False][-1:] == [5]
