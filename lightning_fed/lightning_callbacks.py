"""Which of Lightning's own callbacks (``lightning.pytorch.callbacks``) run inside FedLoop, and what to use instead
of the others.

A Lightning callback may read any part of ``lightning.Trainer`` (its loops, its checkpoint connector, its progress
bar); inside FedLoop it gets :class:`~lightning_fed.trainer_view.TrainerView`, which has the parts a client's
local training has. The callbacks listed in :data:`RUN` have been run under FedLoop (``tests/test_lightning_callbacks.py``); the
others would fail mid-run on a Trainer attribute FedLoop does not have, so ``FedLoop(callbacks=...)`` refuses them
at once and says what FedLoop does in their place. A callback of your own (a subclass of ``Callback``) is never
refused: it gets the view.

Example::

    from lightning.pytorch.callbacks import EarlyStopping
    FedLoop(callbacks=[EarlyStopping(monitor="val_loss")])
    # ValueError: FedLoop: callbacks: Lightning's EarlyStopping does not run inside FedLoop (...): a client trains
    # local_epochs epochs each round; to end one client's local training early, set self.trainer.should_stop ...
"""

from __future__ import annotations

from typing import Any

RUN = ("ModelSummary", "RichModelSummary", "Timer", "LambdaCallback", "ModelPruning", "BaseFinetuning",
       "BackboneFinetuning")
"""Lightning's callbacks that run inside FedLoop (each on every client's local training)."""

INSTEAD = {
    "ModelCheckpoint": "FedLoop writes its own checkpoints (checkpoint_every, keep_checkpoints) and the final "
                       "global model (final.safetensors); fit(resume='last') continues a run",
    "OnExceptionCheckpoint": "FedLoop writes its own checkpoints (checkpoint_every) and fit(resume='last') "
                             "continues a run from the last one",
    "EarlyStopping": "a client trains local_epochs epochs each round and the run lasts rounds rounds; to end one "
                     "client's local training early, set self.trainer.should_stop = True in the module",
    "LearningRateMonitor": "log the rate from the module, e.g. self.log('lr', self.optimizers().param_groups[0]"
                           "['lr']) in training_step",
    "TQDMProgressBar": "FedLoop shows the progress of the rounds itself (verbose=True)",
    "RichProgressBar": "FedLoop shows the progress of the rounds itself (verbose=True)",
    "ProgressBar": "FedLoop shows the progress of the rounds itself (verbose=True)",
    "GradientAccumulationScheduler": "FedLoop(accumulate_grad_batches=N) accumulates in every client's training",
    "StochasticWeightAveraging": "the server averages the clients' models every round; a strategy or a "
                                 "FedCallback (docs/callbacks.md) can keep a running average of the global model",
    "WeightAveraging": "the server averages the clients' models every round; a strategy or a FedCallback "
                       "(docs/callbacks.md) can keep a running average of the global model",
}
"""What FedLoop does in place of a Lightning callback it cannot run, by class name."""

_LIGHTNING_MODULES = ("lightning.pytorch.callbacks", "pytorch_lightning.callbacks")


def refusal(callback: Any) -> str | None:
    """Why ``callback`` cannot run inside FedLoop, or ``None`` when it can: a callback is refused when one of its
    classes (itself or a base) is one of Lightning's own callbacks outside :data:`RUN`."""
    mro = type(callback).__mro__
    for cls in mro:
        if cls.__name__ in RUN:
            return None
        if cls.__module__.startswith(_LIGHTNING_MODULES) and cls.__name__ != "Callback":
            what = (f"Lightning's {cls.__name__}" if cls is type(callback)
                    else f"{type(callback).__name__} (a Lightning {cls.__name__})")
            instead = next((INSTEAD[c.__name__] for c in mro if c.__name__ in INSTEAD),
                           "see docs/lightning.md for the Lightning callbacks that run")
            return (f"{what} does not run inside FedLoop (it reads parts of lightning.Trainer that a client's local "
                    f"training does not have): {instead}")
    return None


__all__ = ["INSTEAD", "RUN", "refusal"]
