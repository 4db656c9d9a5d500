"""I-BAU: the universal perturbation of a hand-computed linear model, the radius, a step that raises the perturbed
loss and then lowers it, FedLoop metrics and an identical resumed run, nothing under lightning.Trainer, bad
settings named."""

from __future__ import annotations

import warnings

import pytest
import torch
from _defence_common import mnist_clean, run_and_resume, trainer_fit
from torch import nn

from lightning_fed.callbacks import IBAU
from lightning_fed.callbacks.ibau import perturbed_loss, universal_perturbation
from lightning_fed.data import PublicData
from lightning_fed.models import MNIST1DCNN

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def linear_model() -> nn.Linear:
    """Logits ``(x_0, -x_0)``: class 0 wins by ``2 x_0``; the second input is ignored."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        model.bias.zero_()
    return model


def test_universal_perturbation_of_a_linear_model_by_hand():
    # every record is class 0: the loss grows fastest along -e0 whatever x is, so the ascent ends on the ball's
    # boundary at (-radius, 0); the model's weights, gradients and mode are left as they were
    model = linear_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 2, generator=g), torch.zeros(20, dtype=torch.long)
    delta = universal_perturbation(model, x, y, radius=0.7, steps=5)
    assert torch.allclose(delta, torch.tensor([-0.7, 0.0]), atol=1e-6)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters()) and model.training
    assert perturbed_loss(model, x, y, delta) > perturbed_loss(model, x, y, torch.zeros(2))


def test_radius_is_eps_times_the_mean_record_norm():
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5 and 1, mean 3
    clean = PublicData.from_tensors(x, torch.tensor([0, 1]))
    assert IBAU(clean=clean, eps=0.5).radius(x) == pytest.approx(1.5)


def test_a_step_unlearns_the_perturbation_it_found():
    """The loss under the first round's perturbation is above the clean loss; after training under it the loss under
    the last round's (freshly found, the worst the model now has) perturbation is lower."""
    torch.manual_seed(0)
    model = MNIST1DCNN()
    ibau = IBAU(clean=mnist_clean(), eps=0.3, rounds=8, steps=5, lr=0.05, holdout=0.2)
    xt, yt, _, _ = ibau.data()
    clean_loss = perturbed_loss(model, xt, yt, torch.zeros(xt.shape[1:]))
    record = ibau.defend(None, model, 0)
    assert record["radius"] == pytest.approx(ibau.radius(xt))
    assert record["loss_before"] > clean_loss
    assert record["loss_after"] < record["loss_before"]
    assert {"acc_before", "acc_after"} <= record.keys()


def test_in_fedloop_logs_and_a_resumed_run_ends_identical(tmp_path):
    def cb():
        return IBAU(clean=mnist_clean(), at=[1], rounds=2, steps=3)

    res, _, again = run_and_resume(tmp_path, cb)
    assert {"ibau_acc_before", "ibau_acc_after", "ibau_radius", "ibau_loss_before"} <= res.history[1].keys()
    assert "ibau_radius" not in res.history[0]
    assert again.done == [1]


def test_does_nothing_under_lightning_trainer(tmp_path):
    plain = trainer_fit(tmp_path, [])
    cb = IBAU(clean=mnist_clean(), at=0)
    defended = trainer_fit(tmp_path, [cb])
    assert cb.done == []
    for k, v in plain.state_dict().items():
        assert torch.equal(defended.state_dict()[k], v), k


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"eps": 0}, r"eps=0 .* > 0"),
        ({"steps": 0}, r"steps=0 .* integer >= 1"),
        ({"rounds": -1}, r"rounds=-1 .* integer >= 0"),
        ({"rounds": 1.5}, r"rounds=1\.5"),
        ({"lr": 0}, r"lr=0 .* > 0"),
        ({"clean": PublicData(num_samples=10)}, r"clean=.* labelled PublicData"),
    ],
)
def test_invalid_settings_name_the_key(kw, match):
    kw = {"clean": mnist_clean(), **kw}
    with pytest.raises(ValueError, match=match):
        IBAU(**kw)
