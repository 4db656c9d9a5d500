"""FedProx: the proximal gradient against a hand computation (the callback alone, two SGD steps under a plain
lightning.Trainer, and inside FedLoop), the strategy installing its client callback, and bad settings."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _tiny_fit import quiet_loop, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed.data import IID
from lightning_fed.strategies import FedAvg, FedProx, FedProxClient

X = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
Y = torch.tensor([1.0, 0.0])
W0 = torch.tensor([0.5, -1.0])
LR, MU = 0.1, 0.5


class Linear(L.LightningModule):
    """``y = w . x`` with a mean squared error, plain SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(W0.clone())

    def forward(self, x):
        return x @ self.w

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class Data(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(TensorDataset(X, Y), batch_size=2)


def mse_grad(w):
    """The gradient of mean((X w - Y)^2), by hand: 2/n X^T (X w - Y)."""
    return 2 / len(Y) * X.T @ (X @ w - Y)


def test_callback_adds_mu_times_distance_to_the_start():
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    module = nn.Module()
    module.p = p
    trainer = SimpleNamespace(lightning_module=module)
    cb = FedProxClient(mu=0.3)
    cb.on_train_start(trainer, module)
    with torch.no_grad():
        p.copy_(torch.tensor([2.0, 0.0]))
    p.grad = torch.tensor([0.5, -1.0])
    cb.on_before_optimizer_step(trainer, module, torch.optim.SGD([p], lr=1.0))
    assert torch.allclose(p.grad, torch.tensor([0.5 + 0.3 * 1.0, -1.0 + 0.3 * -2.0]))
    cb.on_train_end(trainer, module)
    p.grad = torch.tensor([0.5, -1.0])
    cb.on_before_optimizer_step(trainer, module, torch.optim.SGD([p], lr=1.0))  # no anchor after training
    assert torch.equal(p.grad, torch.tensor([0.5, -1.0]))


def _hand_two_steps(mu):
    w1 = W0 - LR * mse_grad(W0)  # the first step starts at w_start: the term is 0
    return w1 - LR * (mse_grad(w1) + mu * (w1 - W0))


def test_plain_trainer_two_sgd_steps_match_the_hand_computation():
    model = Linear()
    trainer = quiet_trainer(2, [FedProxClient(mu=MU)])
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(X, Y), batch_size=2))
    assert torch.allclose(model.w.detach(), _hand_two_steps(MU), atol=1e-6)
    assert not torch.allclose(_hand_two_steps(MU), _hand_two_steps(0.0), atol=1e-3)  # the term matters here


def test_fedloop_client_matches_the_hand_computation(tmp_path):
    """One client, one round, two local epochs of one full batch each: the global model is the hand result."""
    strategy = FedProx(mu=MU)
    assert strategy.client_callbacks() == [strategy.client] and strategy.client.mu == MU
    loop = quiet_loop(
        tmp_path, num_clients=1, clients_per_round=1, rounds=1, local_epochs=2, partition=IID(), strategy=strategy
    )
    model = Linear()
    loop.fit(model, Data())
    assert torch.allclose(model.w.detach(), _hand_two_steps(MU), atol=1e-6)


def test_fedprox_mu_zero_is_fedavg(tmp_path):
    def run(strategy):
        L.seed_everything(0)
        model = Linear()
        quiet_loop(tmp_path, num_clients=2, clients_per_round=2, rounds=2, local_epochs=3, strategy=strategy).fit(
            model, Data()
        )
        return model.w.detach().clone()

    assert torch.equal(run(FedProx(mu=0.0)), run(FedAvg()))
    assert not torch.equal(run(FedProx(mu=1.0)), run(FedAvg()))


def test_max_steps_goes_into_every_instruction():
    model = Linear()
    strategy = FedProx(mu=0.1, max_steps=3)
    strategy.setup(model)
    instructions = strategy.configure_round(0, [0, 1])
    assert [i.config["max_steps"] for i in instructions] == [3, 3]
    uncapped = FedProx(mu=0.1)
    uncapped.setup(model)
    assert all("max_steps" not in i.config for i in uncapped.configure_round(0, [0, 1]))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: FedProxClient(mu=-0.1), r"FedProxClient: mu=-0.1 is not allowed"),
        (lambda: FedProx(mu=-1.0), r"mu=-1.0 is not allowed; mu must be a number >= 0"),
        (lambda: FedProx(max_steps=0), r"FedProx: max_steps=0 is not allowed; max_steps must be an int >= 1"),
        (lambda: FedProx(max_steps=2.5), r"max_steps=2.5 is not allowed"),
    ],
)
def test_bad_settings_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()
