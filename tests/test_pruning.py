"""StructuredPruning under lightning.Trainer (incl. resume) and FedLoop (incl. resume and late-joining clients)."""

from __future__ import annotations

import io
import warnings

import lightning as L
import pytest
import torch

from lightning_fed import FedLoop
from lightning_fed.callbacks import FedCallback, StructuredPruning, replay_pruning
from lightning_fed.data import MNIST1DDataModule
from lightning_fed.models import MNIST1DCNN

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), limit_train_batches=4,
                     limit_val_batches=1, **kw)


def dm() -> MNIST1DDataModule:
    return MNIST1DDataModule(batch_size=32, num_samples=600)


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("kw", "match"), [
    ({"ratio": 1.0}, r"ratio=1\.0 .* in \[0, 1\)"),
    ({"ratio": -0.1}, r"ratio=-0\.1"),
    ({"importance": "hessian2"}, r"importance='hessian2' .* one of"),
    ({"at": []}, r"at=\[\] .* non-empty list"),
    ({"at": [3, -1]}, r"at=\[3, -1\]"),
    ({"layer_ratios": {"conv2": 1.5}}, r"layer_ratios\['conv2'\]=1\.5"),
    ({"round_to": 0}, r"round_to=0"),
])
def test_misconfiguration_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        StructuredPruning(**kw)


def test_replay_history_then_weights_only_load():
    torch.manual_seed(0)
    model = MNIST1DCNN()
    cb = StructuredPruning(ratio=0.5, example_input_shape=[1, 40])
    cb.prune(None, model)
    buf = io.BytesIO()
    torch.save({"history": cb.history, "state": model.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = MNIST1DCNN()
    replay_pruning(fresh, saved["history"], torch.zeros(1, 40))
    fresh.load_state_dict(saved["state"])
    x = torch.randn(5, 40)
    assert shapes(fresh) == shapes(model)
    assert shapes(model)["conv2.weight"] == (12, 12, 3)  # 25 channels, half removed
    assert torch.allclose(fresh(x), model(x))


def test_trainer_prunes_rebuilds_optimizer_and_resumes(tmp_path):
    L.seed_everything(0)
    model, data = MNIST1DCNN(), dm()
    cb = StructuredPruning(ratio=0.5, at=[0, 1], importance="taylor")
    t = trainer(tmp_path, max_epochs=2, callbacks=[cb])
    t.fit(model, data)
    assert cb.steps_done == 2 and shapes(model)["conv1.weight"][0] < 25
    opt_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.parameters()}  # the optimizer holds the pruned parameters
    assert model.head.weight.shape[1] == model.conv3.weight.shape[0] * 5
    ckpt = tmp_path / "pruned.ckpt"
    t.save_checkpoint(ckpt)

    # resume into a fresh, unpruned model: the structure is rebuilt before Lightning loads the weights
    fresh, cb2 = MNIST1DCNN(), StructuredPruning(ratio=0.5, at=[0, 1], importance="taylor")
    trainer(tmp_path, max_epochs=2, callbacks=[cb2]).fit(fresh, data, ckpt_path=str(ckpt), weights_only=True)
    assert cb2.steps_done == 2 and shapes(fresh) == shapes(model)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # and training goes on from there
    trainer(tmp_path, max_epochs=3, callbacks=[StructuredPruning(ratio=0.5, at=[0, 1])]).fit(
        MNIST1DCNN(), data, ckpt_path=str(ckpt), weights_only=True)


class Spy(FedCallback):
    """Records what clients were told and which client trained in which round."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int, bool]] = []

    def on_client_start(self, trainer, pl_module, instruction) -> None:
        hist = instruction.config.get("pruning_history", [])
        self.seen.append((trainer.current_round, instruction.client_id, len(hist), "optimizer" in trainer.client_state))


def fedloop(tmp_path, rounds: int, callbacks, **kw) -> FedLoop:
    return FedLoop(num_clients=6, clients_per_round=2, rounds=rounds, local_epochs=1, callbacks=callbacks,
                   output_dir=str(tmp_path), verbose=False, plot=False, loggers=[], keep_optimizer_state=True,
                   checkpoint_every=2, seed=0, **kw)


def test_fedloop_server_prunes_and_every_client_follows(tmp_path):
    L.seed_everything(0)
    spy = Spy()
    cb = StructuredPruning(ratio=0.4, at=[1], importance="taylor")
    loop = fedloop(tmp_path, 5, [cb, spy])
    model = MNIST1DCNN()
    res = loop.fit(model, dm())
    assert all(h["failed"] == 0 and h["rejected"] == 0 and h["good"] == 2 for h in res.history)
    unpruned = sum(p.numel() for p in MNIST1DCNN().parameters())
    assert res.history[1]["pruned_params"] == unpruned - sum(p.numel() for p in model.parameters())
    assert all("pruned_params" not in h for i, h in enumerate(res.history) if i != 1)  # at=[1] only
    assert loop.strategy.global_flat.numel() == sum(p.numel() for p in model.parameters())
    # the history is broadcast in every instruction after the pruning round
    assert all((n > 0) == (r >= 2) for r, _, n, _ in spy.seen)
    before = {cid for r, cid, _, _ in spy.seen if r <= 1}
    late = [cid for r, cid, _, _ in spy.seen if r >= 2 and cid not in before]
    stale = [cid for r, cid, _, _ in spy.seen if r >= 2 and cid in before]
    assert late, "seed 0 must sample a client that first trains after the pruning round"
    assert stale, "and one that trained before it (its old optimizer state is reset, not loaded)"
    assert all(loop.store.load(c)["pruning_version"] == len(cb.history) for c in late + stale)


def test_fedloop_resume_after_pruning_matches_uninterrupted(tmp_path):
    L.seed_everything(0)
    full = MNIST1DCNN()
    fedloop(tmp_path / "a", 4, [StructuredPruning(ratio=0.4, at=[0])]).fit(full, dm())
    L.seed_everything(0)
    first = fedloop(tmp_path / "b", 2, [StructuredPruning(ratio=0.4, at=[0])])
    run = first.fit(MNIST1DCNN(), dm()).run_dir
    L.seed_everything(1)  # a different initial model: everything must come from the checkpoint
    resumed = MNIST1DCNN()
    fedloop(tmp_path / "b", 4, [StructuredPruning(ratio=0.4, at=[0])]).fit(resumed, dm(), resume=run)
    assert shapes(resumed) == shapes(full)
    for k, v in full.state_dict().items():
        assert torch.allclose(resumed.state_dict()[k], v, atol=1e-6), k
