"""MagnitudeSparsity and its packed uplink, under lightning.Trainer and FedLoop."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_fed import FedLoop
from lightning_fed.callbacks import MagnitudeSparsity, SparseUplink
from lightning_fed.callbacks.sparsity import magnitude_masks
from lightning_fed.codecs import DecodeArgs, Identity, MalformedMessage
from lightning_fed.data import MNIST1DDataModule
from lightning_fed.models import MNIST1DCNN
from lightning_fed.protocol import spec_of


def dm() -> MNIST1DDataModule:
    return MNIST1DDataModule(batch_size=32, num_samples=600)


@pytest.mark.parametrize(("kw", "match"), [
    ({"sparsity": 1.0}, r"sparsity=1\.0 .* in \[0, 1\)"),
    ({"scope": "row"}, r"scope='row' .* one of \('layer', 'global'\)"),
    ({"at": [-2]}, r"at=\[-2\]"),
    ({"min_numel": 0}, r"min_numel=0"),
])
def test_misconfiguration_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        MagnitudeSparsity(**kw)


def test_masks_and_packed_uplink_roundtrip():
    params = {"a": torch.tensor([[0.1, -3.0], [2.0, 0.01]]), "b": torch.tensor([[5.0, -0.2, 0.3, 4.0]])}
    layer = magnitude_masks(params, 0.5, "layer")
    assert layer["a"].tolist() == [[False, True], [True, False]] and layer["b"].tolist() == [[True, False, False, True]]
    glob = magnitude_masks(params, 0.5, "global")
    assert glob["a"].tolist() == [[False, True], [True, False]] and glob["b"].tolist() == [[True, False, False, True]]
    glob = magnitude_masks({"a": params["a"], "b": params["b"] * 100}, 0.5, "global")  # one threshold for all
    assert glob["a"].tolist() == [[False, False], [False, False]] and bool(glob["b"].all())
    codec = SparseUplink(Identity())
    codec.masks = layer
    payload = {"a": torch.randn(2, 2) * layer["a"], "b": torch.randn(1, 4) * layer["b"], "c": torch.randn(3)}
    msg = codec.encode(payload, {})
    assert len(msg) < len(Identity().encode(payload, {}))
    out = codec.decode(msg, {}, DecodeArgs(spec=spec_of(payload)))
    for k, v in payload.items():
        assert torch.equal(out[k], v), k
    bad = Identity().encode({"a": torch.randn(3), "b": torch.randn(2), "c": torch.randn(3)}, {})
    with pytest.raises(MalformedMessage, match="packed entry 'a' has shape"):
        codec.decode(bad, {})


def test_wrap_uplink_packs_the_codec_and_keeps_its_masks_in_sync():
    inner = Identity()
    cb = MagnitudeSparsity(sparsity=0.5, at=[0])
    codec = cb.wrap_uplink(inner)
    assert isinstance(codec, SparseUplink) and codec.inner is inner and codec.masks == {}
    assert cb.wrap_uplink(codec) is codec  # an uplink that already packs is not wrapped twice
    cb.step(MNIST1DCNN())
    assert codec.masks is cb.masks and cb.masks  # a new step reaches the codec
    restored = {k: ~v for k, v in cb.masks.items()}
    cb.load_state_dict({"masks": restored, "steps_done": 1})
    assert all(torch.equal(codec.masks[k], v) for k, v in restored.items())
    assert MagnitudeSparsity(pack_uplink=False).wrap_uplink(inner) is inner


def test_trainer_keeps_masked_weights_at_zero(tmp_path):
    L.seed_everything(0)
    model, cb = MNIST1DCNN(), MagnitudeSparsity(sparsity=0.6, at=[0, 1], scope="global")
    L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_train_batches=5, limit_val_batches=1, callbacks=[cb]).fit(model, dm())
    assert cb.steps_done == 2 and abs(cb.density() - 0.4) < 0.01
    for name, mask in cb.masks.items():
        w = dict(model.named_parameters())[name]
        assert bool((w[~mask] == 0).all()), name  # still zero after a further epoch of training


def test_fedloop_uplink_carries_only_unmasked_weights(tmp_path):
    L.seed_everything(0)
    cb = MagnitudeSparsity(sparsity=0.75, at=[1])
    model = MNIST1DCNN()
    loop = FedLoop(num_clients=4, clients_per_round=2, rounds=4, local_epochs=1, callbacks=[cb], seed=0,
                   keep_optimizer_state=True, output_dir=str(tmp_path), verbose=False, plot=False, loggers=[])
    res = loop.fit(model, dm())
    assert all(h["good"] == 2 and h["rejected"] == 0 for h in res.history)
    dense, sparse = res.history[0]["bytes_up"], res.history[3]["bytes_up"]
    assert sparse < 0.4 * dense  # 75 % of the weights are not sent (biases and headers still are)
    assert res.history[3]["compression_ratio"] > 2.5
    for name, mask in cb.masks.items():
        assert bool((dict(model.named_parameters())[name][~mask] == 0).all()), name
