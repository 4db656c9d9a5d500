"""FedGen: payloads, the server generator, the client regulariser, refusal of heterogeneous tiers."""

from __future__ import annotations

import pytest
import torch
from _distill_common import Corrupt, Spy, cnn, fit_rejected, tiny_dm, tiny_loop, trainer

from lightning_fed.protocol import Reply
from lightning_fed.strategies import FedGen, ModelTiers
from lightning_fed.strategies.fedgen import FedGenClient, LatentGenerator
from lightning_fed.weights import float_state, load_into


def test_fedgen_run_payload_shapes(tmp_path):
    torch.manual_seed(0)
    spy = Spy()
    s = FedGen(gen_steps=5)
    model, dm = cnn(4), tiny_dm()
    initial = {k: v.detach().clone() for k, v in float_state(model).items()}
    loop = tiny_loop(tmp_path, s, rounds=2, callbacks=[spy])
    res = loop.fit(model, dm)
    weights = {f"w/{k}": (tuple(v.shape), torch.float32) for k, v in float_state(cnn(4)).items()}
    for _, p in spy.replies:
        assert p == {**weights, "label_counts": ((10,), torch.float32)}
    first, later = spy.instructions[0][1], spy.instructions[-1][1]
    assert first == set(weights)  # no generator before the first aggregation
    assert "label_dist" in later and any(k.startswith("g/") for k in later)
    assert res.history[-1]["fedgen_rejected"] == 0 and "generator_loss" in res.history[-1]
    last = res.history[-1]
    # test_acc is the accuracy of the averaged global weights, which moved from the initial ones
    g = s.avg.payload()
    assert any(not torch.equal(g[k], initial[k]) for k in g)
    check = cnn(4)
    load_into(check, g)
    x, y = dm.test_set.tensors
    with torch.no_grad():
        acc = (check.eval()(x).argmax(1) == y).float().mean().item()
    assert last["test_acc"] == pytest.approx(acc, abs=1e-6)
    # the server's label counts (the generator's label distribution) are the labels of every reply's shard:
    # one local epoch sees each of the client's samples once
    labels = dm.train_set.tensors[1]
    expected = sum(torch.bincount(labels[loop.shards[cid]], minlength=10) for cid, _ in spy.replies)
    assert torch.equal(s.label_counts, expected.float())
    # uplink: weight deltas + 10 float32 label counts per client; downlink: weights + the generator + label_dist
    w = sum(v.numel() * 4 for v in initial.values())
    gen = sum(v.numel() * v.element_size() for v in s.generator.state_dict().values())
    assert last["raw_bytes_up"] == 2 * (w + 10 * 4)
    assert last["raw_bytes_down"] == 2 * (w + gen + 10 * 4)


def test_label_counts_sum_to_local_examples(tmp_path):
    spy = []

    class Keep(Corrupt):
        def on_client_end(self, trainer, pl_module, reply):
            spy.append((reply.num_examples, float(reply.payload["label_counts"].sum())))

    tiny_loop(tmp_path, FedGen(gen_steps=1), rounds=1, callbacks=[Keep("x", None)]).fit(cnn(4), tiny_dm())
    assert spy and all(n == c for n, c in spy)


def test_generator_learns_to_fool_the_heads():
    torch.manual_seed(0)
    s = FedGen(gen_steps=0)
    model = cnn(4)
    s.setup(model)
    base = s.avg.payload()
    replies = [Reply(c, {**{f"w/{k}": 0.1 * torch.randn_like(v) for k, v in base.items()},
                          "label_counts": torch.ones(10) * (c + 1)}, 10) for c in range(3)]
    heads = [(base["head.weight"] + r.payload["w/head.weight"], base["head.bias"] + r.payload["w/head.bias"])
             for r in replies]
    counts = torch.stack([r.payload["label_counts"] for r in replies])
    s.gen_steps = 1
    first = s._train_generator(s.generator, heads, counts, 0)
    s.gen_steps = 200
    s._train_generator(s.generator, heads, counts, 1)
    s.gen_steps = 1
    last = s._train_generator(s.generator, heads, counts, 2)
    assert last < first


def test_negative_label_counts_dropped():
    s = FedGen(gen_steps=1)
    s.setup(cnn(2))
    zeros = {f"w/{k}": torch.zeros_like(v) for k, v in s.avg.payload().items()}
    m = s.aggregate(0, [Reply(0, {**zeros, "label_counts": -torch.ones(10)}, 5),
                        Reply(1, {**zeros, "label_counts": torch.ones(10)}, 5)])
    assert m["fedgen_rejected"] == 1


def test_malformed_label_counts_rejected_by_loop(tmp_path):
    loop = tiny_loop(tmp_path, FedGen(gen_steps=1), callbacks=[Corrupt("label_counts", lambda t: t[:3])])
    history = fit_rejected(loop, cnn(4), tiny_dm())
    assert [h["rejected"] for h in history] == [2, 2]


def test_fedgen_client_under_trainer_adds_regulariser():
    torch.manual_seed(0)
    model = cnn(4)
    gen = LatentGenerator(8, 10, 16, model.head.in_features)
    cb = FedGenClient(LatentGenerator(8, 10, 16, model.head.in_features))
    gen.eval()
    cb.configure({k: v.clone() for k, v in gen.state_dict().items()}, torch.ones(10) / 10, alpha=10.0, beta=10.0)
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    cb._trainer = None
    cb.on_train_start(type("T", (), {"current_epoch": 0, "max_epochs": 1})(), model)
    with_reg = model.training_step((x, y), 0)
    cb.on_train_end(None, model)
    plain = model.training_step((x, y), 0)
    assert with_reg.item() > plain.item()
    assert cb.label_counts.sum() == 8
    t = trainer(batches=3)
    t.callbacks.append(cb)
    t.fit(model, tiny_dm())
    assert cb.label_counts.sum() == 3 * 32


def test_fedgen_refuses_heterogeneous_tiers_and_bad_head():
    with pytest.raises(ValueError, match="cannot aggregate across architectures"):
        FedGen(tiers=ModelTiers(models=[cnn(8)]))
    with pytest.raises(ValueError, match="decay=0.0"):
        FedGen(decay=0.0)
    from lightning_fed.models import MNIST1DMLP

    with pytest.raises(ValueError, match="head='head'"):
        FedGen().setup(MNIST1DMLP(hidden=8))
