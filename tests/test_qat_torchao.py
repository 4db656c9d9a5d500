"""QuantizationAware(backend="torchao"): torchao's QAT prepare / convert for the Linear layers (native for
convolutions), under lightning.Trainer and FedLoop."""

from __future__ import annotations

import lightning as L
import pytest
import safetensors.torch
import torch

from lightning_fed import FedLoop
from lightning_fed.callbacks import QuantizationAware
from lightning_fed.callbacks.qat_torchao import is_torchao_fake, torchao_available
from lightning_fed.callbacks.quantize import FakeQuantConv1d, QuantizedLayer
from lightning_fed.data import MNIST1DDataModule
from lightning_fed.models import MNIST1DCNN, MNIST1DMLP

pytestmark = pytest.mark.skipif(not torchao_available(), reason="torchao is not installed")


def dm() -> MNIST1DDataModule:
    return MNIST1DDataModule(batch_size=32, num_samples=600)


def trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), limit_train_batches=6,
                     limit_val_batches=1, **kw)


def test_torchao_backend_settings():
    with pytest.raises(ValueError, match="backend='tflite' is not allowed"):
        QuantizationAware(backend="tflite")
    with pytest.raises(ValueError, match="no per-tensor int8 weight config"):
        QuantizationAware(backend="torchao", scheme="int8_tensor")


def test_trainer_torchao_linear_native_conv_and_export(tmp_path):
    L.seed_everything(0)
    model = MNIST1DCNN()
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    cb = QuantizationAware(scheme="int8", start=0, backend="torchao")
    trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(model, dm())
    assert is_torchao_fake(model.head) and isinstance(model.conv2, FakeQuantConv1d)
    assert list(model.state_dict()) == keys  # FedAvg keeps federating the same float shadow weights
    assert [id(p) for p in model.parameters()] == params  # the optimizer's parameters stay the module's
    r = cb.report
    assert r["float_weight_bytes"] == 4 * sum(m.weight.numel() for m in (model.conv1, model.conv2, model.conv3, model.head))
    assert 3.0 < r["float_weight_bytes"] / r["quant_weight_bytes"] <= 4.0  # int8 + per-channel scales (+ zero points)
    assert abs(r["quant_acc"] - r["float_acc"]) <= 0.05
    saved = safetensors.torch.load_file(str(tmp_path / "quantized.safetensors"))
    assert saved["head.weight.qdata"].dtype == torch.int8 and saved["conv2.qweight"].dtype == torch.int8
    assert isinstance(cb.exported.conv2, QuantizedLayer) and type(cb.exported.head) is torch.nn.Linear


def test_fedloop_torchao_mlp_trains_federated_and_resumes(tmp_path):
    def fit(rounds, resume=None, out="a"):
        L.seed_everything(0)
        cb = QuantizationAware(scheme="int4_weight", group_size=8, start=1, backend="torchao")
        loop = FedLoop(num_clients=4, clients_per_round=2, rounds=rounds, local_epochs=1, callbacks=[cb],
                       output_dir=str(tmp_path / out), verbose=False, plot=False, loggers=[], seed=0,
                       checkpoint_every=1)
        model = MNIST1DMLP(hidden=32)
        res = loop.fit(model, dm(), resume=resume)
        return res, model, cb

    res, model, cb = fit(3)
    assert sum(is_torchao_fake(m) for m in model.modules()) == 3  # every Linear of the MLP
    assert [h["good"] for h in res.history] == [2, 2, 2]
    r = cb.report
    assert abs(r["quant_acc"] - r["float_acc"]) <= 0.1
    # torchao keeps int4 values one per byte, plus a float32 scale and an int8 zero point per group of 8: 1.625 B
    assert r["quant_weight_bytes"] == pytest.approx(r["float_weight_bytes"] / 4 * 1.625, rel=0.01)
    part, _, _ = fit(1, out="b")
    _, model2, _ = fit(3, resume=str(part.run_dir), out="b")
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
