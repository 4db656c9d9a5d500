"""FedMD and FedMD-NFDP: payloads, consensus, digest, NFDP's guarantee, malformed logits."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _distill_common import Corrupt, Spy, cnn, fit_rejected, tiny_dm, tiny_loop, tiny_public, trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed import FedCallback, FedLoop
from lightning_fed.context import fed_context
from lightning_fed.data import IID
from lightning_fed.models import MNIST1DMLP
from lightning_fed.protocol import Instruction, Reply
from lightning_fed.strategies import FedMD, FedMDNFDP, ModelTiers
from lightning_fed.strategies.digest import ConsensusDigest
from lightning_fed.strategies.fedmd_nfdp import RecordSubset, nfdp_delta, nfdp_epsilon
from lightning_fed.weights import load_into


def test_fedmd_heterogeneous_run_payload_shapes(tmp_path):
    torch.manual_seed(0)
    spy = Spy()
    s = FedMD(public=tiny_public(), public_per_round=50, tiers=ModelTiers(models=[cnn(6)]), eval_clients=2)
    loop, dm, default = tiny_loop(tmp_path, s, rounds=2, callbacks=[spy]), tiny_dm(), cnn(4)
    res = loop.fit(default, dm)
    assert len(spy.replies) == 4
    assert all(p == {"logits": ((50, 10), torch.float32)} for _, p in spy.replies)
    assert spy.instructions[0][1] == {"subset"}  # round 1: no consensus yet
    assert spy.instructions[-1][1] == {"subset", "consensus", "consensus_subset"}
    last = res.history[-1]
    assert last["good"] == 2 and last["rejected"] == 0
    assert "tier0/test_acc" in last or "tier1/test_acc" in last
    # clients/test_acc is the mean test accuracy of the stored client models (3 clients trained, <= 2 per tier)
    x, y = dm.test_set.tensors
    accs = []
    for cid in sorted(loop.store.ids()):
        tier = s.tiers.tier_of(cid)
        m = s.tiers.module(tier, default)
        load_into(m, loop.store.load(cid)["model"])
        assert not torch.equal(m.state_dict()["head.weight"], s._initial(tier)["head.weight"])  # it trained
        with torch.no_grad():
            accs.append((m.eval()(x).argmax(1) == y).float().mean().item())
    assert len(accs) == 3 and last["clients/test_acc"] == pytest.approx(sum(accs) / len(accs), abs=1e-6)
    # no weights cross the wire: uplink = 2 clients x 50 x 10 float32 (+ the safetensors header)
    assert 2 * 50 * 10 * 4 <= last["bytes_up"] < 2 * 50 * 10 * 4 + 400
    # every client that trained has its own weights in its store
    assert s.consensus is not None and s.consensus.shape == (50, 10)


def test_consensus_is_mean_of_logits():
    s = FedMD(public=tiny_public(), public_per_round=3)
    s.setup(cnn(2))
    s.configure_round(0, [0, 1])
    a, b = torch.randn(3, 10), torch.randn(3, 10)
    s.aggregate(0, [Reply(0, {"logits": a}, 10), Reply(1, {"logits": b}, 30)])
    assert torch.allclose(s.consensus, (a + b) / 2)
    spec = s.reply_spec(Instruction(0, {"subset": torch.arange(3)}))
    assert spec["logits"].shape == (3, 10)


def test_fedmd_rejects_malformed_logits(tmp_path):
    bad_shape = Corrupt("logits", lambda t: t[:-1])
    s = FedMD(public=tiny_public(), public_per_round=20)
    history = fit_rejected(tiny_loop(tmp_path / "a", s, callbacks=[bad_shape]), cnn(4), tiny_dm())
    assert [h["rejected"] for h in history] == [2, 2] and all(h["skipped"] == 1 for h in history)
    nan = Corrupt("logits", lambda t: t.fill_(float("nan")))
    history = fit_rejected(tiny_loop(tmp_path / "b", FedMD(public=tiny_public(), public_per_round=20), callbacks=[nan]),
                           cnn(4), tiny_dm())
    assert [h["rejected"] for h in history] == [2, 2]


def test_digest_moves_model_toward_target_under_trainer():
    torch.manual_seed(0)
    model = cnn(4)
    x = torch.randn(64, 40)
    target = torch.randn(64, 10) * 3
    before = F.l1_loss(model(x), target).item()
    digest = ConsensusDigest(loss="l1", epochs=5, batch_size=16)
    digest.set_target(x, target)
    t = trainer(batches=1)
    t.callbacks.append(digest)
    t.fit(model, tiny_dm())
    assert digest.last_loss < before and digest.last_loss == pytest.approx(before, abs=0.1)  # the L1 loss it trains
    assert F.l1_loss(model(x), target).item() < before


def test_digest_misconfiguration():
    with pytest.raises(ValueError, match="loss='mse'"):
        ConsensusDigest(loss="mse")
    with pytest.raises(ValueError, match="epochs=-1"):
        ConsensusDigest(epochs=-1)
    with pytest.raises(ValueError, match="public_per_round=0"):
        FedMD(public_per_round=0)
    with pytest.raises(ValueError, match="records_per_party=0"):
        FedMDNFDP(records_per_party=0)


@pytest.mark.parametrize(("k", "n"), [(1, 1), (10, 100), (64, 200), (200, 200)])
def test_nfdp_epsilon_closed_form(k, n):
    assert nfdp_epsilon(k, n) == pytest.approx(math.log((n + 1) / (n + 1 - k)))
    assert nfdp_delta(k, n) == pytest.approx(k / n)


def test_nfdp_epsilon_values_and_errors():
    assert nfdp_epsilon(10, 100) == pytest.approx(math.log(101 / 91))  # 0.104261
    assert nfdp_epsilon(10, 100) == pytest.approx(0.104261, abs=1e-6)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        nfdp_epsilon(5, 4)


class RecordCounter(FedCallback):
    """Counts the records each client (``None`` under ``lightning.Trainer``) trains on, per training batch."""

    def __init__(self) -> None:
        self.records: dict[int | None, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        fed = fed_context(trainer)
        cid = fed.client_id if fed is not None else None
        self.records[cid] = self.records.get(cid, 0) + len(batch[0])


class DuplicatesDM(L.LightningDataModule):
    """120 training records that are all the same (x = 0, y = 3), and 20 test records."""

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(120, 40), torch.full((120,), 3)), batch_size=16)

    def test_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(20, 40), torch.full((20,), 3)), batch_size=16)


def test_record_subset_under_trainer_trains_on_k_records():
    torch.manual_seed(0)
    dm = tiny_dm()
    dm.setup()
    cb, counter = RecordSubset(k=50), RecordCounter()
    t = trainer(batches=None)
    t.callbacks += [cb, counter]
    t.fit(cnn(4), DataLoader(cb.subset(dm.train_set), batch_size=32, shuffle=True))
    assert counter.records == {None: 50}
    assert "training_step" not in t.lightning_module.__dict__


def test_record_subset_under_trainer_refuses_the_full_dataset():
    t = trainer(batches=None)
    t.callbacks.append(RecordSubset(k=50))
    with pytest.raises(ValueError, match=r"RecordSubset\(k=50, seed=0\): under lightning.Trainer the training data "
                                         r"must be this callback's subset, got TensorDataset"):
        t.fit(cnn(4), tiny_dm())
    t = trainer(batches=None)
    t.callbacks.append(RecordSubset(k=50))
    dm = tiny_dm()
    dm.setup()
    with pytest.raises(ValueError, match="got KeptRecords"):  # a subset drawn with another k
        t.fit(cnn(4), DataLoader(RecordSubset(k=40).subset(dm.train_set), batch_size=32))


def test_record_subset_keeps_exactly_k_duplicate_records_in_fedloop(tmp_path):
    """All records are equal: recognising records by their bytes would keep every one; positions keep k."""
    torch.manual_seed(0)
    counter = RecordCounter()
    loop = FedLoop(num_clients=3, clients_per_round=3, rounds=2, local_epochs=2, partition=IID(),
                   callbacks=[RecordSubset(k=7, seed=3), counter], output_dir=str(tmp_path), verbose=False,
                   plot=False, loggers=[], checkpoint_every=0)
    res = loop.fit(MNIST1DMLP(), DuplicatesDM())
    assert counter.records == {0: 2 * 2 * 7, 1: 2 * 2 * 7, 2: 2 * 2 * 7}  # rounds x local epochs x k
    assert [h["examples"] for h in res.history] == [120, 120]  # replies still report each client's n


def test_record_subset_draws_the_same_positions_every_round():
    rs = RecordSubset(k=7, seed=3)
    shard = TensorDataset(torch.arange(40))
    a, b = rs.subset(shard, client_id=2), rs.subset(shard, client_id=2)
    assert a.indices == b.indices == rs.chosen(40, 2).tolist() and len(set(a.indices)) == 7
    assert a.indices != rs.subset(shard, client_id=1).indices
    assert len(rs.subset(TensorDataset(torch.arange(4)))) == 4  # fewer than k records: all of them


def test_fedmd_nfdp_run_reports_guarantee(tmp_path):
    torch.manual_seed(0)
    s = FedMDNFDP(records_per_party=20, public=tiny_public(), public_per_round=30)
    counter = RecordCounter()
    res = tiny_loop(tmp_path, s, rounds=2, callbacks=[counter]).fit(cnn(4), tiny_dm())
    assert set(counter.records) == set(s.guarantees)  # two rounds of one local epoch: 2 x k records if sampled twice
    assert all(v in (20, 40) for v in counter.records.values()), counter.records
    sizes = [len(sh) for cid, sh in enumerate(tiny_loop(tmp_path / "x", s).partition.split(
        torch.as_tensor(tiny_dm_labels()), 4, 0)) if cid in s.guarantees]
    expected = max(nfdp_epsilon(min(20, n), n) for n in sizes)
    assert res.history[-1]["nfdp/epsilon"] == pytest.approx(expected)
    assert res.history[-1]["nfdp/delta"] == pytest.approx(max(nfdp_delta(min(20, n), n) for n in sizes))
    eps, delta = s.guarantee(200)
    assert eps == pytest.approx(math.log(201 / 181)) and delta == pytest.approx(0.1)


def tiny_dm_labels():
    dm = tiny_dm()
    dm.setup()
    return dm.train_set.tensors[1]


def test_fedmd_transfer_learning_trains_each_tier_on_labelled_public_data():
    from lightning_fed.data.public import PublicData

    pub = PublicData(num_samples=300, seed=7, labeled=True)
    x, y = pub.x, pub.y
    torch.manual_seed(0)
    tiers = ModelTiers(models=[cnn(6)])
    s = FedMD(public=PublicData.from_tensors(x, y), public_per_round=50, tiers=tiers, transfer_epochs=10,
              transfer_lr=1e-2)
    base = cnn(4)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (base, tiers.models[0])]
    s.setup(base)
    assert len(s.transfer_acc) == 2 and all(a > 0.25 for a in s.transfer_acc)  # chance is 0.1
    for t, m in enumerate((base, tiers.models[0])):  # the tiers' initial weights are the transferred ones
        assert not torch.equal(s._initial(t)["head.weight"], before[t]["head.weight"])
        assert torch.equal(s._initial(t)["head.weight"], m.state_dict()["head.weight"])
    again = FedMD(public=PublicData.from_tensors(x, y), public_per_round=50, tiers=ModelTiers(models=[cnn(6)]),
                  transfer_epochs=10, transfer_lr=1e-2)
    torch.manual_seed(0)
    b2 = cnn(4)
    b2.load_state_dict(before[0])
    again.tiers.models[0].load_state_dict(before[1])
    again.setup(b2)
    assert torch.equal(again._initial(1)["head.weight"], s._initial(1)["head.weight"])  # seeded: deterministic


def test_fedmd_transfer_needs_labels():
    with pytest.raises(ValueError, match="transfer_epochs=2 needs labelled public data"):
        FedMD(public=tiny_public(), transfer_epochs=2)
    with pytest.raises(ValueError, match="transfer_epochs=-1"):
        FedMD(transfer_epochs=-1)
