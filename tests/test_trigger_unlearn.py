"""Trigger inversion and unlearning: the anomaly index by hand, the inversion of a constructed model with a known
trigger, a tiny backdoored model trained here whose backdoor the defence removes, FedLoop metrics and a resumed run
that ends identical, nothing under lightning.Trainer, bad settings named."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from _defence_common import mnist_clean, run_and_resume_models, trainer_fit
from safetensors.torch import load_file
from torch import nn

from lightning_fed.callbacks import TriggerUnlearn
from lightning_fed.callbacks.backdoor import apply_trigger
from lightning_fed.callbacks.trigger_unlearn import TRIGGERS_FILE, anomaly_index, stamp, success
from lightning_fed.data import PublicData
from lightning_fed.models import MNIST1DCNN

warnings.filterwarnings("ignore", ".*does not have many workers.*")

K, AT = 2, 34  # the constructed model's backdoor target and its trigger's first position


class Planted(nn.Module):
    """4 classes, class ``c`` decided by the mean of ``tanh`` of values ``8c..8c+7`` (on records where the class's
    block is +2, reaching another class takes overwriting most of its block), values 32-39 unread but for a
    backdoor: class ``K``'s logit rises by up to 30 (a sigmoid) once the mean of values ``AT..AT+3`` exceeds 1.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        jump = 30 * torch.sigmoid(4 * (x[:, AT : AT + 4].mean(dim=1) - 1.5))
        return (
            10 * torch.tanh(x[:, :32]).view(-1, 4, 8).mean(dim=2)
            + F.one_hot(torch.tensor(K), 4) * jump[:, None]
        )


def planted_clean() -> PublicData:
    """200 records: Gaussian values of std 0.5, plus 2 on the 8 values of a random class's block; labelled by the
    planted model."""
    g = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(200, 40, generator=g)
    cls = torch.randint(0, 4, (200,), generator=g)
    x[:, :32].view(200, 4, 8)[torch.arange(200), cls] += 2.0
    with torch.no_grad():
        y = Planted()(x).argmax(dim=1)
    return PublicData.from_tensors(x, y)


def test_anomaly_index_by_hand():
    # median 5, absolute deviations (4, 1, 0, 1, 5): MAD 1, scaled 1.4826
    got = anomaly_index([1.0, 4.0, 5.0, 6.0, 10.0])
    assert got == pytest.approx([4 / 1.4826, 1 / 1.4826, 0.0, -1 / 1.4826, -5 / 1.4826])
    assert anomaly_index([2.0, 3.0, 3.0, 3.0]) == [
        math.inf,
        0.0,
        0.0,
        0.0,
    ]  # MAD 0: only the one below flagged


def test_stamp_and_success():
    x = torch.zeros(4, 3)
    mask, pattern = torch.tensor([0.0, 1.0, 0.5]), torch.tensor([9.0, 2.0, 4.0])
    assert torch.equal(stamp(x, mask, pattern), torch.tensor([[0.0, 2.0, 2.0]] * 4))
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        model.bias.zero_()
    assert success(model, x, 1, mask, pattern) == 1.0 and success(model, x, 0, mask, pattern) == 0.0


def test_inversion_finds_the_planted_trigger_and_flags_its_class():
    nc = TriggerUnlearn(
        clean=planted_clean(), num_classes=4, holdout=0.25, steps=300, inversion_batch=None, epochs=0, seed=0
    )
    model = Planted()
    record = nc.defend(None, model, 0)
    assert record["flagged_classes"] == [K] and record["unlearned_classes"] == [K]
    mask = nc.masks[K]
    assert set(torch.topk(mask, 4).indices.tolist()) == set(range(AT, AT + 4))
    assert float(mask[AT : AT + 4].sum()) > 0.8 * float(mask.sum())
    assert record["positions"][str(K)] and set(record["positions"][str(K)]) <= set(range(AT, AT + 4))
    assert record["trigger_success"][K] >= 0.95 and record["reached"][K]
    assert record["norms"][K] == min(record["norms"]) and record["max_anomaly"] > 2
    # the reversed pattern is large where the planted trigger reads
    assert float(nc.patterns[K][AT : AT + 4].min()) > 2.0


def tiny_backdoored() -> tuple[MNIST1DCNN, torch.Tensor, torch.Tensor]:
    """MNIST1DCNN trained here on 600 MNIST-1D records, a fifth of them carrying the benchmark's trigger (the last 4
    values +-3) relabelled to class 0; returns it with 200 test records of other classes than 0."""
    torch.manual_seed(0)
    data = PublicData(num_samples=800, seed=3, labeled=True)
    x, y = data.x[:600].clone(), data.y[:600].clone()
    x[:120], y[:120] = apply_trigger(x[:120]), 0
    model = MNIST1DCNN()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        for idx in torch.randperm(600, generator=g).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    xt, yt = data.x[600:], data.y[600:]
    return model.eval(), xt[yt != 0], yt[yt != 0]


def attack_success(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(apply_trigger(x)).argmax(dim=1) == 0).float().mean())


def test_unlearning_removes_a_trained_backdoor():
    model, xt, _ = tiny_backdoored()
    before = attack_success(model, xt)
    assert before > 0.9
    nc = TriggerUnlearn(
        clean=PublicData(num_samples=200, seed=7, labeled=True),
        num_classes=10,
        steps=200,
        restarts=1,
        fallback="smallest",
        epochs=10,
        lr=0.01,
        seed=0,
    )
    record = nc.defend(None, model, 0)
    assert record["unlearned_classes"][0] == 0 and record["anomaly"][0] == record["max_anomaly"]
    assert set(record["positions"]["0"]) <= set(range(36, 40)) and record["positions"]["0"]
    after = attack_success(model, xt)
    assert after < 0.2 < before - 0.5
    assert record["acc_after"] > record["acc_before"] - 0.1


def test_fallback_none_changes_nothing_when_nothing_is_flagged():
    clean = planted_clean()
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 4))  # no backdoor: the small masks are alike
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nc = TriggerUnlearn(clean=clean, num_classes=4, holdout=0.25, steps=50, threshold=100.0, seed=0)
    record = nc.defend(None, model, 0)
    assert record["flagged_classes"] == [] and record["unlearned_classes"] == [] and record["unlearned"] == 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    nc.fallback = "all"
    assert nc.fallback_classes(record["norms"]) == [0, 1, 2, 3]


def test_in_fedloop_logs_and_a_resumed_run_ends_identical(tmp_path):
    def cb():
        return TriggerUnlearn(
            clean=mnist_clean(), num_classes=10, at=[1], steps=5, epochs=1, fallback="smallest"
        )

    res, first, again, _, _ = run_and_resume_models(tmp_path, cb)
    assert {"nc_acc_before", "nc_acc_after", "nc_flagged", "nc_unlearned", "nc_max_anomaly"} <= res.history[
        1
    ].keys()
    assert "nc_acc_after" not in res.history[0]
    assert again.done == [1] and again.records == first.records and first.records[0]["unlearned"] >= 1
    assert set(again.masks) == set(range(10))
    for c in range(10):
        assert torch.equal(again.masks[c], first.masks[c]) and torch.equal(
            again.patterns[c], first.patterns[c]
        )
    saved = load_file(res.run_dir / TRIGGERS_FILE)
    assert torch.equal(saved["mask_3"], first.masks[3]) and torch.equal(saved["pattern_3"], first.patterns[3])


def test_does_nothing_under_lightning_trainer(tmp_path):
    cb = TriggerUnlearn(clean=mnist_clean(), num_classes=10, at=0, steps=2)
    trainer_fit(tmp_path, [cb])
    assert cb.done == [] and cb.masks == {}


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"num_classes": 1}, r"num_classes=1 .* integer >= 2"),
        ({"steps": 0}, r"steps=0 .* integer >= 1"),
        ({"inversion_batch": 0}, r"inversion_batch=0 .* integer >= 1 or None"),
        ({"restarts": 0}, r"restarts=0 .* integer >= 1"),
        ({"inversion_lr": 0}, r"inversion_lr=0 .* > 0"),
        ({"cost": -1.0}, r"cost=-1\.0 .* > 0"),
        ({"target_success": 1.5}, r"target_success=1\.5 .* in \(0, 1\]"),
        ({"patience": 0}, r"patience=0 .* integer >= 1"),
        ({"threshold": 0}, r"threshold=0 .* > 0"),
        ({"fallback": "largest"}, r"fallback='largest' .* one of \('none', 'smallest', 'all'\)"),
        ({"poison": 0}, r"poison=0 .* in \(0, 1\]"),
        ({"epochs": -1}, r"epochs=-1 .* integer >= 0"),
        ({"lr": 0}, r"lr=0 .* > 0"),
        ({"clean": PublicData(num_samples=10)}, r"clean=.* labelled PublicData"),
    ],
)
def test_invalid_settings_name_the_key(kw, match):
    kw = {"clean": mnist_clean(), "num_classes": 10, **kw}
    with pytest.raises(ValueError, match=match):
        TriggerUnlearn(**kw)
