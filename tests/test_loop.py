"""FedLoop behaviour: training, determinism, hooks and the trainer view, failures, hostile replies, config errors."""

import logging

import pytest
import torch
from conftest import seeded

from lightning_fed import FedAvg, FedCallback, FedLoop
from lightning_fed.codecs import EncodeArgs, Identity
from lightning_fed.data import Dirichlet
from lightning_fed.errors import ClientError, RoundsFailed, is_client_fault
from lightning_fed.models import MNIST1DCNN, MNIST1DMLP
from lightning_fed.weights import float_state


def _weights(model):
    return torch.cat([v.flatten() for v in float_state(model).values()])


def test_fit_improves_accuracy_and_writes_outputs(make_loop, small_dm, tmp_path):
    model = seeded(MNIST1DCNN)
    before = _weights(model).clone()
    loop = make_loop(rounds=4, local_epochs=2, partition=Dirichlet(1.0), plot=True, loggers=["csv"], test_every=1)
    res = loop.fit(model, small_dm)
    assert not torch.equal(before, _weights(model))
    losses = [h["test_loss"] for h in res.history]  # test_every=1: a test-loss curve
    assert losses[-1] < losses[0] - 0.05  # the global model learns
    assert res.history[-1]["test_acc"] > 0.12  # above chance (10 %) after 4 tiny rounds
    for name in ("final.safetensors", "history.json", "accuracy.png", "partition.csv"):
        assert (res.run_dir / name).exists(), name
    csv = next(res.run_dir.glob("logs/**/metrics.csv")).read_text()
    assert "test_acc" in csv and "bytes_up" in csv
    h = res.history[-1]
    assert h["bytes_up"] > 0 and h["bytes_down"] > 0 and h["good"] == 2 and h["seconds"] > 0


def test_same_seed_same_weights(make_loop, small_dm, tmp_path):
    a, b = seeded(MNIST1DMLP), seeded(MNIST1DMLP)
    make_loop(rounds=2, output_dir=str(tmp_path / "a")).fit(a, small_dm)
    make_loop(rounds=2, output_dir=str(tmp_path / "b")).fit(b, small_dm)
    assert torch.equal(_weights(a), _weights(b))
    c = seeded(MNIST1DMLP)
    make_loop(rounds=2, seed=1, output_dir=str(tmp_path / "c")).fit(c, small_dm)
    assert not torch.equal(_weights(a), _weights(c))


def test_client_sampling_is_seeded_and_within_bounds(make_loop):
    loop = make_loop(num_clients=50, clients_per_round=7)
    s = loop.sample_clients(3)
    assert s == loop.sample_clients(3) and len(set(s)) == 7 and all(0 <= c < 50 for c in s)
    assert s != loop.sample_clients(4)


class Recorder(FedCallback):
    """Records hook calls and what the trainer view shows inside them."""

    def __init__(self):
        self.calls = []
        self.seen = []

    def setup(self, trainer, pl_module, stage):
        self.calls.append("setup")

    def on_fit_start(self, trainer, pl_module):
        self.calls.append("on_fit_start")

    def on_train_start(self, trainer, pl_module):
        self.calls.append("on_train_start")

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append(("epoch", trainer.current_round, trainer.client_id, trainer.current_epoch, trainer.max_epochs))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        assert any(p.grad is not None for p in pl_module.parameters())
        self.calls.append("on_before_optimizer_step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert "train_loss" in trainer.callback_metrics  # self.log reached the view
        assert pl_module.trainer.global_step == trainer.global_step
        assert pl_module.current_epoch == trainer.current_epoch

    def on_validation_end(self, trainer, pl_module):
        self.calls.append("on_validation_end")

    def on_test_end(self, trainer, pl_module):
        self.calls.append("on_test_end")

    def on_round_start(self, trainer, pl_module, instructions):
        self.calls.append("on_round_start")
        for ins in instructions:
            ins.config["local_epochs"] = 2  # instructions can be changed

    def on_client_start(self, trainer, pl_module, instruction):
        trainer.client_state["visits"] = trainer.client_state.get("visits", 0) + 1

    def on_client_end(self, trainer, pl_module, reply):
        reply.metrics["visits"] = float(trainer.client_state["visits"])

    def on_aggregate_start(self, trainer, pl_module, replies):
        self.calls.append(("aggregate", len(replies)))

    def on_round_end(self, trainer, pl_module, metrics):
        metrics["custom"] = 42.0



def test_cyclic_sampling_gives_every_client_a_turn_each_cycle():
    from lightning_fed.plan import sample_clients

    seen = [sample_clients(0, r, 10, 3, "cyclic") for r in range(8)]  # cycles of ceil(10 / 3) = 4 rounds
    assert all(len(s) == 3 == len(set(s)) for s in seen)
    for cycle in (seen[:4], seen[4:]):
        assert set().union(*cycle) == set(range(10))  # everyone once; the last round tops up with 2 repeats
        assert sum(len(s) for s in cycle) == 12
    assert seen[:4] != seen[4:]  # each cycle has its own order
    assert seen == [sample_clients(0, r, 10, 3, "cyclic") for r in range(8)]
    with pytest.raises(ValueError, match="sampling='round_robin' is not allowed"):
        FedLoop(sampling="round_robin")

def test_one_callback_is_taken_as_lightning_trainer_takes_it():
    from lightning_fed.callbacks import StructuredPruning

    cb = StructuredPruning(ratio=0.2)
    assert FedLoop(callbacks=cb).callbacks == [cb] == FedLoop(callbacks=[cb]).callbacks
    assert FedLoop().callbacks == [] == FedLoop(callbacks=[]).callbacks
    for bad in ([StructuredPruning], "pruning", [cb, 3]):  # the class, a name, something else in the list
        with pytest.raises(ValueError, match=r"^FedLoop: callbacks=.* must be a Lightning Callback or a list of them"):
            FedLoop(callbacks=bad)


def test_hooks_trainer_view_and_client_state(make_loop, small_dm):
    rec = Recorder()
    res = make_loop(num_clients=2, clients_per_round=2, rounds=2, callbacks=[rec]).fit(seeded(MNIST1DMLP), small_dm)
    assert rec.calls[:2] == ["setup", "on_fit_start"]
    assert rec.calls.count("on_round_start") == 2 and rec.calls.count("on_train_start") == 4
    assert ("aggregate", 2) in rec.calls and "on_test_end" in rec.calls  # the final test (test_step's hooks)
    assert "on_validation_end" not in rec.calls  # small_dm has no validation split
    # local_epochs was raised to 2 by on_round_start: epochs 0 and 1 for each client
    assert (0, 0, 0, 2) == rec.seen[0][1:] and (0, 0, 1, 2) == rec.seen[1][1:]
    assert res.history[0]["custom"] == 42.0
    assert res.history[1]["visits"] == 2.0  # per-client state persisted across rounds through the store


class Crash(FedCallback):
    def __init__(self, bad):
        self.bad = bad

    def on_client_start(self, trainer, pl_module, instruction):
        if trainer.client_id in self.bad:
            raise RuntimeError("device out of battery")


def test_crashing_client_is_dropped_and_logged(make_loop, small_dm, caplog):
    caplog.set_level(logging.WARNING, "lightning_fed")
    res = make_loop(num_clients=3, clients_per_round=3, rounds=1, callbacks=[Crash({1})]).fit(seeded(MNIST1DMLP), small_dm)
    assert res.history[0]["failed"] == 1 and res.history[0]["good"] == 2
    assert "client 1 dropped: RuntimeError: device out of battery" in caplog.text


def test_round_skipped_below_min_clients(make_loop, small_dm, caplog):
    caplog.set_level(logging.WARNING, "lightning_fed")
    model = seeded(MNIST1DMLP)
    loop = make_loop(num_clients=3, clients_per_round=3, rounds=2, min_clients=2, callbacks=[CrashInRound(0, {0, 1})])
    before = FedAvg()
    before.setup(model)
    res = loop.fit(model, small_dm)
    assert [h["skipped"] for h in res.history] == [1, 0] and "round 1 skipped" in caplog.text
    assert res.history[1]["good"] == 3


def test_a_run_that_never_aggregates_stops_with_the_reasons(make_loop, small_dm):
    model = seeded(MNIST1DMLP)
    loop = make_loop(num_clients=3, clients_per_round=3, rounds=1, min_clients=2, callbacks=[Crash({0, 1})])
    before = FedAvg()
    before.setup(model)
    with pytest.raises(RoundsFailed, match=r"every round of the run could not aggregate \(fewer than min_clients=2(.|\n)*"
                                           r"round 1: client 0 dropped: RuntimeError: device out of battery"):
        loop.fit(model, small_dm)
    assert torch.equal(loop.strategy.global_flat, before.global_flat)  # global model untouched
    assert torch.equal(_weights(model), before.global_flat)


def test_consecutive_failed_rounds_stop_the_run(make_loop, small_dm):
    loop = make_loop(num_clients=3, clients_per_round=3, rounds=10, min_clients=3, max_failed_rounds=2,
                     callbacks=[CrashInRound(1, {2}), CrashInRound(2, {0})])
    with pytest.raises(RoundsFailed, match=r"2 consecutive rounds(.|\n)*round 2: client 2 dropped(.|\n)*"
                                           r"round 3: client 0 dropped"):
        loop.fit(seeded(MNIST1DMLP), small_dm)
    assert len(loop.history) == 2  # round 1 aggregated; round 2 failed; round 3 failed and stopped the run


class CrashInRound(FedCallback):
    def __init__(self, r, bad):
        self.r, self.bad = r, bad

    def on_client_start(self, trainer, pl_module, instruction):
        if trainer.fed.round == self.r and trainer.fed.client_id in self.bad:
            raise RuntimeError("device out of battery")


class ChangesShape(FedCallback):
    """Client 0 replaces its first parameter by one of another shape, before training (its forward then fails)
    or after it (its reply no longer matches the instruction)."""

    def __init__(self, when):
        self.when = when

    def _break(self, trainer):
        if trainer.fed.client_id == 0:
            module = trainer.lightning_module
            name = next(iter(module.named_parameters()))[0]
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            setattr(owner, name.rsplit(".", 1)[-1], torch.nn.Parameter(torch.zeros(3, 3)))

    def on_client_start(self, trainer, pl_module, instruction):
        if self.when == "before":
            self._break(trainer)

    def on_train_end(self, trainer, pl_module):
        if self.when == "after":
            self._break(trainer)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_client_that_changes_its_model_is_dropped_alone(when, make_loop, small_dm, caplog):
    caplog.set_level(logging.WARNING, "lightning_fed")
    loop = make_loop(num_clients=3, clients_per_round=3, rounds=2, callbacks=[ChangesShape(when)])
    res = loop.fit(seeded(MNIST1DMLP), small_dm)
    assert [h["failed"] for h in res.history] == [1, 1]
    assert [h["good"] for h in res.history] == [2, 2]
    assert "client 0 changed its model's structure" in caplog.text
    if when == "after":
        assert "client 0 dropped: ModelMismatch" in caplog.text


def test_a_failure_of_lightning_fed_code_stops_the_run(make_loop, small_dm, monkeypatch):
    from lightning_fed.codecs import wire

    def broken_pack(*a, **k):
        raise KeyError("bug inside lightning_fed")

    monkeypatch.setattr(wire, "pack", broken_pack)
    monkeypatch.setattr("lightning_fed.codecs.base.pack", broken_pack)
    with pytest.raises(KeyError, match="bug inside lightning_fed"):
        make_loop(num_clients=2, clients_per_round=2, rounds=1).fit(seeded(MNIST1DMLP), small_dm)


def test_fault_classification():
    def user_code():
        raise ValueError("user")

    try:
        user_code()
    except ValueError as err:
        assert is_client_fault(err)
    try:
        FedLoop(num_clients=0)
    except ValueError as err:
        assert not is_client_fault(err)  # raised inside lightning_fed.loop
    assert is_client_fault(ClientError("simulated fault"))


class Hostile(FedCallback):
    """Client 0 sends a corrupt reply of the given kind."""

    def __init__(self, kind):
        self.kind = kind

    def on_client_start(self, trainer, pl_module, instruction):
        if trainer.client_id == 0 and self.kind == "nan_loss":
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))

    def on_client_end(self, trainer, pl_module, reply):
        if trainer.client_id != 0:
            return
        k = next(iter(reply.payload))
        if self.kind == "inf":
            reply.payload[k] = torch.full_like(reply.payload[k], float("inf"))
        elif self.kind == "shape":
            reply.payload[k] = torch.zeros(3, 3)
        elif self.kind == "extra":
            reply.payload["evil"] = torch.zeros(1)
        elif self.kind == "dtype":
            reply.payload[k] = reply.payload[k].double()
        elif self.kind == "huge":
            reply.payload[k] = torch.full_like(reply.payload[k], 1e9)
        elif self.kind == "examples":
            reply.num_examples = -1


@pytest.mark.parametrize("kind", ["inf", "shape", "extra", "dtype", "huge", "examples", "nan_loss"])
def test_hostile_replies_never_reach_the_global_model(kind, make_loop, small_dm, caplog):
    caplog.set_level(logging.WARNING, "lightning_fed")
    model = seeded(MNIST1DMLP)
    loop = make_loop(num_clients=2, clients_per_round=2, rounds=1, max_update_abs=1e3, callbacks=[Hostile(kind)])
    res = loop.fit(model, small_dm)
    assert res.history[0]["rejected"] == 1 and res.history[0]["good"] == 1
    assert "reply of client 0 rejected" in caplog.text
    assert torch.isfinite(loop.strategy.global_flat).all()
    # the global model equals a run in which only client 1 replied
    ref_model = seeded(MNIST1DMLP)
    ref = make_loop(num_clients=2, clients_per_round=2, rounds=1, callbacks=[Crash({0})], output_dir=str(loop.output_dir) + "-ref")
    ref.fit(ref_model, small_dm)
    assert torch.allclose(loop.strategy.global_flat, ref.strategy.global_flat)


class GarbageCodec(Identity):
    """Sends a truncated or garbage message for client 0."""

    def __init__(self, mode):
        self.mode = mode
        self.calls = 0

    def encode(self, payload, state, args=EncodeArgs()):
        msg = super().encode(payload, state, args)
        self.calls += 1
        if self.calls != 1:
            return msg
        return {"truncate": msg[: len(msg) // 2], "garbage": b"\x00" * 7 + b"junk", "header": b"\xff" * 8 + msg}[self.mode]


@pytest.mark.parametrize("mode", ["truncate", "garbage", "header"])
def test_malformed_messages_are_rejected(mode, make_loop, small_dm, caplog):
    caplog.set_level(logging.WARNING, "lightning_fed")
    res = make_loop(num_clients=2, clients_per_round=2, rounds=1, codec=GarbageCodec(mode)).fit(seeded(MNIST1DMLP), small_dm)
    assert res.history[0]["rejected"] == 1 and "rejected" in caplog.text


def test_oversized_messages_are_rejected(make_loop, small_dm, caplog):
    caplog.set_level(logging.WARNING, "lightning_fed")
    loop = make_loop(num_clients=2, clients_per_round=2, rounds=1, max_message_bytes=1000)
    with pytest.raises(RoundsFailed, match="client 0 rejected: message of 61328 bytes exceeds the limit of 1000"):
        loop.fit(seeded(MNIST1DMLP), small_dm)
    assert loop.history[0]["rejected"] == 2 and "exceeds the limit of 1000" in caplog.text


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_clients": 0}, "num_clients=0"),
        ({"num_clients": 5, "clients_per_round": 6}, "clients_per_round=6 .* between 1 and num_clients=5"),
        ({"rounds": 0}, "rounds=0"),
        ({"local_epochs": 0}, "local_epochs"),
        ({"min_clients": 9}, "min_clients=9"),
        ({"eval_every": 0}, "eval_every"),
        ({"precision": "8-bit"}, "precision='8-bit' .* one of"),
        ({"loggers": ["wandb"]}, "loggers"),
        ({"max_message_bytes": 0}, "max_message_bytes"),
    ],
)
def test_bad_configuration_fails_before_training(kw, match):
    base = {"num_clients": 10, "clients_per_round": 5}
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        FedLoop(**base)


def _loaders():
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 40, generator=g)
    y = (x[:, 0] > 0).long()
    return (DataLoader(TensorDataset(x[:240], y[:240]), batch_size=16, shuffle=True),
            DataLoader(TensorDataset(x[240:], y[240:]), batch_size=64))


def test_fit_takes_dataloaders_as_lightning_trainer_fit_does(make_loop):
    """``fit(model, train_loader, val_loader)``, the same by keyword, and a data module serving the same loaders
    train the same weights and validate alike."""
    import lightning as L

    from lightning_fed.models import LogisticRegression

    train, val = _loaders()

    class Module(L.LightningDataModule):
        def train_dataloader(self):
            return train

        def val_dataloader(self):
            return val

    runs = []
    for args, kwargs in (((train, val), {}), ((), {"train_dataloaders": train, "val_dataloaders": val}),
                         ((Module(),), {})):
        model = seeded(LogisticRegression, in_features=40, num_classes=2)
        res = make_loop(rounds=2).fit(model, *args, **kwargs)
        runs.append((_weights(model), [h["val_acc"] for h in res.history]))
    for weights, val_acc in runs[1:]:
        assert val_acc == runs[0][1] and torch.equal(weights, runs[0][0])
    model = seeded(LogisticRegression, in_features=40, num_classes=2)  # no validation loader: no val_acc
    assert "val_acc" not in make_loop(rounds=1).fit(model, train).history[-1]


def test_fit_refuses_a_model_that_is_not_a_lightning_module(small_dm):
    for model, named in ((torch.nn.Linear(40, 10), "Linear"), (MNIST1DMLP, "the class MNIST1DMLP")):
        with pytest.raises(TypeError, match=rf"^FedLoop.fit: model={named} is not allowed; model must be a Lightning"):
            FedLoop().fit(model, small_dm)


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ((), {}, "needs training data"),
    (("dm", "val"), {}, "give a datamodule or dataloaders, not both"),
    (("train",), {"train_dataloaders": "train"}, "given twice"),
    (([1, 2],), {}, "datamodule=list is not allowed"),
    ((MNIST1DMLP,), {}, "datamodule=the class MNIST1DMLP is not allowed"),
    ((), {"train_dataloaders": [1, 2]}, "train_dataloaders=list is not allowed; train_dataloaders must be a torch"),
    (("train", [1]), {}, "val_dataloaders=list is not allowed"),
])
def test_fit_refuses_training_data_it_cannot_use(small_dm, args, kwargs, message):
    train, val = _loaders()
    named = {"dm": small_dm, "train": train, "val": val}
    args = tuple(named.get(a, a) if isinstance(a, str) else a for a in args)
    kwargs = {k: named.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        FedLoop().fit(MNIST1DMLP(), *args, **kwargs)


def test_a_batch_sampler_stands_for_its_batch_size(make_loop):
    """``DataLoader(ds, batch_sampler=BatchSampler(..., 32, drop_last))`` trains the clients on batches of 32 (it
    trained them one example at a time): the same weights as the loader with ``batch_size=32``."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

    from lightning_fed.models import LogisticRegression

    train, _ = _loaders()
    runs = []
    for loader in (DataLoader(train.dataset, batch_size=32, drop_last=True),
                   DataLoader(train.dataset, batch_sampler=BatchSampler(RandomSampler(train.dataset), 32, True)),
                   DataLoader(train.dataset, batch_sampler=BatchSampler(SequentialSampler(train.dataset), 32, True))):
        model = seeded(LogisticRegression, in_features=40, num_classes=2)
        make_loop(rounds=1).fit(model, loader)
        runs.append(_weights(model))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_a_sampler_that_is_not_used_is_logged(make_loop, caplog):
    from torch.utils.data import DataLoader, WeightedRandomSampler

    from lightning_fed.models import LogisticRegression

    train, _ = _loaders()
    loader = DataLoader(train.dataset, batch_size=16, sampler=WeightedRandomSampler([1.0] * 240, 50))
    with caplog.at_level(logging.WARNING, logger="lightning_fed"):
        make_loop(rounds=1).fit(seeded(LogisticRegression, in_features=40, num_classes=2), loader)
    assert "sampler (WeightedRandomSampler) is not used" in caplog.text


def test_training_and_validation_data_it_cannot_split_or_evaluate_are_refused(tmp_path):
    import lightning as L
    from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(torch.randn(8, 40), torch.zeros(8, dtype=torch.long))

    class Bucketing(BatchSampler):
        pass

    train, val = _loaders()

    class TwoVal(L.LightningDataModule):
        def train_dataloader(self):
            return train

        def val_dataloader(self):
            return [val, val]

    class Several(TwoVal):
        def train_dataloader(self):
            return [train, train]

    cases = [
        ((DataLoader(Stream(), batch_size=4),), ("FedLoop.fit: the training DataLoader's dataset is an IterableDataset "
                                                r"\(Stream\); FedLoop splits the training set")),
        ((DataLoader(train.dataset, batch_sampler=Bucketing(SequentialSampler(train.dataset), 8, False)),),
         r"has a batch_sampler of its own \(Bucketing\).*give the DataLoader a batch_size instead"),
        ((TwoVal(),), r"^TwoVal.val_dataloader\(\) returned 2 loaders; FedLoop evaluates one"),
        ((Several(),), r"^Several.train_dataloader\(\): the training data must be one torch DataLoader, got list"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            FedLoop(output_dir=str(tmp_path), verbose=False).fit(MNIST1DMLP(), *args)
    assert not list(tmp_path.iterdir())  # refused before the run folder


def test_a_list_of_one_validation_loader_is_that_loader(make_loop):
    import lightning as L

    from lightning_fed.models import LogisticRegression

    train, val = _loaders()

    class OneInAList(L.LightningDataModule):
        def train_dataloader(self):
            return train

        def val_dataloader(self):
            return [val]

    accs = [make_loop(rounds=1).fit(seeded(LogisticRegression, in_features=40, num_classes=2), *data).history[-1]
            ["val_acc"] for data in ((OneInAList(),), (train, val))]
    assert accs[0] == accs[1]


@pytest.mark.parametrize(("given", "setting"), [(32, "32-true"), ("32", "32-true"), (16, "16-mixed"),
                                               ("bf16", "bf16-mixed"), (64, "64-true"), ("bf16-true", "bf16-true")])
def test_lightnings_short_precisions_stand_for_their_settings(given, setting):
    """``Trainer(precision=16)`` and the like, as Lightning reads them; stored (and so compared on resume) as the
    setting itself."""
    assert FedLoop(precision=given).precision == setting


def test_the_loop_agrees_with_fabric_runs_command_line(monkeypatch):
    """Under ``fabric run --precision=bf16`` (``LT_PRECISION``) the loop's precision must be that setting, named
    either way; another one is refused, naming what the command line says."""
    monkeypatch.setenv("LT_PRECISION", "bf16")
    assert FedLoop(precision="bf16-mixed")._fabric() is not None
    with pytest.raises(ValueError, match=r"precision='32-true' is not allowed; precision must be 'bf16', as `fabric run"):
        FedLoop()._fabric()


def test_bf16_mixed_precision_runs(make_loop, small_dm, tmp_path):
    w0 = _weights(seeded(MNIST1DCNN))
    model, ref = seeded(MNIST1DCNN), seeded(MNIST1DCNN)
    res = make_loop(rounds=1, precision="bf16-mixed").fit(model, small_dm)
    ref_res = make_loop(rounds=1, output_dir=str(tmp_path / "fp32")).fit(ref, small_dm)
    assert res.history[0]["good"] == 2
    assert res.final_metrics["test_loss"] == pytest.approx(ref_res.final_metrics["test_loss"], abs=1e-3)
    # bf16 autocast was applied (the update differs from the fp32 one) and trains like fp32 (cosine 0.999)
    d, d_ref = _weights(model) - w0, _weights(ref) - w0
    assert d.norm() > 0 and not torch.equal(d, d_ref)
    assert torch.nn.functional.cosine_similarity(d, d_ref, dim=0) > 0.99


class _CountingCNN(MNIST1DCNN):
    """Counts forward calls made while evaluating; ``shift`` makes validation_step look at a changed input."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.shift, self.eval_forwards = shift, 0

    def forward(self, x):
        if not self.training:
            self.eval_forwards += 1
        return super().forward(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x + self.shift) if self.shift else self(x)
        self.log("val_acc_own", (logits.argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)  # logged names are renamed at the test stage: test_acc_own


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_evaluation_reuses_the_steps_logits_and_stays_correct(make_loop, small_dm, shift):
    torch.manual_seed(0)
    model = _CountingCNN(shift)
    loop = make_loop(rounds=1)
    res = loop.fit(model, small_dm)
    batches = len(small_dm.test_dataloader())
    # the step's own forward on the batch's input is reused; a step that looks at another input costs one more
    assert model.eval_forwards == batches * (2 if shift else 1)
    model.eval()
    with torch.no_grad():
        x, y = small_dm.test_set.tensors
        expected = float((model(x).argmax(1) == y).float().mean())
    assert res.final_metrics["test_acc"] == pytest.approx(expected)
    if shift == 0.0:
        assert res.final_metrics["test_acc_own"] == pytest.approx(expected, abs=1e-6)
    assert not any(k.startswith("val_") for k in res.final_metrics)  # no validation data, no val_ name


def test_optimizers_are_unwrapped_only_when_fabric_would_step_them_unchanged():
    from lightning.fabric import Fabric

    from lightning_fed.client import plain_optimizer_steps

    assert plain_optimizer_steps(Fabric(accelerator="cpu", devices=1, precision="32-true"))
    assert plain_optimizer_steps(Fabric(accelerator="cpu", devices=1, precision="bf16-mixed"))  # no grad scaler
