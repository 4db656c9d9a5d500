"""FedRS: the restricted logits and loss against a hand computation, one SGD step of a tiny classifier under a plain
lightning.Trainer and inside FedLoop against the hand-derived gradient, plain logits in eval mode, alpha = 1 being
FedAvg bit for bit, and bad settings."""

import math

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
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed.data import IID
from lightning_fed.strategies import FedAvg, FedRS, FedRSClient
from lightning_fed.strategies.fedrs import restrict_logits

# 4 records of 2 features, labels 0 and 2 only: class 1 is missing on this client
X = torch.tensor([[1.0, 2.0], [3.0, -1.0], [-0.5, 1.0], [2.0, 0.5]])
Y = torch.tensor([0, 2, 0, 2])
W0 = torch.tensor([[0.5, -1.0], [1.0, 0.5], [-0.3, 0.2]])
LR, ALPHA = 0.1, 0.5


def test_restricted_logits_and_loss_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 4.0]])
    out = restrict_logits(logits, torch.tensor([0, 2]), 0.5)
    assert torch.equal(out, torch.tensor([[1.0, 1.0, 3.0], [-1.0, 0.0, 4.0]]))
    # cross-entropy of the restricted logits, labels 2 and 0, written out
    hand = (
        -(3.0 - math.log(math.exp(1.0) + math.exp(1.0) + math.exp(3.0)))
        - (-1.0 - math.log(math.exp(-1.0) + math.exp(0.0) + math.exp(4.0)))
    ) / 2
    assert F.cross_entropy(out, torch.tensor([2, 0])).item() == pytest.approx(hand, rel=1e-6)
    assert torch.equal(
        restrict_logits(logits, torch.tensor([0, 1, 2]), 0.5), logits
    )  # every class held: unchanged
    with pytest.raises(ValueError, match="holds label 3 but the model's output has 3 values"):
        restrict_logits(logits, torch.tensor([0, 3]), 0.5)


def _hand_step(alpha):
    """One full-batch SGD step on the restricted cross-entropy, its gradient derived by hand:
    z' = s * (X W^T) with s = (1, alpha, 1); dL/dW = ((softmax(z') - onehot(Y)) / n * s)^T X."""
    s = torch.tensor([1.0, alpha, 1.0])
    z = (X @ W0.T) * s
    p = torch.exp(z) / torch.exp(z).sum(1, keepdim=True)
    g = (p - F.one_hot(Y, 3).float()) / len(Y) * s
    return W0 - LR * g.T @ X


def test_plain_trainer_step_matches_the_hand_gradient():
    model = TinyClassifier(W0, LR)
    trainer = quiet_trainer(1, [FedRSClient(alpha=ALPHA)])
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(X, Y), batch_size=4))
    assert torch.allclose(model.lin.weight.detach(), _hand_step(ALPHA), atol=1e-6)
    assert not torch.allclose(_hand_step(ALPHA), _hand_step(1.0), atol=1e-3)  # the scaling matters here
    assert not model._forward_hooks  # removed after training


def test_fedloop_client_matches_the_hand_gradient(tmp_path):
    """One client holding classes 0 and 2, one round of one full-batch step: the global model is the hand result."""
    strategy = FedRS(alpha=ALPHA)
    assert strategy.client_callbacks() == [strategy.client] and strategy.client.alpha == ALPHA
    model = TinyClassifier(W0, LR)
    quiet_loop(
        tmp_path,
        num_clients=1,
        clients_per_round=1,
        rounds=1,
        local_epochs=1,
        partition=IID(),
        strategy=strategy,
    ).fit(model, FullBatch(X, Y))
    assert torch.allclose(model.lin.weight.detach(), _hand_step(ALPHA), atol=1e-6)
    assert not model._forward_hooks


def test_eval_mode_sees_plain_logits():
    model = TinyClassifier(W0, LR)
    trainer = type(
        "T", (), {"lightning_module": model, "train_dataloader": DataLoader(TensorDataset(X, Y))}
    )()
    cb = FedRSClient(alpha=0.0)
    cb.on_train_start(trainer, model)
    plain = X @ W0.T
    with torch.no_grad():
        assert torch.equal(model(X)[:, 1], torch.zeros(4))  # train mode: the missing class's logit times 0
        model.eval()
        assert torch.allclose(model(X), plain)
    cb.on_train_end(trainer, model)
    model.train()
    with torch.no_grad():
        assert torch.allclose(model(X), plain)


def test_alpha_one_is_fedavg_bit_for_bit(small_dm, tmp_path):
    fedavg = fit_small(FedAvg(), small_dm, tmp_path / "a")
    same = fit_small(FedRS(alpha=1.0), small_dm, tmp_path / "b")
    assert all(torch.equal(fedavg[k], same[k]) for k in fedavg)
    restricted = fit_small(FedRS(alpha=0.5), small_dm, tmp_path / "c")
    assert not all(torch.equal(fedavg[k], restricted[k]) for k in fedavg)  # Dirichlet 0.1 shards miss classes


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: FedRS(alpha=-0.1), r"FedRS: alpha=-0.1 is not allowed; alpha must be a number in \[0, 1\]"),
        (lambda: FedRS(alpha=1.5), r"FedRS: alpha=1.5 is not allowed"),
        (lambda: FedRS(alpha=True), r"FedRS: alpha=True is not allowed"),
        (lambda: FedRSClient(alpha="0.5"), r"FedRSClient: alpha='0.5' is not allowed"),
        (lambda: FedRS(alpha=0.5, server_lr=0.0), r"server_lr=0.0 is not allowed"),
    ],
)
def test_bad_settings_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_doc_example_runs(tmp_path):
    scope = run_strategies_doc_example("FedRS(", "runs/fedrs", tmp_path)
    assert 0 <= scope["result"].final_metrics["test_acc"] <= 1 and len(scope["result"].history) == 2
