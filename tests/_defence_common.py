"""The small FedLoop, data and clean server records shared by the server-side defence tests (fine-pruning, NAD,
MCR, I-BAU, ANP), and the check that a run killed after a defence's step resumes to the same weights."""

from collections.abc import Callable

import lightning as L
import torch

from lightning_fed import FedLoop
from lightning_fed.data import MNIST1DDataModule, PublicData
from lightning_fed.models import MNIST1DCNN


def fedloop(tmp_path, rounds: int, callbacks) -> FedLoop:
    """4 clients, 2 a round, 1 local epoch, checkpointed every round, quiet, seed 0."""
    return FedLoop(num_clients=4, clients_per_round=2, rounds=rounds, local_epochs=1, callbacks=callbacks,
                   output_dir=str(tmp_path), verbose=False, plot=False, loggers=[], checkpoint_every=1, seed=0)


def dm() -> MNIST1DDataModule:
    """600 MNIST-1D records, batches of 32."""
    return MNIST1DDataModule(batch_size=32, num_samples=600)


def trainer_fit(tmp_path, callbacks: list, seed: int = 0) -> MNIST1DCNN:
    """A seeded MNIST1DCNN fitted by a plain, quiet ``lightning.Trainer`` for 2 training batches with ``callbacks``
    (where a FedLoop-only defence must do nothing); returns the model."""
    L.seed_everything(seed)
    model = MNIST1DCNN()
    L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
              callbacks=callbacks).fit(model, dm())
    return model


def mnist_clean() -> PublicData:
    """100 labelled clean records the server holds (generator seed 7)."""
    return PublicData(num_samples=100, seed=7, labeled=True)


def run_and_resume(tmp_path, make_callback: Callable[[], object]):
    """Run 3 rounds with one fresh callback; run 2 rounds, then resume that run to 3 with another (under a different
    global seed); assert both end with the same weights. Returns the full run's result, its callback and the
    resumed callback."""
    return run_and_resume_models(tmp_path, make_callback)[:3]


def run_and_resume_models(tmp_path, make_callback: Callable[[], object]):
    """:func:`run_and_resume`, also returning the full run's and the resumed run's final models."""
    L.seed_everything(0)
    full, first = MNIST1DCNN(), make_callback()
    res = fedloop(tmp_path / "a", 3, [first]).fit(full, dm())
    L.seed_everything(0)
    run = fedloop(tmp_path / "b", 2, [make_callback()]).fit(MNIST1DCNN(), dm()).run_dir  # killed after round 2
    L.seed_everything(1)
    resumed, again = MNIST1DCNN(), make_callback()
    fedloop(tmp_path / "b", 3, [again]).fit(resumed, dm(), resume=run)
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    return res, first, again, full, resumed


def backdoored_model(
    seed: int = 0, epochs: int = 20, start: int | None = None, pattern: str = "alternating"
) -> tuple[MNIST1DCNN, torch.Tensor, torch.Tensor]:
    """A small MNIST1DCNN trained centrally (SGD, seeded) on 600 MNIST-1D records (generator seed 11) of which the
    first 150 are added again with a trigger (default: the last 4 values set to +-3; ``start`` / ``pattern`` as
    :func:`~lightning_fed.callbacks.backdoor.apply_trigger` takes them) and label 0; returns it (eval mode) with 300
    further test records ``(x, y)`` (generator seed 12)."""
    from lightning_fed.callbacks._defence import finetune
    from lightning_fed.callbacks.backdoor import apply_trigger
    from lightning_fed.seeding import generator

    data, test = PublicData(num_samples=600, seed=11, labeled=True), PublicData(num_samples=300, seed=12, labeled=True)
    x = torch.cat([data.x, apply_trigger(data.x[:150], start=start, pattern=pattern)])
    y = torch.cat([data.y, torch.zeros(150, dtype=torch.long)])
    torch.manual_seed(seed)
    model = MNIST1DCNN()
    finetune(model, x, y, epochs, 0.05, 0.9, 32, generator(seed, 99))
    return model.eval(), test.x, test.y


def trigger_success(
    model, x: torch.Tensor, y: torch.Tensor, start: int | None = None, pattern: str = "alternating"
) -> float:
    """Share of the records of ``x`` not of class 0 that ``model`` classifies as 0 with the trigger (default: the
    default trigger; ``start`` / ``pattern`` as :func:`~lightning_fed.callbacks.backdoor.apply_trigger` takes them)."""
    from lightning_fed.callbacks.backdoor import apply_trigger

    keep = y != 0
    with torch.no_grad():
        return float(
            (model.eval()(apply_trigger(x[keep], start=start, pattern=pattern)).argmax(1) == 0).float().mean()
        )
