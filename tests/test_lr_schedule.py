import lightning as L
import pytest
from conftest import seeded

from lightning_fed import FedCallback
from lightning_fed.callbacks import RoundLRDecay
from lightning_fed.models import MNIST1DMLP


class LRProbe(FedCallback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_decays_per_round_in_fedloop(make_loop, small_dm):
    probe = LRProbe()
    make_loop(num_clients=1, clients_per_round=1, rounds=3, local_epochs=2,
              callbacks=[RoundLRDecay(gamma=0.5), probe]).fit(seeded(MNIST1DMLP, lr=0.08), small_dm)
    # fresh optimizer per round: 0.08 * 0.5**round, constant within a round's two local epochs
    assert probe.lrs == pytest.approx([0.08, 0.08, 0.04, 0.04, 0.02, 0.02])


def test_decays_per_epoch_under_trainer(small_dm):
    probe = LRProbe()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
                        limit_val_batches=0, callbacks=[RoundLRDecay(gamma=0.5, min_scale=0.3), probe])
    trainer.fit(seeded(MNIST1DMLP, lr=0.1), small_dm)
    assert probe.lrs == pytest.approx([0.1, 0.05, 0.03])  # 0.25 is clipped to min_scale 0.3


def test_cosine_over_the_runs_rounds_in_fedloop(make_loop, small_dm):
    probe = LRProbe()
    make_loop(num_clients=1, clients_per_round=1, rounds=4, local_epochs=1,
              callbacks=[RoundLRDecay(schedule="cosine", min_scale=0.2), probe]).fit(seeded(MNIST1DMLP, lr=0.1), small_dm)
    # factor = 0.2 + 0.8 * (1 + cos(pi * r / 4)) / 2 for r = 0..3
    assert probe.lrs == pytest.approx([0.1, 0.1 * (0.2 + 0.4 * (1 + 2**-0.5)), 0.06, 0.1 * (0.2 + 0.4 * (1 - 2**-0.5))])


def test_cosine_scale_values():
    cb = RoundLRDecay(schedule="cosine", total=10)
    assert cb.scale(0) == 1.0 and cb.scale(5) == pytest.approx(0.5) and cb.scale(10) == pytest.approx(0.0)
    assert cb.scale(20) == pytest.approx(0.0)  # past the end: stays at min_scale
    with pytest.raises(ValueError, match="total"):
        RoundLRDecay(schedule="cosine").scale(3)


@pytest.mark.parametrize("kw, match", [({"gamma": 0}, "gamma=0"), ({"gamma": 1.5}, "gamma"), ({"min_scale": 2}, "min_scale"),
                                       ({"schedule": "step"}, "schedule='step'"), ({"total": 0}, "total=0")])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        RoundLRDecay(**kw)
