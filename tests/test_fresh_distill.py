"""Distillation into a fresh model: the student is freshly initialised (nothing of the teacher's weights, the same
draw for the same seed), augmentations and patches by hand, a backdoored model's trigger no longer works after the
step while clean accuracy stays, patched copies remove a constant trigger that plain distillation passes on, FedLoop
metrics and an identical resumed run, nothing under lightning.Trainer, bad settings named."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _defence_common import backdoored_model, mnist_clean, run_and_resume, trainer_fit, trigger_success
from torch import nn

from lightning_fed.callbacks import FreshDistill
from lightning_fed.callbacks._defence import accuracy
from lightning_fed.callbacks.fresh_distill import augment, fresh_model, patch
from lightning_fed.data import PublicData
from lightning_fed.models import MNIST1DCNN
from lightning_fed.seeding import generator

warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture(scope="module")
def backdoored():
    return backdoored_model()


def test_the_student_is_freshly_initialised():
    torch.manual_seed(0)
    teacher = MNIST1DCNN()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)  # far from any initialisation
    before = copy.deepcopy(teacher.state_dict())
    a, b, c = fresh_model(teacher, 5), fresh_model(teacher, 5), fresh_model(teacher, 6)
    torch.manual_seed(123)
    reference = MNIST1DCNN()  # the module initialisers under seed 5
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        for m in reference.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # the teacher is untouched
        assert not torch.equal(a.state_dict()[k], v), k  # every tensor re-drawn
        assert torch.equal(a.state_dict()[k], b.state_dict()[k]), k  # seeded
        assert torch.equal(a.state_dict()[k], reference.state_dict()[k]), k  # the module's own initialiser
        assert not torch.equal(a.state_dict()[k], c.state_dict()[k]), k


def test_a_parameter_no_initialiser_covers_is_refused():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.lin(x) * self.scale

    with pytest.raises(ValueError, match=r"\['scale'\] .* reset_parameters"):
        fresh_model(Scaled(), 0)


def test_augment_by_hand():
    x = torch.arange(12.0).view(3, 4)
    assert torch.equal(augment(x, 0.0, 0, 0.0, 1.0, generator(0, 1)), x)
    shifted = augment(x, 0.0, 1, 0.0, 1.0, generator(0, 1))
    for row, out in zip(x, shifted, strict=True):  # each row rolled by -1, 0 or +1
        assert any(torch.equal(out, torch.roll(row, s)) for s in (-1, 0, 1))
    noisy = augment(x, 0.5, 0, 0.0, 2.0, generator(0, 1))
    assert 0.3 < float((noisy - x).std()) < 1.8  # noise of std 0.5 * 2
    x8 = torch.arange(32.0).view(8, 4)
    g = generator(0, 1)  # the draws augment makes, in its order: the shares, then the partners
    share = 0.5 * torch.rand(8, generator=g).view(-1, 1)
    partner = torch.randperm(8, generator=g)
    assert not torch.equal(partner, torch.arange(8))
    assert torch.allclose(
        augment(x8, 0.0, 0, 0.5, 1.0, generator(0, 1)), (1 - share) * x8 + share * x8[partner]
    )
    assert torch.equal(
        augment(x, 0.2, 1, 0.3, 1.0, generator(3, 1)), augment(x, 0.2, 1, 0.3, 1.0, generator(3, 1))
    )


def test_patch_by_hand():
    x = torch.full((4000, 40), float("nan"))
    assert torch.equal(patch(x, 0, 2, 8, 4.0, 1.0, generator(0, 1)).isnan(), x.isnan())  # no patch: a copy
    out = patch(x, 1, 2, 8, 4.0, 0.5, generator(0, 1))
    hit = ~out.isnan()
    lengths = hit.sum(dim=1)
    assert int(lengths.min()) >= 1 and int(lengths.max()) <= 8
    for row in hit[:200]:  # one segment per record, cut at the edges only
        at = torch.nonzero(row).flatten()
        assert int(at[-1] - at[0]) + 1 == len(at)
        assert len(at) >= 2 or int(at[0]) in (0, 39)
    fills = {"constant": 0, "alternating": 0}
    for row, h in zip(out[:300], hit[:300], strict=True):
        v = row[h]
        if len(v) >= 3:
            if torch.all(v == v[0]):
                fills["constant"] += 1
                assert abs(float(v[0])) <= 2.0
            elif torch.allclose(v[1:], -v[:-1]):
                fills["alternating"] += 1
                assert abs(float(v[0])) <= 2.0  # amplitude 4 times the scale 0.5
    assert min(fills.values()) > 50  # both, and the rest noise
    cover = hit.float().mean(dim=0)  # every position is covered about equally often, the edges too
    assert float(cover.min()) > 0.8 * float(cover.mean()) and float(cover.max()) < 1.2 * float(cover.mean())
    twice = ~patch(x, 2, 2, 8, 4.0, 1.0, generator(0, 1)).isnan()
    assert float(twice.float().mean()) > float(hit.float().mean())
    assert torch.equal(patch(x, 2, 2, 8, 4.0, 1.0, generator(3, 1)).nan_to_num(),
                       patch(x, 2, 2, 8, 4.0, 1.0, generator(3, 1)).nan_to_num())
    img = torch.full((50, 3, 8, 8), float("nan"))
    hit2 = ~patch(img, 1, 2, 3, 4.0, 1.0, generator(0, 1)).isnan()
    assert torch.equal(hit2[:, 0], hit2[:, 1]) and torch.equal(hit2[:, 0], hit2[:, 2])  # every channel alike
    for h in hit2[:, 0]:  # a square (or its part inside the image)
        rows, cols = torch.nonzero(h.any(dim=1)).flatten(), torch.nonzero(h.any(dim=0)).flatten()
        assert int(h.sum()) == len(rows) * len(cols) and len(rows) <= 3 and len(cols) <= 3
    with pytest.raises(ValueError, match=r"sides \[2, 9\] do not fit"):
        patch(torch.zeros(2, 8), 1, 2, 9, 4.0, 1.0, generator(0, 1))
    with pytest.raises(ValueError, match=r"sides \[3, 2\]"):
        patch(x, 1, 3, 2, 4.0, 1.0, generator(0, 1))
    with pytest.raises(ValueError, match="at least one dimension"):
        patch(torch.zeros(5), 1, 1, 1, 4.0, 1.0, generator(0, 1))


def test_patched_copies_remove_a_constant_trigger_that_plain_distillation_passes_on():
    model, x, y = backdoored_model(start=0, pattern="constant")  # the first 4 values set to +3
    assert trigger_success(model, x, y, 0, "constant") > 0.9
    out = {}
    for patches in (0, 2):
        student = copy.deepcopy(model)
        FreshDistill(
            clean=PublicData(200, seed=7, labeled=True),
            proxy=PublicData(600, seed=9),
            epochs=60,
            temperature=2.0,
            alpha=0.5,
            patches=patches,
        ).defend(None, student, 0)
        out[patches] = accuracy(student, x, y), trigger_success(student, x, y, 0, "constant")
    assert out[0][1] > 0.7  # the student learns the constant trigger from the teacher's outputs on clean records
    assert out[2][1] < 0.4  # not when patched copies must answer as the records do
    assert out[2][0] > out[0][0] - 0.1


def test_the_trigger_no_longer_works_and_clean_accuracy_stays(backdoored):
    model, x, y = backdoored
    acc, asr = accuracy(model, x, y), trigger_success(model, x, y)
    assert asr > 0.9 and acc > 0.5  # the backdoor works (chance: 0.1)
    teacher = copy.deepcopy(model)
    fd = FreshDistill(clean=PublicData(200, seed=7, labeled=True), proxy=PublicData(600, seed=9), epochs=30)
    record = fd.defend(None, model, 0)
    assert trigger_success(model, x, y) < 0.1
    assert accuracy(model, x, y) > acc - 0.15
    assert record["transfer"] == 600 + 160 and 0 <= record["agreement"] <= 1
    for k, v in teacher.state_dict().items():
        assert not torch.equal(model.state_dict()[k], v), k
    again = copy.deepcopy(teacher)
    FreshDistill(
        clean=PublicData(200, seed=7, labeled=True), proxy=PublicData(600, seed=9), epochs=30
    ).defend(None, again, 0)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k  # deterministic


def test_in_fedloop_logs_and_a_resumed_run_ends_identical(tmp_path):
    def cb():
        return FreshDistill(
            clean=mnist_clean(), proxy=PublicData(100, seed=9), at=[1], epochs=2, noise=0.1, shift=1, patches=2
        )

    res, first, again = run_and_resume(tmp_path, cb)
    assert {"fresh_acc_before", "fresh_acc_after", "fresh_agreement"} <= res.history[1].keys()
    assert "fresh_acc_after" not in res.history[0]
    assert again.done == [1] and again.records == first.records


def test_does_nothing_under_lightning_trainer(tmp_path):
    cb = FreshDistill(clean=mnist_clean(), at=0, epochs=1)
    trainer_fit(tmp_path, [cb])
    assert cb.done == [] and cb.records == []


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"epochs": 0}, r"epochs=0 .* >= 1"),
        ({"proxy": "x"}, r"proxy='x' .* PublicData"),
        ({"temperature": 0}, r"temperature=0 .* > 0"),
        ({"alpha": 1.5}, r"alpha=1\.5 .* in \[0, 1\]"),
        ({"noise": -0.1}, r"noise=-0\.1 .* >= 0"),
        ({"shift": 1.5}, r"shift=1\.5 .* an int"),
        ({"mixup": 0.7}, r"mixup=0\.7 .* in \[0, 0\.5\]"),
        ({"init_seed": "a"}, r"init_seed='a' .* an int"),
        ({"patches": -1}, r"patches=-1 .* integer >= 0"),
        ({"patch_min": 0}, r"patch_min=0 .* integer >= 1"),
        ({"patch_min": 3, "patch_max": 2}, r"patch_max=2 .* >= patch_min \(3\)"),
        ({"patch_amplitude": 0}, r"patch_amplitude=0 .* > 0"),
        ({"patches": 1, "patch_max": 41}, r"patch_max=41 .* at most the records' side \(40 "),
        ({"lr": 0}, r"lr=0 .* > 0"),
        ({"clean": PublicData(num_samples=10)}, r"clean=.* labelled PublicData"),
    ],
)
def test_invalid_settings_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        FreshDistill(**{"clean": mnist_clean(), **kw})
