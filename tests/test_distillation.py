"""Distillation callback: the loss against a hand computation, a frozen teacher, Trainer and FedLoop."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_fed import FedAvg, FedCallback, FedLoop
from lightning_fed.callbacks import Distillation
from lightning_fed.callbacks.kd_losses import attention_loss, attention_map, hint_loss, kd_loss
from lightning_fed.data import MNIST1DDataModule
from lightning_fed.models import MNIST1DCNN


def _trainer(epochs: int = 1) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_train_batches=5,
                     limit_val_batches=0)


def _dm() -> MNIST1DDataModule:
    return MNIST1DDataModule(batch_size=32, num_samples=400)


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 2.0
    total = 0.0
    for i in range(2):
        zs = [math.exp(v / T) for v in s[i].tolist()]
        zt = [math.exp(v / T) for v in t[i].tolist()]
        ps = [z / sum(zs) for z in zs]
        pt = [z / sum(zt) for z in zt]
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    expected = T * T * total / 2
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_map_and_losses_by_hand():
    f = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])  # [B=1, C=2, L=2]
    a = [1.0 + 9.0, 4.0 + 0.0]
    n = math.sqrt(sum(v * v for v in a))
    assert attention_map(f).tolist()[0] == pytest.approx([v / n for v in a])
    g = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])  # 3 channels: A = [1, 2]
    b = [1.0 / math.sqrt(5), 2.0 / math.sqrt(5)]
    expected = sum((x / n - y) ** 2 for x, y in zip(a, b)) / 2
    assert attention_loss(f, g).item() == pytest.approx(expected, rel=1e-5)
    assert hint_loss(f, f * 2).item() == pytest.approx(F.mse_loss(f, 2 * f).item())
    with pytest.raises(ValueError, match="differ in shape"):
        hint_loss(f, g)


def test_wrapped_step_equals_formula():
    torch.manual_seed(0)
    student, teacher = MNIST1DCNN(channels=4), MNIST1DCNN(channels=8)
    cb = Distillation(teacher=teacher, alpha=0.3, temperature=3.0, attention=["conv2"], attention_weight=10.0)
    x, y = torch.randn(6, 40), torch.randint(0, 10, (6,))
    cb.on_train_start(None, student)
    got = student.training_step((x, y), 0)
    cb.on_train_end(None, student)
    s_logits = student(x)
    with torch.no_grad():
        t_logits = teacher(x)
    s_feat = F.relu(student.conv2(F.relu(student.conv1(x.view(6, 1, 40)))))
    t_feat = F.relu(teacher.conv2(F.relu(teacher.conv1(x.view(6, 1, 40)))))
    # conv2's forward hook sees the pre-ReLU output
    s_pre = student.conv2(F.relu(student.conv1(x.view(6, 1, 40))))
    t_pre = teacher.conv2(F.relu(teacher.conv1(x.view(6, 1, 40))))
    expected = (0.3 * F.cross_entropy(s_logits, y) + 0.7 * kd_loss(s_logits, t_logits, 3.0)
                + 10.0 * attention_loss(s_pre, t_pre))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert s_feat.shape != t_feat.shape  # attention transfer works across widths
    # after removal the original step is back
    assert student.training_step((x, y), 0).item() == pytest.approx(F.cross_entropy(s_logits, y).item(), rel=1e-5)
    assert "training_step" not in student.__dict__


def test_identical_teacher_gives_zero_distillation_terms():
    torch.manual_seed(0)
    student = MNIST1DCNN(channels=4)
    cb = Distillation(teacher=copy.deepcopy(student), alpha=0.5, hints=["conv3"], attention=["conv1:conv1"])
    x, y = torch.randn(5, 40), torch.randint(0, 10, (5,))
    cb.on_train_start(None, student)
    got = student.training_step((x, y), 0)
    cb.on_train_end(None, student)
    assert got.item() == pytest.approx(0.5 * F.cross_entropy(student(x), y).item(), rel=1e-5)


def test_teacher_gets_no_gradient_under_trainer():
    torch.manual_seed(0)
    student, teacher = MNIST1DCNN(channels=4), MNIST1DCNN(channels=8)
    before_t = copy.deepcopy(teacher.state_dict())
    before_s = copy.deepcopy(student.state_dict())
    cb = Distillation(teacher=teacher, alpha=0.5, attention=["conv3"])
    trainer = _trainer()
    trainer.callbacks.append(cb)
    trainer.fit(student, _dm())
    assert trainer.callback_metrics["distill/attention_loss"].item() > 0
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before_t[k])
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(v, before_s[k]) for k, v in student.state_dict().items())
    assert "training_step" not in student.__dict__  # unwrapped at the end


def test_trainer_logs_distillation_loss():
    torch.manual_seed(0)
    student = MNIST1DCNN(channels=4)
    cb = Distillation(teacher=MNIST1DCNN(channels=8), alpha=0.5)
    trainer = _trainer()
    trainer.callbacks.append(cb)
    trainer.fit(student, _dm())
    assert "distill/kd_loss" in trainer.callback_metrics
    assert trainer.callback_metrics["distill/kd_loss"].item() > 0


class _PayloadSpy(FedCallback):
    def __init__(self) -> None:
        self.keys: set[str] = set()

    def on_client_end(self, trainer, pl_module, reply):
        self.keys |= set(reply.payload)


def test_fedloop_distillation_teacher_excluded_from_payload(tmp_path):
    torch.manual_seed(0)
    teacher = MNIST1DCNN(channels=8)
    before = copy.deepcopy(teacher.state_dict())
    spy = _PayloadSpy()
    cb = Distillation(teacher=teacher, alpha=0.5, attention=["conv3"])
    loop = FedLoop(num_clients=4, clients_per_round=2, rounds=2, strategy=FedAvg(), callbacks=[cb, spy],
                   output_dir=str(tmp_path), verbose=False, plot=False, loggers=[], checkpoint_every=0)
    student = MNIST1DCNN(channels=4)
    res = loop.fit(student, _dm())
    assert spy.keys == {k for k, v in student.state_dict().items() if v.is_floating_point()}
    assert not any(k.startswith("teacher") for k in spy.keys)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in teacher.parameters())
    assert res.history[-1]["distill/kd_loss"] > 0
    assert res.history[-1]["distill/attention_loss"] > 0  # a different, frozen teacher: the maps differ
    assert res.history[-1]["good"] == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"hints": ["a:b:c"]}, "hints entry 'a:b:c'"),
        ({"attention_weight": -1.0}, "attention_weight=-1.0"),
        ({"teacher_weights": "/nonexistent/t.safetensors"}, "teacher_weights"),
    ],
)
def test_misconfiguration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Distillation(teacher=MNIST1DCNN(channels=4), **kwargs)


def test_teacher_weights_loaded(tmp_path):
    from safetensors.torch import save_file

    src = MNIST1DCNN(channels=4)
    path = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    teacher = MNIST1DCNN(channels=4)
    Distillation(teacher=teacher, teacher_weights=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v)


def test_unknown_layer_name_is_reported():
    cb = Distillation(teacher=MNIST1DCNN(channels=4), attention=["nope"])
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        cb.on_train_start(None, MNIST1DCNN(channels=4))
