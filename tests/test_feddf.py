"""FedDF: per-tier FedAvg, ensemble distillation on proxy data, payload shapes, malformed replies."""

from __future__ import annotations

import pytest
import torch
from _distill_common import Corrupt, Spy, cnn, fit_rejected, tiny_dm, tiny_loop, tiny_public

from lightning_fed.callbacks.kd_losses import kd_loss
from lightning_fed.protocol import Reply
from lightning_fed.strategies import FedDF, ModelTiers
from lightning_fed.strategies.tiers import predict_logits
from lightning_fed.weights import float_state, load_into


def test_feddf_heterogeneous_run_payload_shapes(tmp_path):
    torch.manual_seed(0)
    spy = Spy()
    tiers = ModelTiers(models=[cnn(6)])
    default = cnn(4)
    s = FedDF(public=tiny_public(), tiers=tiers, proxy_size=60, distill_steps=3)
    initial = [{k: v.detach().clone() for k, v in float_state(m).items()} for m in (default, tiers.models[0])]
    dm = tiny_dm()
    res = tiny_loop(tmp_path, s, rounds=2, callbacks=[spy]).fit(default, dm)
    shapes = {0: {k: (tuple(v.shape), torch.float32) for k, v in float_state(cnn(4)).items()},
              1: {k: (tuple(v.shape), torch.float32) for k, v in float_state(cnn(6)).items()}}
    for cid, payload in spy.replies:
        assert payload == shapes[tiers.tier_of(cid)]
    last = res.history[-1]
    assert {"tier0/test_acc", "tier1/test_acc", "server/test_acc"} <= set(last)
    assert last["test_acc"] == pytest.approx(last["tier0/test_acc"])
    # tier<t>/test_acc: each tier's global (averaged, then distilled) model; server/test_acc: their logit ensemble
    x, y = dm.test_set.tensors
    logits = []
    for t, arch in enumerate((cnn(4), cnn(6))):
        g = s.avg[t].payload()
        assert any(not torch.equal(g[k], initial[t][k]) for k in g)  # the tier's global model moved
        load_into(arch, g)
        with torch.no_grad():
            logits.append(arch.eval()(x))
        assert last[f"tier{t}/test_acc"] == pytest.approx((logits[-1].argmax(1) == y).float().mean().item(), abs=1e-6)
    ensemble = (torch.stack(logits).mean(0).argmax(1) == y).float().mean().item()
    assert last["server/test_acc"] == pytest.approx(ensemble, abs=1e-6)
    # each client receives and sends its own tier's float32 weights, nothing else
    sizes = [sum(v.numel() * 4 for v in w.values()) for w in initial]
    raw = sum(sizes[tiers.tier_of(cid)] for cid, _ in spy.replies[-2:])
    assert last["raw_bytes_up"] == raw and last["raw_bytes_down"] == raw


def test_without_distillation_it_is_fedavg_per_tier():
    tiers = ModelTiers(models=[cnn(6)])
    s = FedDF(public=tiny_public(), tiers=tiers, distill_steps=0, proxy_size=10)
    default = cnn(4)
    s.setup(default)
    g0 = {k: v.clone() for k, v in s.avg[0].payload().items()}
    g1 = {k: v.clone() for k, v in s.avg[1].payload().items()}
    d = lambda base, c: {k: torch.full_like(v, c) for k, v in base.items()}
    s.aggregate(0, [Reply(0, d(g0, 1.0), 10), Reply(2, d(g0, 3.0), 30), Reply(1, d(g1, 2.0), 5)])
    for k, v in s.avg[0].payload().items():
        assert torch.allclose(v, g0[k] + 2.5)  # (10*1 + 30*3) / 40
    for k, v in s.avg[1].payload().items():
        assert torch.allclose(v, g1[k] + 2.0)


def test_distillation_moves_each_tier_toward_the_ensemble():
    torch.manual_seed(0)
    tiers = ModelTiers(models=[cnn(6)])
    pub = tiny_public(100)
    s0 = FedDF(public=pub, tiers=tiers, distill_steps=0, proxy_size=100)
    s1 = FedDF(public=pub, tiers=tiers, distill_steps=30, proxy_size=100, distill_lr=1e-2)
    default = cnn(4)
    replies = []
    for s in (s0, s1):
        s.setup(default)
    torch.manual_seed(1)
    replies = [Reply(c, {k: 0.3 * torch.randn_like(v) for k, v in s0.avg[tiers.tier_of(c)].payload().items()}, 10)
               for c in range(4)]
    # the teacher: the mean logits of the 4 client models
    teacher = torch.zeros(100, 10)
    for r in replies:
        m = tiers.module(tiers.tier_of(r.client_id), default)
        load_into(m, {k: v + r.payload[k] for k, v in s0.avg[tiers.tier_of(r.client_id)].payload().items()})
        teacher += predict_logits(m, pub.x) / 4
    s0.aggregate(0, replies)
    s1.aggregate(0, replies)
    for t in range(2):
        m = tiers.module(t, default)
        load_into(m, s0.avg[t].payload())
        plain = kd_loss(predict_logits(m, pub.x), teacher).item()
        load_into(m, s1.avg[t].payload())
        distilled = kd_loss(predict_logits(m, pub.x), teacher).item()
        assert distilled < plain


def test_feddf_rejects_wrong_architecture_reply(tmp_path):
    s = FedDF(public=tiny_public(), proxy_size=20, distill_steps=1)
    bad = Corrupt("conv1.weight", lambda t: torch.zeros(t.shape[0] + 1, *t.shape[1:]))
    history = fit_rejected(tiny_loop(tmp_path, s, callbacks=[bad]), cnn(4), tiny_dm())
    assert [h["rejected"] for h in history] == [2, 2]


@pytest.mark.parametrize(("kwargs", "match"), [({"proxy_size": 0}, "proxy_size=0"), ({"distill_lr": 0.0}, "distill_lr=0.0"),
                                               ({"distill_steps": -1}, "distill_steps=-1")])
def test_feddf_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FedDF(**kwargs)


def test_one_architecture_without_distillation_is_fedavg(tmp_path):
    """``tiers=None`` and ``distill_steps=0``: the same global model as FedAvg, bit for bit, over two rounds."""
    from lightning_fed.strategies import FedAvg

    models = []
    for name, strategy in (("avg", FedAvg()), ("df", FedDF(public=tiny_public(), distill_steps=0, proxy_size=20))):
        torch.manual_seed(0)
        model = cnn(4)
        tiny_loop(tmp_path / name, strategy, rounds=2).fit(model, tiny_dm())
        models.append(float_state(model))
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_one_architecture_recipe_distills_on_records_outside_the_private_data():
    """feddf_fedavg.yaml: one architecture (fedavg.yaml's model and clients); its proxy records are unlabeled and
    none of them is a training or test record (another MNIST-1D seed)."""
    from pathlib import Path

    from lightning_fed.cli import load_recipe

    root = Path(__file__).parents[1] / "recipes" / "mnist1d"
    recipe = load_recipe(["fit", "--config", str(root / "feddf_fedavg.yaml")])
    fedavg = load_recipe(["fit", "--config", str(root / "fedavg.yaml")])
    s = recipe.loop.strategy
    assert isinstance(s, FedDF) and s.tiers is None and s.public.y is None
    assert (s.proxy_size, s.distill_steps, s.distill_lr, s.temperature) == (1000, 100, 1e-3, 1.0)
    assert recipe.model.hparams == fedavg.model.hparams
    assert (recipe.loop.num_clients, recipe.loop.clients_per_round, recipe.loop.local_epochs) == (20, 10, 5)
    dm = recipe.data
    dm.setup("fit")
    private = torch.cat([dm.train_set.tensors[0], dm.test_set.tensors[0]]).float()
    assert len(s.public) == 1000 and s.public.seed != dm.seed
    seen = {row.numpy().tobytes() for row in private}
    assert not any(row.float().numpy().tobytes() in seen for row in s.public.x)


def test_strategies_doc_one_architecture_example_runs(tmp_path):
    """docs/strategies.md's FedDF example runs as written: one architecture, distilled every round."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "strategies.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL) if "FedDF(" in c)
    scope: dict = {}
    exec(compile(code.replace('"runs/feddf-one"', f'"{tmp_path}"'), "docs/strategies.md", "exec"), scope)  # noqa: S102
    assert scope["strategy"].tiers is None and scope["strategy"].last_routes == [("ensemble", "tier0")]
    assert all(h["tier0/distill_loss"] >= 0 for h in scope["result"].history)
