"""Simulated attacks: the malicious clients are a seeded set; the trigger reaches only their data; each attack
changes exactly their replies in a FedLoop run; the attack success rate on constructed models; bad settings."""

from types import SimpleNamespace

import pytest
import torch
from conftest import seeded
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_fed.callbacks import (
    Attack,
    Backdoor,
    FedCallback,
    GaussianUpdate,
    LabelFlip,
    LittleIsEnough,
    SignFlip,
    attack_success_rate,
)
from lightning_fed.callbacks.attacks import _write_rows, malicious_clients
from lightning_fed.callbacks.backdoor import apply_trigger
from lightning_fed.context import FedContext
from lightning_fed.models import MNIST1DCNN
from lightning_fed.protocol import Reply
from lightning_fed.report import summary_table


def client_trainer(cid, server_round=0, num_clients=10, tmp_path="."):
    return SimpleNamespace(fed=FedContext(num_clients=num_clients, num_rounds=5, eval_every=1, run_dir=tmp_path,
                                          round=server_round, client_id=cid))


def test_malicious_clients_are_seeded_fixed_or_per_round():
    fixed = malicious_clients(0.3, 10, seed=0)
    assert len(fixed) == 3 and fixed == sorted(fixed)
    assert fixed == malicious_clients(0.3, 10, seed=0)
    assert fixed != malicious_clients(0.3, 10, seed=1)
    per_round = [malicious_clients(0.3, 10, seed=0, server_round=r) for r in range(6)]
    assert all(len(m) == 3 for m in per_round) and len({tuple(m) for m in per_round}) > 1
    assert malicious_clients(0.0, 10, 0) == [] and malicious_clients(1.0, 10, 0) == list(range(10))
    attack = SignFlip(fraction=0.3, start_round=2)
    assert attack.malicious(1, 10) == [] and attack.malicious(2, 10) == fixed
    rounds = SignFlip(fraction=0.3, mode="round")
    assert [rounds.malicious(r, 10) for r in range(6)] == per_round


def test_the_fixed_set_is_drawn_apart_from_the_client_sampler():
    # Regression: the fixed set once shared the seed of round index 12's client sample, so with the attack seeded
    # like the run that round sampled the malicious clients first (at 100 clients, 10 malicious of 10).
    from lightning_fed.plan import sample_clients

    for seed in range(3):
        bad = set(malicious_clients(0.2, 100, seed))
        per_round = [len(bad.intersection(sample_clients(seed, r, 100, 10))) for r in range(150)]
        assert max(per_round) <= 6, (seed, per_round.index(max(per_round)))  # 7+ of 10: p < 0.002 a round
        assert set(sample_clients(seed, 12, 100, 10)) != set(malicious_clients(0.1, 100, seed))


def test_apply_trigger_sequence_and_image():
    x = torch.zeros(2, 8)
    t = apply_trigger(x, size=3, value=2.0)
    assert t[:, 5:].tolist() == [[2.0, -2.0, 2.0]] * 2 and t[:, :5].abs().sum() == 0
    assert x.abs().sum() == 0  # a copy
    img = apply_trigger(torch.zeros(1, 3, 5, 5), size=2, value=1.0)
    assert img[0, :, 3:, 3:].tolist() == [[[1.0, -1.0], [-1.0, 1.0]]] * 3
    assert img[0, :, :3].abs().sum() == 0 and img[0, :, :, :3].abs().sum() == 0
    with pytest.raises(ValueError, match="cannot hold a trigger of size 9"):
        apply_trigger(torch.zeros(2, 8), size=9)


def test_trigger_reaches_only_malicious_clients_data():
    x = torch.randn(100, 40)
    y = torch.arange(100) % 10
    data = TensorDataset(x, y)
    attack = Backdoor(fraction=0.3, target=7, poison_fraction=0.5, trigger_size=4, trigger_value=3.0)
    bad = malicious_clients(0.3, 10, 0)
    for cid in range(10):
        shard = Subset(data, list(range(cid * 10, cid * 10 + 10)))
        out = attack.on_client_data(client_trainer(cid), None, shard)
        if cid not in bad:
            assert out is shard
            continue
        xs, ys = out.tensors
        triggered = (xs[:, 36:] == torch.tensor([3.0, -3.0, 3.0, -3.0])).all(dim=1)
        assert int(triggered.sum()) == 5  # poison_fraction of 10 records
        assert (ys[triggered] == 7).all()
        assert torch.equal(xs[~triggered], x[cid * 10:cid * 10 + 10][~triggered])
        assert torch.equal(ys[~triggered], y[cid * 10:cid * 10 + 10][~triggered])
    assert attack.on_client_data(SimpleNamespace(), None, data) is data  # lightning.Trainer: no attack


class _Fixed(nn.Module):
    """Classifies by a rule on the input (4 classes)."""

    def __init__(self, rule):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.rule = rule

    def forward(self, x):
        return nn.functional.one_hot(self.rule(x), 4).float() + 0 * self.w


def test_attack_success_rate_on_constructed_models():
    x = torch.tensor([[1.0, 0, 0, 0, 0, 0], [-1.0, 0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0, 0], [-1.0, 0, 0, 0, 0, 0],
                      [1.0, 0, 0, 0, 0, 0]])
    y = torch.tensor([0, 1, 2, 3, 1])  # target 0: the four records of classes 1, 2, 3, 1 count
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    sees_trigger = _Fixed(lambda v: torch.where(v[:, -1] == -3.0, 0, 1))  # backdoored: trigger -> target
    assert attack_success_rate(sees_trigger, loader, target=0, size=2, value=3.0) == 1.0
    assert attack_success_rate(_Fixed(lambda v: torch.ones(len(v), dtype=torch.long)), loader, 0, 2, 3.0) == 0.0
    by_sign = _Fixed(lambda v: torch.where(v[:, 0] > 0, 0, 2))  # target for 2 of the 4 non-target records
    by_sign.train()
    assert attack_success_rate(by_sign, loader, 0, 2, 3.0) == 0.5
    assert by_sign.training  # left as it was
    only_target = DataLoader(TensorDataset(x[:1], y[:1]))
    assert attack_success_rate(sees_trigger, only_target, 0, 2, 3.0) == 0.0


def test_backdoor_model_replacement_and_norm_constraint():
    reply = Reply(3, {"a": torch.tensor([3.0, 4.0]), "n": torch.tensor([5])}, 10)
    bad = malicious_clients(0.3, 10, 0)
    Backdoor(fraction=0.3, boost=2.0).on_client_end(client_trainer(bad[0]), None, reply)
    assert reply.payload["a"].tolist() == [6.0, 8.0] and reply.payload["n"].tolist() == [5]
    Backdoor(fraction=0.3, boost=4.0, max_norm=5.0).on_client_end(client_trainer(bad[0]), None, reply)
    assert reply.payload["a"].tolist() == pytest.approx([3.0, 4.0])  # 4x (6, 8) has norm 40, clipped to 5
    good = next(c for c in range(10) if c not in bad)
    Backdoor(fraction=0.3, boost=4.0).on_client_end(client_trainer(good), None, reply)
    assert reply.payload["a"].tolist() == pytest.approx([3.0, 4.0])


def test_malicious_csv_rows_are_replaced_on_a_repeated_round(tmp_path):
    path = tmp_path / "m.csv"
    _write_rows(path, "SignFlip", 1, [2, 5])
    _write_rows(path, "Backdoor", 1, [1])
    _write_rows(path, "SignFlip", 2, [2])
    _write_rows(path, "SignFlip", 2, [5])  # a resumed run repeats round 2
    assert path.read_text().splitlines() == ["round,client,attack", "1,2,SignFlip", "1,5,SignFlip", "1,1,Backdoor",
                                             "2,5,SignFlip"]


class Recorder(FedCallback):
    """The decoded replies of every round, by client."""

    def __init__(self):
        self.replies = []

    def on_aggregate_start(self, trainer, pl_module, replies):
        self.replies.append({r.client_id: {k: v.clone() for k, v in r.payload.items()} for r in replies})


def _run(make_loop, small_dm, attack, rounds=1):
    rec = Recorder()
    loop = make_loop(num_clients=6, clients_per_round=6, rounds=rounds,
                     callbacks=[attack, rec] if attack is not None else [rec])
    result = loop.fit(seeded(MNIST1DCNN, channels=8), small_dm)
    return rec.replies, result


ATTACKS = [
    lambda: LabelFlip(fraction=1 / 3, num_classes=10),
    lambda: SignFlip(fraction=1 / 3, scale=2.0),
    lambda: GaussianUpdate(fraction=1 / 3, std=0.1),
    lambda: LittleIsEnough(fraction=1 / 3, z=1.5),
    lambda: Backdoor(fraction=1 / 3, boost=3.0),
]


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """The replies of a run without attack (shared by the attack runs)."""
    from lightning_fed import FedLoop, MNIST1DDataModule

    rec = Recorder()
    loop = FedLoop(num_clients=6, clients_per_round=6, rounds=1, local_epochs=1, callbacks=[rec],
                   output_dir=str(tmp_path_factory.mktemp("honest")), verbose=False, plot=False, loggers=[],
                   checkpoint_every=0)
    loop.fit(seeded(MNIST1DCNN, channels=8), MNIST1DDataModule(batch_size=32, num_samples=1000))
    return rec.replies[0]


@pytest.mark.parametrize("build", ATTACKS, ids=["label_flip", "sign_flip", "gaussian", "little_is_enough", "backdoor"])
def test_each_attack_changes_exactly_the_malicious_replies(build, honest, make_loop, small_dm):
    attack = build()
    bad = set(attack.malicious(0, 6))
    assert len(bad) == 2
    (got,), result = _run(make_loop, small_dm, attack)
    assert got.keys() == honest.keys()
    changed = {cid for cid in got if any(not torch.equal(got[cid][k], honest[cid][k]) for k in got[cid])}
    assert changed == bad
    if isinstance(attack, SignFlip):
        for cid in bad:
            assert all(torch.equal(got[cid][k], -2.0 * honest[cid][k]) for k in got[cid])
    history = result.history
    assert history[0]["malicious"] == 2.0
    rows = (result.run_dir / "malicious_clients.csv").read_text().splitlines()
    assert rows == ["round,client,attack", *(f"1,{c},{type(attack).__name__}" for c in sorted(bad))]


def test_backdoor_logs_attack_success_rate_in_history_and_summary(make_loop, small_dm):
    attack = Backdoor(fraction=1 / 3, boost=3.0)
    _, result = _run(make_loop, small_dm, attack, rounds=2)
    last = result.history[-1]
    assert 0.0 <= last["test_asr"] <= 1.0 and "test_acc" in last
    table = summary_table(result.history)
    console = Console(record=True, width=200)
    console.print(table)
    assert "final test asr" in console.export_text()


@pytest.mark.parametrize("build, match", [
    (lambda: SignFlip(fraction=1.5), r"SignFlip: fraction=1.5 is not allowed; fraction must be in \[0, 1\]"),
    (lambda: LabelFlip(fraction=-0.1), r"LabelFlip: fraction=-0.1 is not allowed"),
    (lambda: GaussianUpdate(mode="sometimes"), r"GaussianUpdate: mode='sometimes' is not allowed"),
    (lambda: SignFlip(scale=0), r"SignFlip: scale=0 is not allowed; scale must be > 0"),
    (lambda: GaussianUpdate(std=-1.0), r"GaussianUpdate: std=-1.0 is not allowed"),
    (lambda: LittleIsEnough(z=0), r"LittleIsEnough: z=0 is not allowed"),
    (lambda: LabelFlip(target=10), r"LabelFlip: target=10 is not allowed"),
    (lambda: Backdoor(poison_fraction=0), r"Backdoor: poison_fraction=0 is not allowed; poison_fraction must be in"),
    (lambda: Backdoor(boost=0.5), r"Backdoor: boost=0.5 is not allowed"),
    (lambda: Backdoor(max_norm=-1.0), r"Backdoor: max_norm=-1.0 is not allowed; max_norm must be > 0"),
    (lambda: Backdoor(start_round=-1), r"Backdoor: start_round=-1 is not allowed"),
])
def test_invalid_settings_name_the_key(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_attacks_are_fed_callbacks():
    assert all(isinstance(b(), Attack) and isinstance(b(), FedCallback) for b in ATTACKS)


def test_attacks_do_nothing_under_lightning_trainer(small_dm, tmp_path):
    import lightning as L

    model = seeded(MNIST1DCNN, channels=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[b() for b in ATTACKS])
    trainer.fit(model, small_dm)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained


def test_trigger_start_and_constant_pattern_hand_checked():
    x = torch.zeros(2, 10)
    t = apply_trigger(x, size=3, value=2.0, start=2, pattern="constant")
    assert t.tolist() == [[0.0, 0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]] * 2
    assert apply_trigger(x, 3, 2.0, start=0)[0].tolist() == [2.0, -2.0, 2.0, 0, 0, 0, 0, 0, 0, 0]
    assert torch.equal(apply_trigger(x, 3, 2.0, start=7), apply_trigger(x, 3, 2.0))  # None: the end
    img = apply_trigger(torch.zeros(1, 2, 4, 5), size=2, value=1.0, start=1, pattern="constant")
    expected = [[0.0] * 5, [0.0, 1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0, 0.0], [0.0] * 5]
    assert img[0].tolist() == [expected] * 2
    corner = apply_trigger(torch.zeros(1, 1, 4, 4), size=2, value=1.0, start=0)
    assert corner[0, 0, :2, :2].tolist() == [[1.0, -1.0], [-1.0, 1.0]] and corner[0, 0, 2:].abs().sum() == 0


def test_trigger_bad_settings_raise():
    with pytest.raises(ValueError, match="cannot hold a trigger of size 3 from position 8"):
        apply_trigger(torch.zeros(2, 10), size=3, start=8)
    with pytest.raises(ValueError, match="cannot hold a trigger of size 2 from position 3"):
        apply_trigger(torch.zeros(1, 1, 4, 6), size=2, start=3)  # fits the 6 columns, not the 4 rows
    with pytest.raises(ValueError, match="start -1 is negative"):
        apply_trigger(torch.zeros(2, 10), start=-1)
    with pytest.raises(ValueError, match="'zigzag' is not one of alternating, constant"):
        apply_trigger(torch.zeros(2, 10), pattern="zigzag")
    with pytest.raises(ValueError, match=r"Backdoor: trigger_start=-1 is not allowed.*>= 0 or None"):
        Backdoor(trigger_start=-1)
    with pytest.raises(ValueError, match=r"Backdoor: trigger_start=1.5 is not allowed"):
        Backdoor(trigger_start=1.5)
    with pytest.raises(ValueError, match=r"Backdoor: trigger_pattern='zigzag' is not allowed.*alternating"):
        Backdoor(trigger_pattern="zigzag")


def test_backdoor_trigger_start_and_pattern_reach_poison_and_attack_success():
    attack = Backdoor(fraction=1.0, target=7, poison_fraction=0.5, trigger_start=18, trigger_pattern="constant")
    x, y = torch.randn(10, 40), torch.arange(10)
    xs, ys = attack.poison(x, y, torch.Generator().manual_seed(0))
    triggered = (xs[:, 18:22] == 3.0).all(dim=1)
    assert int(triggered.sum()) == 5 and (ys[triggered] == 7).all()
    assert torch.equal(xs[:, :18], x[:, :18]) and torch.equal(xs[:, 22:], x[:, 22:])  # nothing else written
    loader = DataLoader(TensorDataset(torch.zeros(4, 40), torch.tensor([1, 2, 3, 1])), batch_size=2)
    sees_middle = _Fixed(lambda v: torch.where((v[:, 18:22] == 3.0).all(dim=1), 0, 1))
    assert attack_success_rate(sees_middle, loader, 0, 4, 3.0, start=18, pattern="constant") == 1.0
    assert attack_success_rate(sees_middle, loader, 0, 4, 3.0) == 0.0  # the default trigger: the end, +-3
    assert attack_success_rate(sees_middle, loader, 0, 4, 3.0, start=18) == 0.0  # there, but alternating
