"""Server-side backdoor defences: fine-pruning removes the channels a hand computation says are dormant and a resumed
run replays it; NAD never changes its teacher; MCR's curve joins its two models; bad settings fail clearly."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _defence_common import dm, fedloop, mnist_clean
from torch import nn

from lightning_fed.callbacks import MCR, NAD, FinePruning
from lightning_fed.callbacks.fine_pruning import mean_activation
from lightning_fed.callbacks.mcr import bezier
from lightning_fed.data import PublicData
from lightning_fed.models import MNIST1DCNN

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class Tiny(L.LightningModule):
    """A 1x1 convolution of 4 channels and a linear head over 8 positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 1)
        self.head = nn.Linear(4 * 8, 2)

    def forward(self, x):
        return self.head(F.relu(self.conv(x.view(len(x), 1, -1))).flatten(1))


def clean_data(n: int = 40, seed: int = 0) -> PublicData:
    g = torch.Generator().manual_seed(seed)
    return PublicData.from_tensors(torch.rand(n, 8, generator=g) + 0.5, torch.randint(0, 2, (n,), generator=g))


def test_fine_pruning_removes_the_dormant_channels_of_a_hand_computation():
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():  # per channel: relu(w * x + b) with x in [0.5, 1.5)
        model.conv.weight.copy_(torch.tensor([1.0, -1.0, 2.0, 0.1]).view(4, 1, 1))
        model.conv.bias.zero_()
    clean = clean_data()
    cb = FinePruning(clean=clean, layer="conv", ratio=0.5, at=0, holdout=0.0, epochs=0)
    x = clean.x
    expected = torch.stack([x.mean(), torch.tensor(0.0), 2 * x.mean(), 0.1 * x.mean()]).double()
    assert torch.allclose(mean_activation(model, "conv", x), expected)
    kept_w, kept_head = model.conv.weight[[0, 2]].clone(), model.head.weight.view(2, 4, 8)[:, [0, 2]].clone()
    record = cb.defend(None, model, 0)  # outside the schedule, no trainer: as the benchmark repairs a copy
    assert record["pruned"] == [1, 3] and record["channels"] == 2  # the dead channel and the weakest one
    assert model.conv.out_channels == 2 and model.head.in_features == 2 * 8  # really smaller
    assert torch.equal(model.conv.weight, kept_w)
    assert torch.equal(model.head.weight.view(2, 2, 8), kept_head)


def test_fine_pruning_in_fedloop_replays_on_resume(tmp_path):
    def cb():
        return FinePruning(clean=mnist_clean(), layer="conv3", ratio=0.4, at=[0], epochs=1)

    L.seed_everything(0)
    full, fp = MNIST1DCNN(), cb()
    res = fedloop(tmp_path / "a", 3, [fp]).fit(full, dm())
    assert full.conv3.out_channels == 15 and full.head.in_features == 15 * 5
    assert res.history[0]["fp_pruned_channels"] == 10 and "fp_acc_after" in res.history[0]
    assert fp.records[0]["pruned"] == sorted(fp.history[0][2])
    L.seed_everything(0)
    run = fedloop(tmp_path / "b", 2, [cb()]).fit(MNIST1DCNN(), dm()).run_dir
    L.seed_everything(1)  # another initial model: the structure and the weights come from the checkpoint
    resumed, fp2 = MNIST1DCNN(), cb()
    fedloop(tmp_path / "b", 3, [fp2]).fit(resumed, dm(), resume=run)
    assert fp2.done == [0] and fp2.history == fp.history
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_nad_never_changes_the_teacher():
    torch.manual_seed(0)
    student, teacher = MNIST1DCNN(), MNIST1DCNN()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    clean = mnist_clean()
    nad = NAD(clean=clean, layers=["conv2", "conv3"], epochs=2, beta=100.0)
    loss = nad.distill(student, teacher, clean.x, clean.y, torch.Generator().manual_seed(0))
    assert loss > 0
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(student.state_dict()[k], v) for k, v in s_before.items())  # the student learned


def test_nad_and_mcr_in_fedloop_log_and_resume(tmp_path):
    def cbs():
        return [NAD(clean=mnist_clean(), layers=["conv3"], at=[0], teacher_epochs=1, epochs=1),
                MCR(clean=mnist_clean(), at=[1], endpoint_epochs=1, epochs=2)]

    L.seed_everything(0)
    full = MNIST1DCNN()
    res = fedloop(tmp_path / "a", 3, cbs()).fit(full, dm())
    assert {"nad_acc_before", "nad_teacher_acc", "nad_acc_after"} <= res.history[0].keys()
    assert {"mcr_acc_before", "mcr_endpoint_acc", "mcr_acc_after", "mcr_t"} <= res.history[1].keys()
    L.seed_everything(0)
    run = fedloop(tmp_path / "b", 1, cbs()).fit(MNIST1DCNN(), dm()).run_dir
    L.seed_everything(1)
    resumed, again = MNIST1DCNN(), cbs()
    fedloop(tmp_path / "b", 3, again).fit(resumed, dm(), resume=run)
    assert again[0].done == [0] and again[1].done == [1]
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_mcr_curve_endpoints_are_the_joined_models():
    torch.manual_seed(0)
    w1 = {k: v.detach().clone() for k, v in MNIST1DCNN().named_parameters()}
    w2 = {k: v.detach().clone() for k, v in MNIST1DCNN().named_parameters()}
    model = MNIST1DCNN()
    clean = mnist_clean()
    mcr = MCR(clean=clean, epochs=1)
    theta = mcr.train_curve(model, w1, w2, clean.x, clean.y, torch.Generator().manual_seed(0))
    assert any(not torch.equal(theta[k], (w1[k] + w2[k]) / 2) for k in w1)  # the control point was trained
    for t, end in ((0.0, w1), (1.0, w2)):
        point = bezier(w1, theta, w2, t)
        assert all(torch.equal(point[k], end[k]) for k in w1)
        mcr.load_point(model, point)
        assert all(torch.equal(p, end[k]) for k, p in model.named_parameters())
    mid = bezier(w1, theta, w2, 0.5)
    assert all(torch.allclose(mid[k], 0.25 * w1[k] + 0.5 * theta[k] + 0.25 * w2[k]) for k in w1)


@pytest.mark.parametrize(("cls", "kw", "match"), [
    (FinePruning, {"layer": "conv3", "clean": PublicData(num_samples=10)}, r"clean=.* labelled PublicData"),
    (FinePruning, {"layer": "", "clean": "x"}, r"clean='x'"),
    (FinePruning, {"layer": "", "clean": None}, r"clean=None"),
    (FinePruning, {"layer": ""}, r"layer='' .* Conv/Linear"),
    (FinePruning, {"layer": "conv3", "ratio": 1.0}, r"ratio=1\.0 .* in \(0, 1\)"),
    (FinePruning, {"layer": "conv3", "at": [-1]}, r"at=\[-1\]"),
    (FinePruning, {"layer": "conv3", "holdout": 1.0}, r"holdout=1\.0"),
    (FinePruning, {"layer": "conv3", "epochs": -1}, r"epochs=-1"),
    (NAD, {"layers": []}, r"layers=\[\] .* non-empty list"),
    (NAD, {"layers": ["conv3"], "beta": -1.0}, r"beta=-1\.0"),
    (NAD, {"layers": ["conv3"], "lr": 0}, r"lr=0 .* > 0"),
    (NAD, {"layers": ["conv3"], "teacher_epochs": 1.5}, r"teacher_epochs=1\.5"),
    (MCR, {"holdout": 0.0}, r"holdout=0\.0 .* in \(0, 1\)"),
    (MCR, {"grid": [0.5, 1.5]}, r"grid=\[0\.5, 1\.5\]"),
    (MCR, {"grid": []}, r"grid=\[\]"),
    (MCR, {"momentum": 1.0}, r"momentum=1\.0"),
    (MCR, {"batch_size": 0}, r"batch_size=0"),
])
def test_invalid_settings_raise(cls, kw, match):
    kw = {"clean": clean_data(), **kw}
    with pytest.raises(ValueError, match=match):
        cls(**kw)


def test_unknown_layers_are_refused_at_setup(tmp_path):
    for cb, match in ((FinePruning(clean=mnist_clean(), layer="conv9"), r"layer='conv9' .* one of \['conv1'"),
                      (NAD(clean=mnist_clean(), layers=["conv3", "nope"]), r"\['nope'\] are not")):
        with pytest.raises(ValueError, match=match):
            fedloop(tmp_path, 1, [cb]).fit(MNIST1DCNN(), dm())
