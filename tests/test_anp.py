"""ANP: the masked and perturbed channel output by hand, pruning zeroes exactly the channels below the threshold, the
masks of an unperturbed search stay at 1 for a channel the loss does not depend on, the search leaves the model
unchanged, FedLoop metrics and an identical resumed run, bad settings named."""

from __future__ import annotations

import warnings

import pytest
import torch
from _defence_common import dm, fedloop, mnist_clean, run_and_resume
from torch import nn

from lightning_fed.callbacks import ANP
from lightning_fed.callbacks.anp import _Perturbed, prune_
from lightning_fed.models import MNIST1DCNN

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def test_channel_output_by_hand():
    # Linear 1 -> 2 with w = (2, 3), b = (1, -1), input 1: outputs 3 and 2; mask (0.5, 1), delta (0.1, -0.2),
    # xi (0.5, 0): (0.5 + 0.1) * 2 + 1.5 * 1 = 2.7 and (1 - 0.2) * 3 + 1 * (-1) = 1.4; unperturbed: 0.5 * 2 + 1 = 2
    # and 3 - 1 = 2
    lin = nn.Linear(1, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0], [3.0]]))
        lin.bias.copy_(torch.tensor([1.0, -1.0]))
    model = nn.Sequential(lin)
    hooks = _Perturbed(model, ["0"])
    hooks.mask["0"] = torch.tensor([0.5, 1.0])
    hooks.delta["0"], hooks.xi["0"] = torch.tensor([0.1, -0.2]), torch.tensor([0.5, 0.0])
    x = torch.ones(1, 1)
    hooks.perturb = True
    assert torch.allclose(model(x), torch.tensor([[2.7, 1.4]]))
    hooks.perturb = False
    assert torch.allclose(model(x), torch.tensor([[2.0, 2.0]]))
    hooks.remove()
    assert torch.allclose(model(x), torch.tensor([[3.0, 2.0]]))


def test_prune_zeroes_exactly_the_channels_below_the_threshold():
    torch.manual_seed(0)
    model = MNIST1DCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {"conv2": torch.linspace(0, 1, 25), "conv3": torch.ones(25)}
    pruned = prune_(model, masks, 0.2)
    assert pruned == {"conv2": [0, 1, 2, 3, 4], "conv3": []}  # 0, 1/24, ..., 4/24 = 0.167 < 0.2 <= 5/24
    assert model.conv2.weight[:5].abs().sum() == 0 and model.conv2.bias[:5].abs().sum() == 0
    assert torch.equal(model.conv2.weight[5:], before["conv2.weight"][5:])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items() if not k.startswith("conv2"))


def test_masks_leave_the_model_unchanged_and_stay_in_range():
    torch.manual_seed(0)
    model = MNIST1DCNN()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clean = mnist_clean()
    anp = ANP(clean=clean, layers=["conv1", "conv2", "conv3"], iterations=20, batch_size=32)
    masks = anp.masks(model, clean.x, clean.y, torch.Generator().manual_seed(0))
    assert set(masks) == {"conv1", "conv2", "conv3"} and all(len(m) == 25 for m in masks.values())
    assert all(bool(((m >= 0) & (m <= 1)).all()) for m in masks.values())
    assert any(bool((m < 1).any()) for m in masks.values())  # the masks moved
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    again = anp.masks(model, clean.x, clean.y, torch.Generator().manual_seed(0))
    assert all(torch.equal(masks[k], again[k]) for k in masks)  # seeded


def test_a_dead_channel_keeps_its_mask():
    # conv3's channel 0 has zero weights and bias: its output is 0 whatever the mask, so its mask gets no gradient
    torch.manual_seed(0)
    model = MNIST1DCNN()
    with torch.no_grad():
        model.conv3.weight[0] = 0
        model.conv3.bias[0] = 0
    clean = mnist_clean()
    anp = ANP(clean=clean, layers=["conv3"], iterations=10, batch_size=32)
    masks = anp.masks(model, clean.x, clean.y, torch.Generator().manual_seed(0))
    assert masks["conv3"][0] == 1.0


def test_in_fedloop_logs_and_a_resumed_run_ends_identical(tmp_path):
    def cb():
        return ANP(clean=mnist_clean(), layers=["conv2", "conv3"], at=[1], iterations=10, threshold=0.9)

    res, first, again = run_and_resume(tmp_path, cb)
    assert {"anp_acc_before", "anp_acc_after", "anp_pruned"} <= res.history[1].keys()
    assert res.history[1]["anp_pruned"] == sum(len(v) for v in first.records[0]["pruned_channels"].values())
    assert again.done == [1]


def test_unknown_layers_are_refused_at_setup(tmp_path):
    with pytest.raises(ValueError, match=r"layers=\['conv3', 'head2'\] .*\['head2'\] are not"):
        fedloop(tmp_path, 1, [ANP(clean=mnist_clean(), layers=["conv3", "head2"])]).fit(MNIST1DCNN(), dm())


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"layers": []}, r"layers=\[\] .* non-empty list"),
        ({"eps": 0}, r"eps=0 .* > 0"),
        ({"alpha": 1.5}, r"alpha=1\.5 .* \[0, 1\]"),
        ({"threshold": -0.1}, r"threshold=-0\.1 .* \[0, 1\]"),
        ({"iterations": -1}, r"iterations=-1 .* integer >= 0"),
        ({"lr": 0}, r"lr=0 .* > 0"),
    ],
)
def test_invalid_settings_name_the_key(kw, match):
    kw = {"clean": mnist_clean(), "layers": ["conv3"], **kw}
    with pytest.raises(ValueError, match=match):
        ANP(**kw)
