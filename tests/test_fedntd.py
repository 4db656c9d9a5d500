"""FedNTD: the not-true distillation term and its gradient against a hand computation, two SGD steps of a tiny
classifier under a plain lightning.Trainer and inside FedLoop against the hand-derived gradients (the teacher is the
model received), beta = 0 being FedAvg bit for bit, bad batches and bad settings."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _tiny_fit import (
    FullBatch,
    TinyClassifier,
    fit_small,
    quiet_loop,
    quiet_trainer,
    run_strategies_doc_example,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed.data import IID
from lightning_fed.strategies import FedAvg, FedNTD, FedNTDClient
from lightning_fed.strategies.fedntd import not_true_kl

# 4 records of 2 features, 3 classes
X = torch.tensor([[1.0, 2.0], [3.0, -1.0], [-0.5, 1.0], [2.0, 0.5]])
Y = torch.tensor([0, 2, 0, 1])
W0 = torch.tensor([[0.5, -1.0], [1.0, 0.5], [-0.3, 0.2]])
LR, BETA, TAU = 0.5, 2.0, 2.0


def test_not_true_kl_by_hand():
    student = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]])
    teacher = torch.tensor([[0.0, 1.0, -2.0], [2.0, 1.0, 0.0]])
    labels = torch.tensor([2, 0])
    tau = 2.0

    def dist(row):
        e = [math.exp(v / tau) for v in row]
        return [v / sum(e) for v in e]

    hand = 0.0
    for s, t, y in zip(student.tolist(), teacher.tolist(), labels.tolist(), strict=True):
        ps = dist([v for c, v in enumerate(s) if c != y])
        pt = dist([v for c, v in enumerate(t) if c != y])
        hand += sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True))
    hand = tau**2 * hand / 2
    assert not_true_kl(student, teacher, labels, tau).item() == pytest.approx(hand, rel=1e-6)
    # the true class's logit does not enter: changing it changes nothing
    moved = student.clone()
    moved[0, 2] += 5.0
    moved[1, 0] -= 3.0
    assert torch.equal(not_true_kl(moved, teacher, labels, tau), not_true_kl(student, teacher, labels, tau))
    assert not_true_kl(teacher, teacher, labels, tau).item() == pytest.approx(0.0, abs=1e-7)


def _ntd_grad(z, g, tau):
    """d/dz of tau^2 * KL(softmax(g[~y]/tau) || softmax(z[~y]/tau)) averaged over the batch, by hand:
    tau * (p_student - p_teacher) / B on the not-true classes, 0 on the true one."""
    out = torch.zeros_like(z)
    for i, y in enumerate(Y.tolist()):
        keep = [c for c in range(3) if c != y]
        ps = torch.softmax(z[i, keep] / tau, 0)
        pt = torch.softmax(g[i, keep] / tau, 0)
        out[i, keep] = tau * (ps - pt) / len(Y)
    return out


def test_the_gradient_is_the_hand_gradient():
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    g = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    not_true_kl(z, g, Y, TAU).backward()
    assert torch.allclose(z.grad, _ntd_grad(z.detach(), g, TAU), atol=1e-6)


def _hand_two_steps(beta):
    """Two full-batch SGD steps; the teacher is W0. The first step's term has zero gradient (student = teacher)."""
    w = W0.clone()
    for _ in range(2):
        z = X @ w.T
        p = torch.softmax(z, 1)
        dz = (p - F.one_hot(Y, 3).float()) / len(Y) + beta * _ntd_grad(z, X @ W0.T, TAU)
        w = w - LR * dz.T @ X
    return w


def test_plain_trainer_steps_match_the_hand_gradient():
    model = TinyClassifier(W0, LR)
    trainer = quiet_trainer(2, [FedNTDClient(beta=BETA, temperature=TAU)])
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(X, Y), batch_size=4))
    assert torch.allclose(model.lin.weight.detach(), _hand_two_steps(BETA), atol=1e-6)
    assert not torch.allclose(_hand_two_steps(BETA), _hand_two_steps(0.0), atol=1e-3)  # the term matters here
    assert not model._forward_hooks and "training_step" not in model.__dict__  # removed after training


def test_fedloop_client_matches_the_hand_gradient(tmp_path):
    """One client, one round of two full-batch steps: the teacher is the model the client received."""
    strategy = FedNTD(beta=BETA, temperature=TAU)
    assert strategy.client_callbacks() == [strategy.client]
    assert (strategy.client.beta, strategy.client.temperature) == (BETA, TAU)
    model = TinyClassifier(W0, LR)
    quiet_loop(
        tmp_path, num_clients=1, clients_per_round=1, rounds=1, local_epochs=2, partition=IID(), strategy=strategy
    ).fit(model, FullBatch(X, Y))
    assert torch.allclose(model.lin.weight.detach(), _hand_two_steps(BETA), atol=1e-6)
    assert not model._forward_hooks and "training_step" not in model.__dict__


def test_beta_zero_is_fedavg_bit_for_bit(small_dm, tmp_path):
    fedavg = fit_small(FedAvg(), small_dm, tmp_path / "a")
    same = fit_small(FedNTD(beta=0.0), small_dm, tmp_path / "b")
    assert all(torch.equal(fedavg[k], same[k]) for k in fedavg)
    ntd = fit_small(FedNTD(beta=1.0), small_dm, tmp_path / "c")
    assert not all(torch.equal(fedavg[k], ntd[k]) for k in fedavg)


class _Batches(L.LightningModule):
    """Classifier over batches of another shape: ``(x, y)`` with float labels or 2 classes."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.lin = nn.Linear(2, classes)

    def forward(self, x):
        return self.lin(x)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return self(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "classes, labels, match",
    [
        (3, torch.tensor([0.0, 1.0, 2.0, 1.0]), r"labels must be 4 integer class indices"),
        (2, torch.tensor([0, 1, 0, 1]), r"\[B, C\] class logits with C >= 3"),
        (3, torch.tensor([0, 1, 3, 1]), r"a label is outside \[0, 3\)"),
    ],
)
def test_bad_batches_raise_a_clear_error(classes, labels, match):
    trainer = quiet_trainer(2, [FedNTDClient()])
    with pytest.raises(ValueError, match=match):
        trainer.fit(_Batches(classes), train_dataloaders=DataLoader(TensorDataset(X, labels), batch_size=4))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: FedNTD(beta=-0.1), r"FedNTD: beta=-0.1 is not allowed; beta must be a finite number >= 0"),
        (lambda: FedNTD(beta=float("inf")), r"FedNTD: beta=inf is not allowed"),
        (lambda: FedNTD(temperature=0.0), r"FedNTD: temperature=0.0 is not allowed; temperature must be a finite"),
        (lambda: FedNTD(beta=True), r"FedNTD: beta=True is not allowed"),
        (lambda: FedNTDClient(temperature="1"), r"FedNTDClient: temperature='1' is not allowed"),
        (lambda: FedNTDClient(label_index=-1), r"FedNTDClient: label_index=-1 is not allowed"),
        (lambda: FedNTD(server_lr=0.0), r"server_lr=0.0 is not allowed"),
    ],
)
def test_bad_settings_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_doc_example_runs(tmp_path):
    scope = run_strategies_doc_example("FedNTD(", "runs/fedntd", tmp_path)
    assert 0 <= scope["result"].final_metrics["test_acc"] <= 1 and len(scope["result"].history) == 2
