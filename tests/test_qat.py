"""QuantizationAware and the quantization math, under lightning.Trainer and FedLoop; prune-then-QAT order."""

from __future__ import annotations

import lightning as L
import pytest
import safetensors.torch
import torch

from lightning_fed import FedLoop
from lightning_fed.callbacks import QuantizationAware, StructuredPruning
from lightning_fed.callbacks.quantize import (
    FakeQuantConv1d,
    QuantizedLayer,
    dequantize_weight,
    fake_quant_weight,
    pack_int4,
    quantize_weight,
    unpack_int4,
)
from lightning_fed.data import MNIST1DDataModule
from lightning_fed.models import MNIST1DCNN


def dm() -> MNIST1DDataModule:
    return MNIST1DDataModule(batch_size=32, num_samples=600)


@pytest.mark.parametrize(("kw", "match"), [
    ({"scheme": "int3"}, r"scheme='int3' .* one of \('int8', 'int8_tensor', 'int4_weight'\)"),
    ({"start": -1}, r"start=-1"),
    ({"group_size": 0}, r"group_size=0"),
])
def test_misconfiguration_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantizationAware(**kw)


def test_qat_before_pruning_is_refused_when_the_loop_is_built(tmp_path):
    kw = {"output_dir": str(tmp_path), "verbose": False, "plot": False, "loggers": []}
    with pytest.raises(ValueError, match=r"QuantizationAware is at callbacks\[0\], before StructuredPruning"):
        FedLoop(callbacks=[QuantizationAware(start=5), StructuredPruning(at=[2])], **kw)
    with pytest.raises(ValueError, match=r"start=2 is not allowed .* \(start >= 3\): prune first, then QAT"):
        FedLoop(callbacks=[StructuredPruning(at=[1, 2]), QuantizationAware(start=2)], **kw)
    FedLoop(callbacks=[StructuredPruning(at=[1, 2]), QuantizationAware(start=3)], **kw)


def test_quantization_math():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 5)
    for bits, group in ((8, None), (4, 8)):
        q, scale = quantize_weight(w, bits, group)
        assert q.dtype == torch.int8 and int(q.max()) <= 2 ** (bits - 1) - 1 and int(q.min()) >= -(2 ** (bits - 1))
        err = (dequantize_weight(q, scale, w.shape) - w).abs()
        bound = scale.amax(dim=1).view(6, 1, 1) / 2 + 1e-6  # rounding error is at most half a step
        assert bool((err <= bound).all())
    q, scale = quantize_weight(w, 8, None, per_tensor=True)
    assert scale.shape == (1, 1) and torch.isclose(scale[0, 0], w.abs().max() / 127)
    assert bool(((dequantize_weight(q, scale, w.shape) - w).abs() <= scale[0, 0] / 2 + 1e-6).all())
    q4 = torch.randint(-8, 8, (37,), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q4), 37), q4) and pack_int4(q4).numel() == 19
    p = torch.randn(3, 4, requires_grad=True)
    fake_quant_weight(p, 8, None).sum().backward()
    assert torch.equal(p.grad, torch.ones(3, 4))  # straight-through estimator


def trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), limit_train_batches=6,
                     limit_val_batches=1, **kw)


def test_trainer_qat_keeps_parameters_and_exports_int8(tmp_path):
    L.seed_everything(0)
    model = MNIST1DCNN()
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    cb = QuantizationAware(scheme="int8", start=1)
    data = dm()
    trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(model, data)
    assert isinstance(model.conv1, FakeQuantConv1d)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    r = cb.report
    assert r["float_weight_bytes"] / r["quant_weight_bytes"] > 3.5  # int8 + one float scale per channel
    assert r["quant_bytes"] < r["float_bytes"] / 3
    assert abs(r["quant_acc"] - r["float_acc"]) <= 0.05
    # 12 steps do not learn (float_acc is 0.10, chance), so the accuracies above agree trivially: compare the
    # exported int8 model's outputs with the float model's on the test inputs instead. Measured: argmax agreement
    # 1.0, relative error of the input-dependent (per-class centred) logits 0.019, max |diff| 0.0023
    x, _ = data.test_set.tensors
    with torch.no_grad():
        q, f = cb.exported(x), float_copy_forward(model, x)
    assert (q.argmax(1) == f.argmax(1)).float().mean() >= 0.95
    qc, fc = q - q.mean(0), f - f.mean(0)
    assert fc.norm() > 0 and (qc - fc).norm() / fc.norm() < 0.1  # it follows the inputs as the float model does
    assert torch.allclose(q, f, atol=0.01)
    saved = safetensors.torch.load_file(str(tmp_path / "quantized.safetensors"))
    assert saved["conv2.qweight"].dtype == torch.int8
    assert isinstance(cb.exported.conv2, QuantizedLayer)


def test_trainer_qat_per_tensor_export_is_4x_smaller(tmp_path):
    L.seed_everything(0)
    model = MNIST1DCNN()
    cb = QuantizationAware(scheme="int8_tensor", start=0)
    trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(model, dm())
    r = cb.report
    n_weights = sum(m.weight.numel() for m in (model.conv1, model.conv2, model.conv3, model.head))
    assert r["float_weight_bytes"] == 4 * n_weights
    assert r["quant_weight_bytes"] == n_weights + 4 * 4  # int8 weights + one float32 scale per layer
    assert r["float_weight_bytes"] / r["quant_weight_bytes"] > 3.98
    assert cb.exported.conv2.scale.shape == (1, 1)
    x = torch.randn(8, 40)
    assert torch.allclose(cb.exported(x), float_copy_forward(model, x), atol=0.5)


def float_copy_forward(model, x):
    from lightning_fed.callbacks.footprint import float_copy

    with torch.no_grad():
        return float_copy(model)(x)


def fedloop(tmp_path, rounds, callbacks, **kw) -> FedLoop:
    return FedLoop(num_clients=4, clients_per_round=2, rounds=rounds, local_epochs=1, callbacks=callbacks,
                   output_dir=str(tmp_path), verbose=False, plot=False, loggers=[], seed=0, **kw)


def test_fedloop_prune_then_qat_int4_and_resume(tmp_path):
    L.seed_everything(0)
    prune, qat = StructuredPruning(ratio=0.4, at=[0]), QuantizationAware(scheme="int4_weight", start=1, group_size=16)
    model = MNIST1DCNN()
    res = fedloop(tmp_path, 3, [prune, qat], checkpoint_every=2).fit(model, dm())
    assert all(h["good"] == 2 for h in res.history)
    assert model.conv2.weight.shape[0] == 15 and isinstance(model.conv2, FakeQuantConv1d)
    r = qat.report
    assert r["float_weight_bytes"] / r["quant_weight_bytes"] > 4.0  # int4: two weights a byte
    assert (res.run_dir / "quantized.safetensors").is_file()
    # resume from round 2: the pruned structure is replayed and QAT re-prepared before the weights load
    L.seed_everything(0)
    again = MNIST1DCNN()
    prune2, qat2 = StructuredPruning(ratio=0.4, at=[0]), QuantizationAware(scheme="int4_weight", start=1, group_size=16)
    fedloop(tmp_path, 3, [prune2, qat2], checkpoint_every=2).fit(again, dm(), resume=res.run_dir / "checkpoints" / "round-000002")
    assert isinstance(again.conv2, FakeQuantConv1d) and again.conv2.weight.shape == model.conv2.weight.shape
    for k, v in model.state_dict().items():
        assert torch.allclose(again.state_dict()[k], v, atol=1e-6), k
