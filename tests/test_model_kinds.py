"""The compression callbacks on models that are not single-input classifiers (docs/models.md).

Four model kinds written for these tests:

* ``Classifier``: ``forward(x)`` with an ``example_input_array``;
* ``TinyLM``: a small causal language model on generated token sequences, ``forward(inputs, target)`` returning the
  **loss** (as language models that take labels do); its logits come from ``logits(inputs)`` / the ``head`` layer,
  and its ``batch_to_inputs`` method tells the callbacks that a batch ``(inputs, target)`` is both arguments;
* ``Recurrent``: a cell loop with a custom ``step`` and **no** ``forward``; callbacks get ``forward_fn``;
* ``Regression``: float targets, ``forward(x)``, no ``example_input_array`` (the first batch is the example);
  ``RegressionWithExample`` is the same model with one.
"""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import seeded
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed import FedLoop
from lightning_fed.callbacks import (
    Distillation,
    EightBitOptimizer,
    Footprint,
    MagnitudeSparsity,
    MoERouting,
    QuantizationAware,
    RoundLRDecay,
    StructuredPruning,
    replay_pruning,
)
from lightning_fed.callbacks._compress import ModelInputs
from lightning_fed.data import IID

VOCAB, T = 16, 8


class TinyDM(L.LightningDataModule):
    """Tensors in, loaders out (train shuffled, test in order)."""

    def __init__(self, train: TensorDataset, test: TensorDataset, batch_size: int = 16) -> None:
        super().__init__()
        self.train, self.test, self.batch_size = train, test, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=self.batch_size)


class Base(L.LightningModule):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


# ---------------------------------------------------------------------- the four model kinds
class Classifier(Base):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 32), nn.ReLU())
        self.ffn = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 3)
        self.example_input_array = torch.zeros(2, 12)

    def forward(self, x):
        return self.head(self.ffn(self.body(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


class TinyLM(Base):
    """Next-token prediction; ``forward(inputs, target)`` returns the loss. Causal: position ``t`` sees the mean of
    the embeddings up to ``t``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, width)
        self.ffn = nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, width))
        self.head = nn.Linear(width, VOCAB)
        self.example_input_array = (torch.zeros(2, T, dtype=torch.long), torch.zeros(2, T, dtype=torch.long))

    def logits(self, inputs):
        h = self.emb(inputs)
        h = h.cumsum(1) / torch.arange(1, inputs.shape[1] + 1, device=h.device).view(1, -1, 1)
        return self.head(h + self.ffn(h))  # [B, T, V]

    def forward(self, inputs, target):
        return F.cross_entropy(self.logits(inputs).flatten(0, 1), target.flatten())

    def batch_to_inputs(self, batch):
        inputs, target = batch
        return (inputs, target), {}

    def training_step(self, batch, batch_idx):
        return self(*batch)


class Recurrent(Base):
    """A cell loop with a custom ``step`` and no ``forward``: callbacks get ``forward_fn=run``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.rec = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def step(self, x_t, h):
        return torch.tanh(self.inp(x_t) + self.rec(h))

    def run(self, x):
        h = torch.zeros_like(self.inp(x[:, 0]))  # the hidden width follows pruning
        for t in range(x.shape[1]):
            h = self.step(x[:, t], h)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.run(x), y)


def run(module, x):
    """``forward_fn`` for :class:`Recurrent`."""
    return module.run(x)


class Regression(Base):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)


class RegressionWithExample(Regression):
    """:class:`Regression` with an ``example_input_array``: callbacks can run it at setup, before any data."""

    def __init__(self) -> None:
        super().__init__()
        self.example_input_array = torch.zeros(2, 8)


# ---------------------------------------------------------------------- data
def _split(*tensors, n_test=32):
    return TensorDataset(*(t[n_test:] for t in tensors)), TensorDataset(*(t[:n_test] for t in tensors))


def classifier_dm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 12, generator=g)
    return TinyDM(*_split(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()))


def lm_dm():
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, VOCAB, (128, 1), generator=g)
    seq = (start + torch.arange(T + 1)) % VOCAB  # the next token is the current one + 1
    return TinyDM(*_split(seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))


def recurrent_dm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 5, 4, generator=g)
    return TinyDM(*_split(x, (x[:, :, 0].sum(1) > 0).long() + (x[:, -1, 1] > 0).long()))


def regression_dm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    return TinyDM(*_split(x, x[:, :2].sum(1, keepdim=True) * 0.5))


def fit(model, dm, callbacks, tmp_path, epochs=1):
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        default_root_dir=str(tmp_path))
    trainer.fit(model, dm)
    return trainer


def footprint():
    return Footprint(repeats=1)


# ---------------------------------------------------------------------- classifier with example_input_array
def test_classifier_all_callbacks(tmp_path):
    model = seeded(Classifier)
    teacher = seeded(Classifier, seed=1)
    fp, qat = footprint(), QuantizationAware(start=1)
    cbs = [StructuredPruning(ratio=0.5, at=0), MagnitudeSparsity(sparsity=0.5, at=0), fp, qat]
    fit(model, classifier_dm(), cbs, tmp_path, epochs=2)
    assert model.body[0].out_features == 16 and fp.results["after"]["params"] < fp.results["before"]["params"]
    assert {"float_acc", "quant_acc", "export_max_abs_diff"} <= set(qat.report)
    fit(seeded(Classifier), classifier_dm(), [Distillation(teacher), MoERouting(convert=["ffn"]), RoundLRDecay()],
        tmp_path)


# ---------------------------------------------------------------------- language model: forward(inputs, target)
def test_lm_pruning_footprint_qat(tmp_path):
    model = seeded(TinyLM)
    fp, qat = footprint(), QuantizationAware(start=1)
    pruning = StructuredPruning(ratio=0.5, at=0)
    fit(model, lm_dm(), [pruning, MagnitudeSparsity(sparsity=0.5, at=0), fp, qat], tmp_path, epochs=2)
    assert model.ffn[0].out_features == 32 and model.head.out_features == VOCAB  # the head keeps its vocabulary
    assert fp.results["after"]["macs"] < fp.results["before"]["macs"] and "exported" in fp.results
    assert "float_acc" not in qat.report and qat.report["export_max_abs_diff"] < 0.5  # a loss: no accuracy
    assert pruning.example_input_shape is None  # integer, two inputs: a resume traces with example_input_array
    fresh = seeded(TinyLM)
    replay_pruning(fresh, pruning.history, ModelInputs.from_example(fresh.example_input_array))
    fresh.load_state_dict(model.state_dict())


@pytest.mark.parametrize("how", ["layers", "outputs_fn"])
def test_lm_distillation_token_logits(tmp_path, how):
    teacher = seeded(TinyLM, width=48, seed=1)
    kw = ({"logits_layer": "head", "teacher_logits_layer": "head"} if how == "layers"
          else {"outputs_fn": lambda m, batch: m.logits(batch[0])})
    seen = []
    cb = Distillation(teacher, **kw)
    original = cb.distillation_terms

    def spy(task, batch):
        loss, parts = original(task, batch)
        seen.append(float(parts["kd_loss"]))
        return loss, parts

    cb.distillation_terms = spy
    fit(seeded(TinyLM), lm_dm(), [cb], tmp_path)
    assert seen and all(v > 0 for v in seen)


def test_lm_distillation_on_a_loss_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"output \(\) is not logits.*logits_layer"):
        fit(seeded(TinyLM), lm_dm(), [Distillation(seeded(TinyLM, seed=1))], tmp_path)


def test_lm_moe_8bit_lr(tmp_path, caplog):
    model = seeded(TinyLM)
    with caplog.at_level(logging.WARNING, logger="lightning_fed"):
        fit(model, lm_dm(), [MoERouting(convert=["ffn"], capacity_factor=0.3, warn_dropped=0.1), EightBitOptimizer(),
                             RoundLRDecay()], tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "warn_dropped" in r.getMessage()]
    assert len(warnings) == 1 and "'ffn'" in warnings[0] and "capacity_factor" in warnings[0]


def test_lm_in_fedloop(tmp_path):
    fp, qat = footprint(), QuantizationAware(start=1)
    loop = FedLoop(num_clients=2, clients_per_round=2, rounds=2, partition=IID(), verbose=False, plot=False,
                   loggers=[], checkpoint_every=0, output_dir=str(tmp_path),
                   callbacks=[StructuredPruning(ratio=0.5, at=0), fp, qat])
    model = seeded(TinyLM)
    res = loop.fit(model, lm_dm())
    assert res.history[-1]["good"] == 2 and model.ffn[0].out_features == 32
    assert fp.results["after"]["params"] < fp.results["before"]["params"] and "export_max_abs_diff" in qat.report


# ---------------------------------------------------------------------- recurrent model without forward
@pytest.mark.parametrize("make", [lambda: StructuredPruning(ratio=0.5, at=0), footprint,
                                  lambda: Distillation(seeded(Recurrent, seed=1))])
def test_recurrent_without_forward_fn_is_refused(tmp_path, make):
    with pytest.raises(ValueError, match=r"Recurrent has no forward\(\).*forward_fn="):
        fit(seeded(Recurrent), recurrent_dm(), [make()], tmp_path)


def test_recurrent_with_forward_fn(tmp_path):
    model = seeded(Recurrent)
    fp = Footprint(repeats=1, forward_fn=run)
    qat = QuantizationAware(start=1, forward_fn=run)
    cbs = [StructuredPruning(ratio=0.5, at=0, forward_fn=run), MagnitudeSparsity(sparsity=0.5, at=0), fp, qat]
    fit(model, recurrent_dm(), cbs, tmp_path, epochs=2)
    assert model.rec.out_features == 8 and model.rec.in_features == 8 and model.inp.out_features == 8
    assert fp.results["after"]["macs"] < fp.results["before"]["macs"]
    assert "export_max_abs_diff" in qat.report and "float_acc" not in qat.report
    seen = []
    cb = Distillation(seeded(Recurrent, seed=1), forward_fn=run)
    original = cb.distillation_terms
    cb.distillation_terms = lambda task, batch: seen.append(1) or original(task, batch)
    fit(seeded(Recurrent), recurrent_dm(), [cb, EightBitOptimizer(), RoundLRDecay()], tmp_path)
    assert seen


# ---------------------------------------------------------------------- regression (float targets)
def test_regression_trainer(tmp_path, caplog):
    model = seeded(Regression)
    fp, qat = footprint(), QuantizationAware(start=1)
    with caplog.at_level(logging.WARNING, logger="lightning_fed"):
        fit(model, regression_dm(), [StructuredPruning(ratio=0.5, at=0), MagnitudeSparsity(sparsity=0.5, at=0), fp,
                                     qat, EightBitOptimizer(), RoundLRDecay()], tmp_path, epochs=2)
    assert model.net[0].out_features == 16 and "float_acc" not in qat.report
    assert any("integer class labels" in r.getMessage() for r in caplog.records)


def distillation_spy(cb):
    """Record the training steps :class:`Distillation` computed its loss in."""
    seen, original = [], cb.distillation_terms
    cb.distillation_terms = lambda task, batch: seen.append(1) or original(task, batch)
    return seen


def test_regression_distillation_is_refused_at_setup(tmp_path):
    """With an ``example_input_array`` the teacher runs once at setup: refused before any training step."""
    cb = Distillation(seeded(RegressionWithExample, seed=1))
    seen = distillation_spy(cb)
    with pytest.raises(ValueError, match=r"teacher's output \(2, 1\) has one output per sample.*needs >= 2 logits"):
        fit(seeded(RegressionWithExample), regression_dm(), [cb], tmp_path)
    assert not seen


def test_regression_distillation_without_example_is_refused_at_the_first_step(tmp_path):
    """Without an ``example_input_array`` the inputs come from data: the first training step refuses it."""
    cb = Distillation(seeded(Regression, seed=1))
    seen = distillation_spy(cb)
    with pytest.raises(ValueError, match=r"student's output \(16, 1\) has one output per sample"):
        fit(seeded(Regression), regression_dm(), [cb], tmp_path)
    assert seen == [1]


class FloatTargets(torch.utils.data.Dataset):
    """(x, y) records with float targets and no class labels: IID splits them without reading labels, and the
    partition table says n/a."""

    def __init__(self, data: TensorDataset) -> None:
        self.x, self.y = data.tensors

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_regression_in_fedloop(tmp_path):
    fp = footprint()
    loop = FedLoop(num_clients=2, clients_per_round=2, rounds=2, partition=IID(), verbose=False, plot=False,
                   loggers=[], checkpoint_every=0, output_dir=str(tmp_path),
                   callbacks=[StructuredPruning(ratio=0.5, at=0), fp, QuantizationAware(start=1)])
    model = seeded(Regression)
    dm = regression_dm()
    dm.train, dm.test = FloatTargets(dm.train), FloatTargets(dm.test)
    res = loop.fit(model, dm)
    assert res.history[-1]["good"] == 2 and model.net[0].out_features == 16


# ---------------------------------------------------------------------- nothing silent
def test_pruning_with_nothing_to_prune_warns_once(tmp_path, caplog):
    class HeadOnly(Base):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(12, 3)

        def forward(self, x):
            return self.head(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

    with caplog.at_level(logging.WARNING, logger="lightning_fed"):
        fit(seeded(HeadOnly), classifier_dm(), [StructuredPruning(ratio=0.5, at=[0])], tmp_path)
    msgs = [r.getMessage() for r in caplog.records if "nothing to prune" in r.getMessage()]
    assert len(msgs) == 1 and "ignored_layers" in msgs[0]


def test_dict_batches_need_batch_to_inputs(tmp_path):
    class DictNet(Classifier):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch["x"]), batch["y"])

    class DictDS(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return {"x": torch.randn(12), "y": torch.tensor(i % 3)}

    class DictDM(TinyDM):
        def train_dataloader(self):
            return DataLoader(DictDS(), batch_size=8)

    model = seeded(DictNet)
    model.example_input_array = None
    with pytest.raises(ValueError, match="Footprint: no example input.*batch_to_inputs="):
        fit(model, DictDM(None, None), [footprint()], tmp_path)
    fp = Footprint(repeats=1, batch_to_inputs=lambda b: ((b["x"],), {}))
    fit(model, DictDM(None, None), [fp], tmp_path)
    assert fp.results["after"]["params"] > 0


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_sparsity_with_nothing_to_mask_warns_once(tmp_path, caplog, scope):
    with caplog.at_level(logging.WARNING, logger="lightning_fed"):
        fit(seeded(Classifier), classifier_dm(), [MagnitudeSparsity(sparsity=0.5, at=[0], min_numel=10**6,
                                                                    scope=scope)], tmp_path)
    msgs = [r.getMessage() for r in caplog.records if "nothing to sparsify" in r.getMessage()]
    assert len(msgs) == 1 and "min_numel" in msgs[0]


# ---------------------------------------------------------------------- every kind x callback inside FedLoop
def fedloop(tmp_path, callbacks):
    return FedLoop(num_clients=2, clients_per_round=2, rounds=2, partition=IID(), verbose=False, plot=False,
                   loggers=[], checkpoint_every=0, output_dir=str(tmp_path), callbacks=callbacks)


def all_clients_ok(res):
    """A callback that raises inside a client's work drops that client (it is no test failure): check none did."""
    return all(h["failed"] == 0 and h["rejected"] == 0 and h["good"] == 2 for h in res.history)


def float_regression_dm():
    dm = regression_dm()
    dm.train, dm.test = FloatTargets(dm.train), FloatTargets(dm.test)
    return dm


def numel(model):
    return sum(p.numel() for p in model.parameters())


def lr_spy(cb):
    """Record the rounds :class:`RoundLRDecay` scaled the clients' learning rate for."""
    steps, original = [], cb.scale
    cb.scale = lambda step, total=None: steps.append(step) or original(step, total)
    return steps


def eight_bit_spy(cb):
    """Record the optimizers :class:`EightBitOptimizer` built (one per client's local training)."""
    made, original = [], cb.make
    cb.make = lambda optimizer: made.append(original(optimizer)) or made[-1]
    return made


def check_8bit_and_lr(res, made, steps, smaller=True):
    assert len(made) == 4 and all(type(o).__name__ == "Adam8bit" for o in made)  # 2 clients x 2 rounds
    for h in res.history:  # tiny layers: 8-bit state + its per-tensor quantization maps can outweigh float32's
        assert h["optim_state_bytes"] > 0 and (h["optim_state_bytes"] < h["optim_state_bytes_fp32"]) == smaller
    assert sorted(set(steps)) == [0, 1]  # each client started round r at the rate decayed r times


def test_recurrent_in_fedloop(tmp_path):
    model = seeded(Recurrent)
    before = numel(model)
    fp, qat = Footprint(repeats=1, forward_fn=run), QuantizationAware(start=1, forward_fn=run)
    res = fedloop(tmp_path, [StructuredPruning(ratio=0.5, at=0, forward_fn=run), MagnitudeSparsity(sparsity=0.5, at=0),
                             fp, qat]).fit(model, recurrent_dm())
    assert all_clients_ok(res)
    assert model.rec.out_features == 8 and model.rec.in_features == 8 and numel(model) < before
    assert 0 < fp.results["after"]["macs"] < fp.results["before"]["macs"] and "exported" in fp.results
    assert "export_max_abs_diff" in qat.report and (res.run_dir / "quantized.safetensors").is_file()
    assert res.history[-1]["density"] == pytest.approx(0.5, abs=0.05)


def test_recurrent_distillation_8bit_lr_in_fedloop(tmp_path):
    model = seeded(Recurrent)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    lr, eight = RoundLRDecay(gamma=0.5), EightBitOptimizer(min_8bit_size=8)
    steps, made = lr_spy(lr), eight_bit_spy(eight)
    res = fedloop(tmp_path, [Distillation(seeded(Recurrent, seed=1), forward_fn=run), eight, lr]).fit(
        model, recurrent_dm())
    assert all_clients_ok(res) and all(h["distill/kd_loss"] > 0 for h in res.history)
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())
    check_8bit_and_lr(res, made, steps, smaller=False)


def test_lm_sparsity_distillation_in_fedloop(tmp_path):
    model = seeded(TinyLM)
    distill = Distillation(seeded(TinyLM, width=48, seed=1), logits_layer="head", teacher_logits_layer="head")
    res = fedloop(tmp_path, [MagnitudeSparsity(sparsity=0.5, at=0), distill]).fit(model, lm_dm())
    assert all_clients_ok(res) and all(h["distill/kd_loss"] > 0 for h in res.history)  # token logits, per token
    assert res.history[-1]["density"] == pytest.approx(0.5, abs=0.05)
    assert (model.ffn[0].weight == 0).float().mean() >= 0.45  # the global model keeps the masks


def test_lm_moe_8bit_lr_in_fedloop(tmp_path):
    model = seeded(TinyLM)
    lr, eight = RoundLRDecay(gamma=0.5), EightBitOptimizer(min_8bit_size=256)
    steps, made = lr_spy(lr), eight_bit_spy(eight)
    res = fedloop(tmp_path, [MoERouting(convert=["ffn"]), eight, lr]).fit(model, lm_dm())
    assert all_clients_ok(res) and type(model.ffn).__name__ == "MoELayer"
    assert all("moe/balance_loss" in h and "moe/ffn/load_0" in h for h in res.history)
    check_8bit_and_lr(res, made, steps)


def test_regression_sparsity_8bit_lr_in_fedloop(tmp_path):
    model = seeded(Regression)
    lr, eight = RoundLRDecay(gamma=0.5), EightBitOptimizer(min_8bit_size=8)
    steps, made = lr_spy(lr), eight_bit_spy(eight)
    res = fedloop(tmp_path, [MagnitudeSparsity(sparsity=0.5, at=0), eight, lr]).fit(model, float_regression_dm())
    assert all_clients_ok(res) and res.history[-1]["density"] == pytest.approx(0.5, abs=0.05)
    check_8bit_and_lr(res, made, steps, smaller=False)


@pytest.mark.parametrize("model, at", [(RegressionWithExample, "setup"), (Regression, "first step")])
def test_regression_distillation_in_fedloop_is_refused(tmp_path, model, at):
    cb = Distillation(seeded(model, seed=1))
    seen = distillation_spy(cb)
    who = r"teacher's output \(2, 1\)" if at == "setup" else "student's output"
    with pytest.raises(ValueError, match=who + ".*one output per sample.*needs >= 2 logits"):
        fedloop(tmp_path, [cb]).fit(seeded(model), float_regression_dm())
    assert bool(seen) == (at == "first step")



# ---------------------------------------------------------------------- MoERouting on the recurrent and regression models
MOE_CASES = [  # (model, data, block to convert): the recurrent cell's `rec` runs once per time step
    pytest.param(Recurrent, recurrent_dm, "rec", id="recurrent"),
    pytest.param(Regression, regression_dm, "net", id="regression"),
]


def moe_module(model, name):
    return type(model.get_submodule(name)).__name__


@pytest.mark.parametrize("make, data, block", MOE_CASES)
def test_moe_trainer(tmp_path, make, data, block):
    model = seeded(make)
    trainer = fit(model, data(), [MoERouting(convert=[block], capacity_factor=None)], tmp_path)
    assert moe_module(model, block) == "MoELayer"
    logged = trainer.callback_metrics
    assert {"moe/balance_loss", "moe/z_loss", "moe/entropy", "moe/dropped", f"moe/{block}/load_0"} <= set(logged)
    assert float(logged["moe/dropped"]) == 0.0  # dropless


@pytest.mark.parametrize("make, data, block", MOE_CASES)
def test_moe_in_fedloop(tmp_path, make, data, block):
    model = seeded(make)
    dm = data()
    if make is Regression:
        dm.train, dm.test = FloatTargets(dm.train), FloatTargets(dm.test)
    res = fedloop(tmp_path, [MoERouting(convert=[block])]).fit(model, dm)
    assert all_clients_ok(res) and moe_module(model, block) == "MoELayer"
    assert len(res.history) == 2
    assert all("moe/balance_loss" in h and f"moe/{block}/load_0" in h for h in res.history)
