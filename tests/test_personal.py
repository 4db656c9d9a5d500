"""Personalized evaluation and the personalization methods: per-client splits (seeded, disjoint from training),
metrics recomputed from the per-client CSV, personal layers that never leave the client (payload keys and bytes),
Ditto's proximal pull against a hand computation, FedAvg-FT and Ditto training through the module's own
``configure_optimizers`` / ``training_step``, the distillation strategies' own models, one working model for any
number of clients, and refused configurations."""

import csv
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fed import FedCallback, PersonalEval
from lightning_fed.data import Dirichlet
from lightning_fed.models import MNIST1DCNN
from lightning_fed.personal import client_test_slice, largest_remainder, shard_split
from lightning_fed.seeding import generator
from lightning_fed.strategies import Ditto, FedAvg, FedAvgFT, FedMD, FedPer
from lightning_fed.strategies.ditto import STATE_KEY as DITTO_KEY
from lightning_fed.strategies.ditto import DittoPull
from lightning_fed.strategies.fedper import STATE_KEY as FEDPER_KEY
from lightning_fed.weights import float_state, load_into

HEAD = ("head.weight", "head.bias")


def _model(seed=0):
    L.seed_everything(seed, verbose=False)
    return MNIST1DCNN(channels=8)


def _fit(make_loop, dm, strategy, holdout="test", rounds=2, **kw):
    loop = make_loop(
        strategy=strategy,
        partition=Dirichlet(alpha=0.3, min_samples=10),
        rounds=rounds,
        eval_every=1,
        personal_eval=PersonalEval(holdout=holdout, size=40),
        **kw,
    )
    return loop, loop.fit(_model(), dm)


def _rows(result, server_round):
    with open(result.run_dir / "personalized" / f"round_{server_round:04d}.csv") as f:
        return list(csv.DictReader(f))


def _p10(values):
    """The 10th percentile with linear interpolation between the closest ranks, by hand."""
    v = sorted(values)
    pos = 0.1 * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def test_largest_remainder_by_hand():
    assert largest_remainder(torch.tensor([3.0, 1.0]), 10).tolist() == [8, 2]
    assert largest_remainder(torch.tensor([1.0, 1.0, 1.0]), 10).tolist() == [4, 3, 3]
    assert largest_remainder(torch.tensor([0.0, 5.0]), 7).tolist() == [0, 7]


def test_test_slice_follows_the_clients_labels_and_is_seeded():
    test_labels = torch.arange(10).repeat(30)  # 30 test examples per label
    shard_labels = torch.tensor([2] * 30 + [7] * 10)  # 75 % label 2, 25 % label 7
    a = client_test_slice(shard_labels, test_labels, 20, generator(0, 19, 3))
    b = client_test_slice(shard_labels, test_labels, 20, generator(0, 19, 3))
    c = client_test_slice(shard_labels, test_labels, 20, generator(0, 19, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a) == 20 and len(set(a.tolist())) == 20
    assert torch.bincount(test_labels[a], minlength=10).tolist() == [0, 0, 15, 0, 0, 0, 0, 5, 0, 0]
    # a label the test set has too few of: all of them, no more
    few = client_test_slice(torch.tensor([1] * 40), test_labels, 50, generator(0, 19, 0))
    assert torch.bincount(test_labels[few], minlength=10).tolist()[1] == 30 and len(few) == 30


def test_shard_split_is_seeded_and_partitions_the_shard():
    shard = torch.arange(100, 150)
    train, held = shard_split(shard, 0.2, generator(0, 19, 1))
    train2, held2 = shard_split(shard, 0.2, generator(0, 19, 1))
    assert torch.equal(train, train2) and torch.equal(held, held2)
    assert len(held) == 10 and len(train) == 40
    assert (
        set(train.tolist()).isdisjoint(held.tolist())
        and sorted(train.tolist() + held.tolist()) == shard.tolist()
    )
    assert shard_split(torch.tensor([5]), 0.2, generator(0))[1].numel() == 0  # one example: nothing held out
    assert len(shard_split(torch.tensor([5, 6]), 0.9, generator(0))[0]) == 1  # never the whole shard


def test_shard_holdout_is_never_trained_on(make_loop, small_dm):
    class Seen(FedCallback):
        def __init__(self):
            self.seen = {}

        def on_client_data(self, trainer, pl_module, shard):
            self.seen.setdefault(trainer.fed.client_id, set()).update(shard.indices.tolist())
            return shard

    spy = Seen()
    loop, res = _fit(make_loop, small_dm, FedAvg(), holdout="shard", callbacks=[spy])
    again, _ = _fit(make_loop, small_dm, FedAvg(), holdout="shard")
    assert spy.seen
    for cid, idx in spy.seen.items():
        held = set(loop.holdouts[cid].tolist())
        assert held and idx.isdisjoint(held)
        assert torch.equal(loop.holdouts[cid], again.holdouts[cid])  # same seed, same split
    rows = _rows(res, 2)
    assert [int(r["examples"]) for r in rows] == [len(h) for h in loop.holdouts if len(h)]


def test_metrics_are_recomputed_from_the_csv(make_loop, small_dm):
    loop, res = _fit(make_loop, small_dm, Ditto(lam=0.1))
    for r in (1, 2):
        rows, hist = _rows(res, r), res.history[r - 1]
        assert [int(row["client"]) for row in rows] == list(range(4))
        for kind, name in (("global", "personal/global_acc"), ("personal", "personal/acc")):
            accs = [int(row[f"{kind}_correct"]) / int(row["examples"]) for row in rows]
            assert accs == [float(row[f"{kind}_acc"]) for row in rows]
            assert hist[f"{name}_mean"] == pytest.approx(sum(accs) / len(accs), abs=1e-12)
            assert hist[f"{name}_p10"] == pytest.approx(_p10(accs), abs=1e-12)
    # one client's personal accuracy recomputed independently: its stored model on its slice
    cid = next(c for c in range(4) if (loop.run_dir / "clients" / f"client-{c}.pt").exists())
    state = torch.load(loop.run_dir / "clients" / f"client-{cid}.pt", weights_only=True)
    model = _model()
    load_into(model, state[DITTO_KEY])
    x, y = small_dm.test_dataloader().dataset.tensors
    idx = loop.holdouts[cid]
    with torch.no_grad():
        hits = int((model.eval()(x[idx]).argmax(-1) == y[idx]).sum())
    assert hits == int(_rows(res, 2)[cid]["personal_correct"])


def test_fedper_personal_layers_never_leave_the_client(make_loop, small_dm):
    class Spy(FedCallback):
        def __init__(self):
            self.down, self.up, self.server = set(), set(), set()

        def on_round_start(self, trainer, pl_module, instructions):
            self.down.update(k for i in instructions for k in i.payload)

        def on_client_end(self, trainer, pl_module, reply):
            self.up.update(reply.payload)

        def on_aggregate_start(self, trainer, pl_module, replies):
            self.server.update(k for r in replies for k in r.payload)

    spy = Spy()
    loop, res = _fit(make_loop, small_dm, FedPer(personal_layers=["head"]), callbacks=[spy])
    model = _model()
    shared = {k for k in float_state(model) if k not in HEAD}
    assert spy.down == spy.up == spy.server == shared
    shared_bytes = 4 * sum(v.numel() for k, v in float_state(model).items() if k in shared)
    for h in res.history:
        assert h["raw_bytes_up"] == h["good"] * shared_bytes
        assert h["raw_bytes_down"] == h["clients"] * shared_bytes
    heads = {}
    for f in sorted((loop.run_dir / "clients").glob("client-*.pt")):
        state = torch.load(f, weights_only=True)
        assert set(state[FEDPER_KEY]) == set(HEAD)
        heads[f.name] = state[FEDPER_KEY]["head.weight"]
    assert len(heads) >= 2
    a, b = list(heads.values())[:2]
    assert not torch.equal(a, b)  # each client trained its own head
    assert "personal/acc_mean" in res.history[-1] and "personal/global_acc_mean" not in res.history[-1]


def test_fedper_warmup_federates_then_starts_heads_from_the_global_one(make_loop, small_dm):
    class Spy(FedCallback):
        def __init__(self):
            self.down, self.up = [], []

        def on_round_start(self, trainer, pl_module, instructions):
            self.down.append(
                ({k for i in instructions for k in i.payload}, instructions[0].config.get("fedper_init"))
            )

        def on_aggregate_start(self, trainer, pl_module, replies):
            self.up.append({k for r in replies for k in r.payload})

    spy, strategy = Spy(), FedPer(personal_layers=["head"], warmup_rounds=1)
    loop, res = _fit(make_loop, small_dm, strategy, callbacks=[spy], rounds=3)
    every = set(float_state(_model()))
    shared = every - set(HEAD)
    assert spy.down[0] == (every, None) and spy.up[0] == every  # round 1: FedAvg on the whole model
    for down, up in zip(
        spy.down[1:], spy.up[1:], strict=True
    ):  # then the head goes down as a start, never up
        assert down == (every, sorted(HEAD)) and up == shared
    size = {k: 4 * v.numel() for k, v in float_state(_model()).items()}
    head, base = sum(size[k] for k in HEAD), sum(size[k] for k in shared)
    for i, h in enumerate(res.history):
        assert h["raw_bytes_down"] == h["clients"] * (base + head)
        assert h["raw_bytes_up"] == h["good"] * (base + (head if i == 0 else 0))
    stored = {
        f.name: torch.load(f, weights_only=True).get(FEDPER_KEY)
        for f in (loop.run_dir / "clients").glob("*.pt")
    }
    starts = strategy._init_personal  # the global head after round 1, every client's start
    assert (
        set(starts) == set(HEAD)
        and stored
        and all(s is not None and set(s) == set(HEAD) for s in stored.values())
    )
    assert all(not torch.equal(s["head.weight"], starts["head.weight"]) for s in stored.values())


@pytest.mark.parametrize("stop", [1, 2])
def test_fedper_warmup_resumes_exactly(make_loop, small_dm, tmp_path, stop):
    def fit(rounds, out, resume=None):
        loop = make_loop(
            strategy=FedPer(personal_layers=["head"], warmup_rounds=2),
            partition=Dirichlet(alpha=0.3, min_samples=10),
            rounds=rounds,
            eval_every=1,
            checkpoint_every=1,
            personal_eval=PersonalEval(size=40),
            output_dir=str(tmp_path / out),
        )
        return loop, loop.fit(_model(), small_dm, **({"resume": resume} if resume else {}))

    full_loop, full = fit(4, "full")
    _, part = fit(stop, "part")
    resumed_loop, resumed = fit(4, "part", resume=str(part.run_dir))
    assert torch.equal(full_loop.strategy.global_flat, resumed_loop.strategy.global_flat)
    assert full_loop.strategy._init_personal.keys() == resumed_loop.strategy._init_personal.keys()
    for k, v in full_loop.strategy._init_personal.items():
        assert torch.equal(v, resumed_loop.strategy._init_personal[k])
    assert _rows(full, 4) == _rows(resumed, 4)
    for f in sorted((full.run_dir / "clients").glob("*.pt")):
        a, b = (
            torch.load(f, weights_only=True),
            torch.load(resumed.run_dir / "clients" / f.name, weights_only=True),
        )
        for k in a.get(FEDPER_KEY, {}):
            assert torch.equal(a[FEDPER_KEY][k], b[FEDPER_KEY][k])


def test_fedper_refuses_bad_layer_names(make_loop, small_dm, tmp_path):
    with pytest.raises(
        ValueError, match=r"FedPer: personal_layers=\['fc9'\] is not allowed.*\['fc9'\] name none.*head"
    ):
        FedPer(personal_layers=["fc9"]).check_model(_model())
    with pytest.raises(ValueError, match="FedPer: personal_layers=.*nothing is federated"):
        FedPer(personal_layers=["conv1", "conv2", "conv3", "head"]).check_model(_model())
    for bad in ([], [""], "head"):
        with pytest.raises(ValueError, match="FedPer: personal_layers="):
            FedPer(personal_layers=bad)
    loop = make_loop(strategy=FedPer(personal_layers=["fc9"]), output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="personal_layers"):
        loop.fit(_model(), small_dm)
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Ditto(lam=-0.1), r"Ditto: lam=-0.1 is not allowed; lam must be >= 0"),
        (lambda: Ditto(personal_epochs=0), r"Ditto: personal_epochs=0 is not allowed"),
        (lambda: FedAvgFT(lr_scale=0), r"FedAvgFT: lr_scale=0 is not allowed; lr_scale must be > 0"),
        (lambda: Ditto(lr_scale=-1.0), r"Ditto: lr_scale=-1.0 is not allowed; lr_scale must be > 0"),
        (
            lambda: Ditto(personal_init="zeros"),
            r"Ditto: personal_init='zeros' is not allowed; personal_init must be one of \('global', 'initial'\)",
        ),
        (
            lambda: FedPer(personal_layers=["head"], warmup_rounds=-1),
            r"FedPer: warmup_rounds=-1 is not allowed; warmup_rounds must be an integer >= 0",
        ),
        (
            lambda: FedAvgFT(finetune_steps=-1),
            r"FedAvgFT: finetune_steps=-1 is not allowed; finetune_steps must be an",
        ),
        (
            lambda: PersonalEval(holdout="val"),
            r"PersonalEval: holdout='val' is not allowed; holdout must be one of",
        ),
        (lambda: PersonalEval(fraction=1.0), r"PersonalEval: fraction=1.0 is not allowed"),
        (lambda: PersonalEval(size=0), r"PersonalEval: size=0 is not allowed"),
    ],
)
def test_bad_configuration_names_the_key(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_ditto_pull_matches_a_hand_computation():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2, bias=False)
    v0 = lin.weight.detach().clone()
    w = torch.randn(2, 3)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    lr, lam = 0.1, 0.5
    pull = DittoPull({"weight": w}, lam)
    view = type("View", (), {"lightning_module": lin})()
    opt = torch.optim.SGD(lin.parameters(), lr=lr)
    pull.on_train_start(view, lin)
    F.cross_entropy(lin(x), y).backward()
    pull.on_before_optimizer_step(view, lin, opt)
    opt.step()
    # by hand: d CE / d logits = (softmax - onehot) / B; logits = x v^T, so the gradient is that^T x
    logits = x @ v0.T
    p = torch.exp(logits - logits.max(1, keepdim=True).values)
    p = p / p.sum(1, keepdim=True)
    grad = (p - F.one_hot(y, 2).float()).T @ x / len(y)
    expected = v0 - lr * (grad + lam * (v0 - w))
    assert torch.allclose(lin.weight.detach(), expected, atol=1e-6)
    pull.on_train_end(view, lin)
    assert not pull._anchor  # no reference kept after training


class Recording(MNIST1DCNN):
    """Records every ``training_step`` (client, round, batch size) and ``configure_optimizers`` call; its optimizer
    is Adam, so a personal model trained with plain SGD would differ."""

    def __init__(self):
        super().__init__(channels=8)
        self.steps, self.optimizers_made = [], 0

    def configure_optimizers(self):
        self.optimizers_made += 1
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def training_step(self, batch, batch_idx):
        fed = self.trainer.fed
        self.steps.append((fed.client_id, fed.round, len(batch[0])))
        return super().training_step(batch, batch_idx)


def test_fedavg_ft_fine_tunes_through_training_step(make_loop, small_dm):
    L.seed_everything(0, verbose=False)
    model = Recording()
    loop = make_loop(
        strategy=FedAvgFT(finetune_steps=3),
        partition=Dirichlet(alpha=0.3, min_samples=10),
        rounds=2,
        eval_every=1,
        personal_eval=PersonalEval(size=40),
    )
    res = loop.fit(model, small_dm)
    evaluated = int(res.history[-1]["personal/clients"])
    server_side = [
        s for s in model.steps if s[0] is None
    ]  # fine-tuning runs at evaluation, outside client work
    assert len(server_side) == 2 * evaluated * 3  # two evaluation rounds, 3 optimizer steps per client
    assert {r for _, r, _ in server_side} == {0, 1}
    clients = [s for s in model.steps if s[0] is not None]
    assert (
        model.optimizers_made == 2 * 2 + 2 * evaluated
    )  # local training (2 clients x 2 rounds) + fine-tuning
    assert clients and len(model.steps) == len(clients) + len(server_side)


def test_ditto_personal_model_trains_through_training_step(make_loop, small_dm):
    runs = {}
    for name, strategy in (("fedavg", FedAvg()), ("ditto", Ditto(lam=0.1, personal_epochs=2))):
        L.seed_everything(0, verbose=False)
        model = Recording()
        loop = make_loop(strategy=strategy, partition=Dirichlet(alpha=0.3, min_samples=10), rounds=2)
        loop.fit(model, small_dm)
        runs[name] = (loop, model)
    (fa_loop, fa), (d_loop, d) = runs["fedavg"], runs["ditto"]
    # each sampled client also trains v: 2 personal epochs over the same shard as 1 local epoch, batch size kept
    assert len(d.steps) == 3 * len(fa.steps) and d.optimizers_made == 2 * fa.optimizers_made
    assert {b for *_, b in d.steps} == {b for *_, b in fa.steps}
    assert torch.equal(
        d_loop.strategy.global_flat, fa_loop.strategy.global_flat
    )  # the global model is FedAvg's


def test_ditto_trains_the_global_model_as_fedavg(make_loop, small_dm):
    loop_d, _ = _fit(make_loop, small_dm, Ditto(lam=0.1))
    loop_f, _ = _fit(make_loop, small_dm, FedAvg())
    assert torch.equal(loop_d.strategy.global_flat, loop_f.strategy.global_flat)
    stored = [
        torch.load(f, weights_only=True)[DITTO_KEY] for f in sorted((loop_d.run_dir / "clients").glob("*.pt"))
    ]
    assert stored and all(
        not torch.equal(s["head.weight"], loop_d.strategy.initial["head.weight"]) for s in stored
    )


@pytest.mark.parametrize("personal_init", ["global", "initial"])
def test_ditto_personal_model_starts_where_personal_init_says(make_loop, small_dm, personal_init):
    class Received(FedCallback):  # the global model each client receives, by round
        def __init__(self):
            self.got = {}

        def on_client_start(self, trainer, pl_module, instruction):
            ctx = trainer.fed  # round 0-based
            self.got[(ctx.round, ctx.client_id)] = {k: v.clone() for k, v in instruction.payload.items()}

    spy = Received()
    # lam 0 and a vanishing learning rate: the stored v is where it started, to float precision
    strategy = Ditto(lam=0.0, lr_scale=1e-12, personal_init=personal_init)
    loop, res = _fit(make_loop, small_dm, strategy, num_clients=6, clients_per_round=3, callbacks=[spy])
    first = {}
    for r, cid in sorted(spy.got):
        first.setdefault(cid, r)
    # a client first sampled in the second round, and one never sampled
    assert 1 in first.values() and len(first) < 6
    for cid, r in first.items():
        state = torch.load(loop.run_dir / "clients" / f"client-{cid}.pt", weights_only=True)[DITTO_KEY]
        start = spy.got[(r, cid)] if personal_init == "global" else strategy.initial
        for k, v in state.items():
            torch.testing.assert_close(v, start[k], rtol=0, atol=1e-6)
        if r == 1:  # the global model after the first round is not the initial one
            assert not torch.equal(spy.got[(r, cid)]["head.weight"], strategy.initial["head.weight"])
    never = [row for row in _rows(res, 2) if int(row["client"]) not in first]
    assert never
    model = _model()
    load_into(model, strategy.initial)
    x, y = small_dm.test_dataloader().dataset.tensors
    for row in never:  # "global": judged with the global model; "initial": with the initial weights
        if personal_init == "global":
            assert row["personal_correct"] == row["global_correct"]
        else:
            idx = loop.holdouts[int(row["client"])]
            with torch.no_grad():
                hits = int((model.eval()(x[idx]).argmax(-1) == y[idx]).sum())
            assert int(row["personal_correct"]) == hits


def test_fedavg_ft_zero_steps_is_the_global_model(make_loop, small_dm):
    _, zero = _fit(make_loop, small_dm, FedAvgFT(finetune_steps=0))
    for row in _rows(zero, 2):
        assert row["personal_correct"] == row["global_correct"]
    _, tuned = _fit(make_loop, small_dm, FedAvgFT(finetune_steps=10))
    assert any(r["personal_correct"] != r["global_correct"] for r in _rows(tuned, 2))
    assert tuned.history[-1]["personal/global_acc_mean"] == zero.history[-1]["personal/global_acc_mean"]


def test_own_model_strategies_report_personal_accuracy(make_loop, small_dm):
    _, res = _fit(make_loop, small_dm, FedMD(public_per_round=64, eval_clients=0))
    last = res.history[-1]
    assert "personal/acc_mean" in last and "personal/global_acc_mean" not in last
    rows = _rows(res, 2)
    assert len(rows) == 4 and all(r["global_correct"] == "" for r in rows)


def test_one_working_model_for_every_client(make_loop, small_dm):
    class Counting(Ditto):
        def __init__(self):
            super().__init__()
            self.modules, self.states = set(), 0

        def personal_model(self, client_id, client_state, module, train):
            self.modules.add(id(module))
            self.states += 1
            return super().personal_model(client_id, client_state, module, train)

    strategy = Counting()
    _fit(make_loop, small_dm, strategy, num_clients=12, clients_per_round=2)
    assert (
        len(strategy.modules) == 1 and strategy.states == 2 * 12
    )  # one working module, one state per client


def test_personal_evaluation_leaves_training_unchanged(make_loop, small_dm):
    with_eval, _ = _fit(make_loop, small_dm, FedAvgFT(finetune_steps=5))
    plain = make_loop(
        strategy=FedAvg(), partition=Dirichlet(alpha=0.3, min_samples=10), rounds=2, eval_every=1
    )
    plain.fit(_model(), small_dm)
    assert torch.equal(with_eval.strategy.global_flat, plain.strategy.global_flat)


@pytest.mark.parametrize("recipe", ["fedmd_nfdp", "fedgkt", "ddist"])
def test_distillation_recipes_report_their_own_models(recipe, tmp_path):
    from pathlib import Path

    from lightning_fed.cli import run

    path = Path(__file__).parents[1] / "recipes" / "mnist1d" / f"{recipe}.yaml"
    res = run(
        [
            "fit",
            "--config",
            str(path),
            "--loop.rounds",
            "1",
            "--loop.local_epochs",
            "1",
            "--loop.verbose",
            "false",
            "--loop.plot",
            "false",
            "--loop.checkpoint_every",
            "0",
            "--loop.output_dir",
            str(tmp_path),
            "--loop.personal_eval",
            "lightning_fed.PersonalEval",
        ]
    )
    last = res.history[-1]
    assert 0.0 <= last["personal/acc_p10"] <= last["personal/acc_mean"] <= 1.0
    assert "personal/global_acc_mean" not in last
    rows = _rows(res, 1)
    assert len(rows) == last["personal/clients"] and all(r["personal_correct"] != "" for r in rows)


def test_context_train_leaves_the_trainer_view_as_it_was(make_loop, small_dm):
    class Probe(FedCallback):
        def __init__(self):
            self.steps = []

        def on_client_start(self, trainer, pl_module, instruction):
            fields = (
                "global_step",
                "current_epoch",
                "max_epochs",
                "max_steps",
                "training",
                "num_training_batches",
            )
            before = {k: getattr(trainer, k) for k in fields}
            module, optimizers = trainer.lightning_module, list(trainer.optimizers)
            metrics = dict(trainer.callback_metrics)
            g = torch.Generator().manual_seed(0)
            self.steps.append(trainer.fed.train(module, trainer.fed.shard, g, epochs=None, max_steps=3))
            assert {k: getattr(trainer, k) for k in fields} == before
            assert trainer.lightning_module is module and trainer.optimizers == optimizers
            assert trainer.callback_metrics.keys() == metrics.keys()
            load_into(module, instruction.payload)  # local training starts from the received weights again

    probe = Probe()
    loop, _ = _fit(make_loop, small_dm, FedAvg(), callbacks=[probe])
    plain, _ = _fit(make_loop, small_dm, FedAvg())
    assert probe.steps == [3] * 4  # 2 clients x 2 rounds, 3 optimizer steps each
    assert torch.equal(
        loop.strategy.global_flat, plain.strategy.global_flat
    )  # the federated update is unchanged


def test_scale_lr_scales_the_rates_and_the_schedules_base():
    from lightning.pytorch.utilities.types import LRSchedulerConfig

    from lightning_fed.strategies.fedavg_ft import ScaleLR

    lin = nn.Linear(2, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    view = type("View", (), {"optimizers": [opt], "lr_scheduler_configs": [LRSchedulerConfig(sched)]})()
    ScaleLR(0.1).on_train_start(view, lin)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)  # the schedule continues from the scaled rate
    assert sched.base_lrs == [pytest.approx(0.05)]
