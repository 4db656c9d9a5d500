"""FedGen: payloads, the server generator, the client regulariser, refusal of heterogeneous tiers."""

from __future__ import annotations

import pytest
import torch
from _distill_common import Corrupt, Spy, cnn, fit_rejected, tiny_dm, tiny_loop, trainer

from lightning_fed.protocol import Reply
from lightning_fed.strategies import FedGen, ModelTiers
from lightning_fed.strategies.fedgen import FedGenClient, LatentGenerator
from lightning_fed.weights import float_state


def test_fedgen_run_payload_shapes(tmp_path):
    torch.manual_seed(0)
    spy = Spy()
    s = FedGen(gen_steps=5)
    res = tiny_loop(tmp_path, s, rounds=2, callbacks=[spy]).fit(cnn(4), tiny_dm())
    weights = {f"w/{k}": (tuple(v.shape), torch.float32) for k, v in float_state(cnn(4)).items()}
    for _, p in spy.replies:
        assert p == {**weights, "label_counts": ((10,), torch.float32)}
    first, later = spy.instructions[0][1], spy.instructions[-1][1]
    assert first == set(weights)  # no generator before the first aggregation
    assert "label_dist" in later and any(k.startswith("g/") for k in later)
    assert res.history[-1]["fedgen_rejected"] == 0 and "generator_loss" in res.history[-1]


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
