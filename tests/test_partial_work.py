"""Partial work: ``Instruction.config["max_steps"]`` truncates local training, the steps a client ran reach the
server (validated, and carried between processes), and the FedProx paper's stragglers (dropped or capped)."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed import FedLoop
from lightning_fed.callbacks import FedCallback, Stragglers
from lightning_fed.callbacks.stragglers import straggler_cap
from lightning_fed.context import FedContext
from lightning_fed.data import IID
from lightning_fed.parallel import pack_messages, task_cost, unpack_messages
from lightning_fed.protocol import (
    ClientMessage,
    ClientTask,
    Instruction,
    RejectedReply,
    Reply,
    validate_local_steps,
)
from lightning_fed.strategies import FedAvg, FedProx

N, BATCH = 40, 4  # 4 clients of 10 samples: 3 batches (4, 4, 2) per local epoch


class Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.lin(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Data(L.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(
            TensorDataset(torch.randn(N, 3, generator=g), torch.randn(N, generator=g)),
            batch_size=BATCH,
            shuffle=True,
        )


class Record(FedCallback):
    """Client side: the steps each client ran and the trainer's ``max_steps``; server side: the replies' counts."""

    def __init__(self) -> None:
        self.client_steps, self.max_steps, self.server_steps = {}, {}, []

    def on_train_end(self, trainer, pl_module):
        self.client_steps[trainer.fed.round, trainer.client_id] = trainer.global_step
        self.max_steps[trainer.fed.round, trainer.client_id] = (
            trainer.max_steps,
            trainer.estimated_stepping_batches,
        )

    def on_aggregate_start(self, trainer, pl_module, replies):
        self.server_steps.append({r.client_id: r.local_steps for r in replies})


def _fit(tmp_path, strategy, callbacks=(), epochs=2, rounds=2):
    L.seed_everything(0)
    rec = Record()
    loop = FedLoop(
        num_clients=4,
        clients_per_round=4,
        rounds=rounds,
        local_epochs=epochs,
        partition=IID(),
        strategy=strategy,
        callbacks=[*callbacks, rec],
        verbose=False,
        plot=False,
        checkpoint_every=0,
        loggers=[],
        output_dir=str(tmp_path),
    )
    res = loop.fit(Linear(), Data())
    return rec, res, loop


def test_max_steps_truncates_local_training_and_the_count_reaches_the_server(tmp_path):
    rec, _, loop = _fit(tmp_path, FedProx(mu=0.0, max_steps=4))
    assert loop.context.steps_per_epoch == [3, 3, 3, 3]
    assert set(rec.client_steps.values()) == {4}  # 2 epochs x 3 batches = 6, cut to 4 (inside the 2nd epoch)
    assert set(rec.max_steps.values()) == {(4, 4)}
    assert rec.server_steps == [{0: 4, 1: 4, 2: 4, 3: 4}] * 2
    full, _, _ = _fit(tmp_path, FedAvg())
    assert set(full.client_steps.values()) == {6} and full.server_steps == [{0: 6, 1: 6, 2: 6, 3: 6}] * 2
    assert set(full.max_steps.values()) == {(-1, 6)}


def test_stragglers_partial_work_is_seeded_and_below_full(tmp_path):
    rec, res, _ = _fit(
        tmp_path, FedProx(mu=0.1), [Stragglers(fraction=0.5, mode="partial", seed=3)], epochs=3, rounds=3
    )
    for steps in rec.server_steps:
        assert sorted(steps) == [0, 1, 2, 3]  # nobody dropped
        assert sorted(steps.values())[2:] == [9, 9]  # two run the full 3 epochs x 3 steps
        assert all(s in (3, 6) for s in sorted(steps.values())[:2])  # two stragglers: 1 or 2 epochs
    assert [h["stragglers"] for h in res.history] == [2, 2, 2]
    again, _, _ = _fit(
        tmp_path, FedProx(mu=0.1), [Stragglers(fraction=0.5, mode="partial", seed=3)], epochs=3, rounds=3
    )
    assert again.server_steps == rec.server_steps


def test_stragglers_drop_mode_sends_them_nothing(tmp_path):
    rec, res, _ = _fit(tmp_path, FedAvg(), [Stragglers(fraction=0.75, mode="drop")], rounds=3)
    assert [len(s) for s in rec.server_steps] == [1, 1, 1]
    assert all(set(s.values()) == {6} for s in rec.server_steps)
    assert [h["good"] for h in res.history] == [1, 1, 1]


def test_stragglers_draw_on_the_server():
    ctx = FedContext(
        num_clients=10,
        num_rounds=5,
        eval_every=1,
        run_dir=".",
        local_epochs=20,
        steps_per_epoch=[7] * 10,
        round=2,
    )
    trainer = SimpleNamespace(fed=ctx)
    instructions = [Instruction(c, {}) for c in range(10)]
    Stragglers(fraction=0.9, mode="partial", seed=1).on_round_start(trainer, None, instructions)
    caps = [i.config.get("max_steps") for i in instructions]
    assert sum(c is not None for c in caps) == 9
    assert all(c % 7 == 0 and 7 <= c <= 19 * 7 for c in caps if c is not None)
    kept = [Instruction(c, {}) for c in range(10)]
    Stragglers(fraction=0.9, mode="drop", seed=1).on_round_start(trainer, None, kept)
    assert len(kept) == 1 and kept[0].client_id == caps.index(None)  # the same draw: the one non-straggler
    g = torch.Generator().manual_seed(0)
    assert straggler_cap(g, 1, 1) is None and 1 <= straggler_cap(g, 1, 5) <= 4


def test_local_steps_are_untrusted():
    def reply(n):
        return Reply(0, {}, 1, local_steps=n)

    validate_local_steps(reply(5), 5)
    validate_local_steps(reply(0))
    for bad, cap in [(-1, None), (True, None), (2.0, None), (6, 5)]:
        with pytest.raises(RejectedReply, match="local_steps"):
            validate_local_steps(reply(bad), cap)


def test_a_client_claiming_more_steps_than_allowed_is_rejected(tmp_path):
    class Liar(FedCallback):
        def on_client_end(self, trainer, pl_module, reply):
            if trainer.client_id == 0:
                reply.local_steps = 1000

    _, res, _ = _fit(tmp_path, FedProx(mu=0.0, max_steps=2), [Liar()], rounds=1)
    assert res.history[0]["rejected"] == 1 and res.history[0]["good"] == 3


def test_local_steps_travel_between_processes():
    msgs = [
        ClientMessage(3, b"abc", 10, {"train_loss": 0.5}, local_steps=17),
        ClientMessage(4, failure="boom"),
    ]
    out, _ = unpack_messages(pack_messages(msgs, 0.0))
    assert [m.local_steps for m in out] == [17, 0]


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: Stragglers(fraction=1.5),
            r"Stragglers: fraction=1.5 is not allowed; fraction must be a number in \[0, 1\]",
        ),
        (
            lambda: Stragglers(mode="late"),
            r"Stragglers: mode='late' is not allowed; mode must be one of \('partial', 'drop'\)",
        ),
    ],
)
def test_bad_straggler_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_load_balance_counts_only_the_capped_work():
    module = nn.Linear(3, 1)  # 4 parameters
    work = SimpleNamespace(
        local_epochs=2,
        shards=[torch.arange(10), torch.arange(10)],
        template=SimpleNamespace(batch_size=4),
        view=SimpleNamespace(lightning_module=module, accumulate_grad_batches=1),
        strategy=SimpleNamespace(client_module=lambda cid, default: default),
    )
    full = ClientTask(0, 0, b"", {}, {})
    capped = ClientTask(0, 1, b"", {}, {"max_steps": 2})
    assert task_cost(full, work) == 10 * 2 * 4  # examples x epochs x parameters
    assert task_cost(capped, work) == 2 * 4 * 4  # 2 steps of 4 examples
