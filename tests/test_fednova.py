"""FedNova: a hand-computed two-client example (plain SGD and momentum), the accumulation norm against real
torch SGD steps, equal steps giving FedAvg, and a FedLoop run with stragglers."""

import lightning as L
import pytest
import torch
from torch import nn

from lightning_fed import FedLoop
from lightning_fed.callbacks import Stragglers
from lightning_fed.data import IID
from lightning_fed.protocol import Reply
from lightning_fed.strategies import FedAvg, FedNova
from lightning_fed.strategies.fednova import accumulation_norm, fednova_weights


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))


def _aggregate(strategy, replies):
    strategy.setup(Two())
    strategy.aggregate(0, replies)
    return strategy.global_payload()["w"]


def _replies():
    # client A: 1 example, 2 steps, moved (-2, 0); client B: 3 examples, 4 steps, moved (0, -4)
    return [
        Reply(0, {"w": torch.tensor([-2.0, 0.0])}, 1, local_steps=2),
        Reply(1, {"w": torch.tensor([0.0, -4.0])}, 3, local_steps=4),
    ]


def test_two_clients_plain_sgd_by_hand():
    # p = (1/4, 3/4), a = (2, 4), tau_eff = 1/4 * 2 + 3/4 * 4 = 3.5
    # update = 3.5 * (1/4 * (-2, 0) / 2 + 3/4 * (0, -4) / 4) = 3.5 * (-0.25, -0.75) = (-0.875, -2.625)
    assert torch.allclose(_aggregate(FedNova(), _replies()), torch.tensor([-0.875, -2.625]))
    # FedAvg weighs B's 4 steps twice as much: (1/4 * -2, 3/4 * -4) = (-0.5, -3.0)
    assert torch.allclose(_aggregate(FedAvg(), _replies()), torch.tensor([-0.5, -3.0]))
    weights, tau_eff = fednova_weights([1, 3], [2, 4])
    assert tau_eff == 3.5 and weights == pytest.approx([0.25 * 3.5 / 2, 0.75 * 3.5 / 4])


def test_two_clients_momentum_by_hand():
    # rho = 0.5: a(2) = (2 - 0.5 * 0.75 / 0.5) / 0.5 = 2.5; a(4) = (4 - 0.5 * 0.9375 / 0.5) / 0.5 = 6.125
    # tau_eff = 1/4 * 2.5 + 3/4 * 6.125 = 5.21875
    # update = 5.21875 * (1/4 * (-2, 0) / 2.5, 3/4 * (0, -4) / 6.125) = (-1.04375, -2.5561224...)
    expected = torch.tensor([5.21875 * 0.25 * -2 / 2.5, 5.21875 * 0.75 * -4 / 6.125])
    assert torch.allclose(_aggregate(FedNova(momentum=0.5), _replies()), expected)
    assert accumulation_norm(2, 0.5) == 2.5 and accumulation_norm(4, 0.5) == 6.125


@pytest.mark.parametrize("rho, steps", [(0.0, 5), (0.5, 3), (0.9, 7)])
def test_accumulation_norm_is_how_far_torch_sgd_moves_on_a_constant_gradient(rho, steps):
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.1, momentum=rho)
    for _ in range(steps):
        opt.zero_grad()
        w.sum().backward()  # gradient 1
        opt.step()
    assert float(-w.detach()) / 0.1 == pytest.approx(accumulation_norm(steps, rho), rel=1e-12)


def test_equal_steps_is_fedavg_and_zero_steps_are_left_out():
    replies = _replies()
    for r in replies:
        r.local_steps = 3
    assert torch.allclose(_aggregate(FedNova(), replies), _aggregate(FedAvg(), replies))
    idle = [*_replies(), Reply(2, {"w": torch.tensor([5.0, 5.0])}, 10, local_steps=0)]
    assert torch.equal(_aggregate(FedNova(), idle), _aggregate(FedNova(), _replies()))
    nobody = FedNova()
    nobody.setup(Two())
    assert nobody.aggregate(0, [Reply(0, {"w": torch.ones(2)}, 1, local_steps=0)]) == {"tau_eff": 0.0}
    assert torch.equal(nobody.global_payload()["w"], torch.zeros(2))


def test_fedloop_with_stragglers_logs_tau_eff(tmp_path):
    class Linear(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.lin(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            ds = torch.utils.data.TensorDataset(
                torch.randn(60, 3, generator=g), torch.randint(0, 2, (60,), generator=g)
            )
            return torch.utils.data.DataLoader(ds, batch_size=5)

    L.seed_everything(0)
    loop = FedLoop(
        num_clients=4,
        clients_per_round=4,
        rounds=2,
        local_epochs=4,
        partition=IID(),
        strategy=FedNova(momentum=0.9),
        callbacks=[Stragglers(0.5, "partial")],
        verbose=False,
        plot=False,
        checkpoint_every=0,
        loggers=[],
        output_dir=str(tmp_path),
    )
    res = loop.fit(Linear(), Data())
    full = accumulation_norm(12, 0.9)  # 4 epochs of 3 batches
    assert all(0 < h["tau_eff"] < full for h in res.history)  # two of the four clients stopped early


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: FedNova(momentum=1.0),
            r"FedNova: momentum=1.0 is not allowed; momentum must be a number in \[0, 1\)",
        ),
        (lambda: FedNova(momentum=-0.1), r"momentum=-0.1 is not allowed"),
        (lambda: FedNova(max_steps=0), r"FedNova: max_steps=0 is not allowed; max_steps must be an int >= 1"),
    ],
)
def test_bad_settings_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()
