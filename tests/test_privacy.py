"""Differential privacy: central DP-FedAvg (fixed and adaptive clipping), local DP, DP-SGD through Opacus, and the
accounting, checked against hand computations and against Opacus' accountant called directly."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn

from lightning_fed.accounting import PrivacyAccountant
from lightning_fed.callbacks import DPSGD, LocalDP
from lightning_fed.callbacks.local_dp import clip_and_noise
from lightning_fed.models import MNIST1DCNN, MNIST1DMLP
from lightning_fed.plan import sample_clients
from lightning_fed.protocol import Reply
from lightning_fed.strategies import ClipNoise, CoordinateMedian, DPFedAvg, FedAvg, WeightedMean
from lightning_fed.strategies.dp import adaptive_noise_multiplier
from tests.conftest import seeded

# ---------------------------------------------------------------- clipping and noise against hand computations


def test_clip_noise_clips_each_update_and_divides_by_the_fixed_denominator():
    x1 = torch.tensor([3.0, 4.0, 0.0])  # norm 5: scaled to norm 1
    x2 = torch.tensor([0.0, 0.3, 0.4])  # norm 0.5: kept
    agg = ClipNoise(WeightedMean())
    agg.bound, agg.divisor, agg.std = 1.0, 4.0, 0.0
    out = agg(torch.empty(3), [x1, x2], [0.9, 0.1])  # the example weights are ignored: one client, one vote
    expected = (x1 / 5.0 + x2) / 4.0
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    assert agg.norms == pytest.approx([5.0, 0.5])
    assert torch.equal(x1, torch.tensor([3.0, 4.0, 0.0]))  # the inputs are never written


def test_clip_noise_adds_gaussian_noise_of_the_given_std():
    agg = ClipNoise(WeightedMean())
    agg.bound, agg.divisor, agg.std = 1.0, 2.0, 0.25
    agg.generator = torch.Generator().manual_seed(7)
    out = agg(torch.empty(200_000), [torch.zeros(200_000)], [1.0])
    expected = 0.25 * torch.randn(200_000, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, expected)
    assert float(out.std()) == pytest.approx(0.25, rel=0.01)


def _dp_strategy(**kw) -> tuple[DPFedAvg, nn.Module]:
    model = nn.Linear(4, 2)
    strategy = DPFedAvg(**kw)
    strategy.check_plan(num_clients=100, clients_per_round=4, rounds=10, sampling="poisson")
    strategy.setup(model)
    return strategy, model


def _replies(vectors: list[torch.Tensor]) -> list[Reply]:
    out = []
    for i, v in enumerate(vectors):
        out.append(
            Reply(i, {"weight": v[:8].reshape(2, 4).clone(), "bias": v[8:].clone()}, num_examples=10 + i)
        )
    return out


def test_dp_fedavg_update_is_clipped_sum_over_expected_clients_plus_noise_std_z_c_over_m():
    strategy, _ = _dp_strategy(clip_norm=0.5, noise_multiplier=1.3)
    before = strategy.strategy.global_flat.clone()
    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(10, generator=g) * s for s in (0.1, 1.0, 3.0)]
    torch.manual_seed(123)  # what FedLoop does from (seed, round) before the server side of a round
    metrics = strategy.aggregate(0, _replies(vectors))
    torch.manual_seed(123)
    noise_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    clipped = [v * min(1.0, 0.5 / float(v.norm())) for v in vectors]
    std = 1.3 * 0.5 / 4  # z * C / m, m = clients_per_round (expected clients of a Poisson round)
    expected = sum(clipped) / 4 + std * torch.randn(10, generator=noise_gen)
    # the flat layout is FedAvg's: the payload's names in state_dict order (weight, bias)
    torch.testing.assert_close(strategy.strategy.global_flat - before, expected, rtol=1e-5, atol=1e-6)
    assert metrics["dp_noise_std"] == pytest.approx(std)
    assert metrics["dp_clipped"] == pytest.approx(2 / 3)  # norms ~0.3, ~3, ~9 against 0.5


def test_adaptive_bound_follows_the_geometric_rule_of_andrew_et_al():
    strategy, _ = _dp_strategy(
        clip_norm=1.0, noise_multiplier=0.0, adaptive=True, target_quantile=0.5, clip_lr=0.2
    )
    norms = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    new = strategy.next_bound(norms, 3, torch.Generator())
    below = ((1 - 0.5) + 2 * (0 - 0.5)) / 3 + 0.5  # centred bits over m, no noise at z = 0
    assert new == pytest.approx(math.exp(-0.2 * (below - 0.5)))
    # with noise: the update's multiplier leaves the count its share, so both together cost z
    z, sigma_b = 1.0, 1.0
    z_upd = adaptive_noise_multiplier(z, sigma_b)
    assert z_upd**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)


def test_adaptive_bound_moves_toward_the_target_quantile_in_a_run(make_loop, small_dm):
    strategy = DPFedAvg(clip_norm=5.0, noise_multiplier=0.0, adaptive=True, target_quantile=0.5, clip_lr=0.5)
    res = make_loop(strategy=strategy, rounds=3).fit(seeded(MNIST1DMLP), small_dm)
    clips = [h["dp_clip"] for h in res.history]
    assert clips[0] == 5.0 and clips[1] < clips[0] and clips[2] < clips[1]  # every update was under 5: shrink


def test_dp_composes_with_a_robust_aggregator():
    strategy, _ = _dp_strategy(
        strategy=FedAvg(aggregator=CoordinateMedian()), clip_norm=1.0, noise_multiplier=0.0
    )
    before = strategy.strategy.global_flat.clone()
    vectors = [torch.full((10,), 10.0), torch.full((10,), 0.1), torch.full((10,), 0.2)]
    strategy.aggregate(0, _replies(vectors))
    clipped_first = 10.0 / math.sqrt(10 * 100.0)  # clipped to norm 1 before the median sees it
    median = sorted([clipped_first, 0.1, 0.2])[1]
    torch.testing.assert_close(strategy.strategy.global_flat - before, torch.full((10,), median * 3 / 4))


def test_local_dp_clips_the_whole_update_and_adds_noise():
    payload = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}  # norm 5 over both entries
    out, norm = clip_and_noise(payload, 1.0, 0.0, torch.Generator())
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(out["a"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(out["b"], torch.tensor([[0.8]]))
    big = {"a": torch.zeros(100_000)}
    noised, _ = clip_and_noise(big, 2.0, 0.5, torch.Generator().manual_seed(1))
    assert float(noised["a"].std()) == pytest.approx(0.5, rel=0.02)
    assert torch.equal(big["a"], torch.zeros(100_000))


# ---------------------------------------------------------------- accounting against Opacus called directly


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_accountant_matches_opacus_called_directly(kind):
    ours = PrivacyAccountant(kind)
    ours.step(1.1, 0.05, steps=30)
    ours.step(0.9, 0.05, steps=10)
    ref = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for _ in range(30):
        ref.step(noise_multiplier=1.1, sample_rate=0.05)
    for _ in range(10):
        ref.step(noise_multiplier=0.9, sample_rate=0.05)
    assert ours.epsilon(1e-5) == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)
    again = PrivacyAccountant(kind)
    again.load_state_dict(ours.state_dict())
    assert again.epsilon(1e-5) == ours.epsilon(1e-5)


def test_central_epsilon_every_round_matches_opacus(make_loop, small_dm):
    strategy = DPFedAvg(clip_norm=0.5, noise_multiplier=0.8)
    res = make_loop(strategy=strategy, num_clients=8, clients_per_round=3, rounds=3).fit(
        seeded(MNIST1DMLP), small_dm
    )
    ref = RDPAccountant()
    for h in res.history:
        ref.step(noise_multiplier=0.8, sample_rate=3 / 8)
        assert h["dp_epsilon"] == pytest.approx(ref.get_epsilon(delta=1 / 8**1.1), rel=1e-9)


def test_local_dp_reports_each_clients_epsilon_as_opacus_computes_it(make_loop, small_dm):
    cb = LocalDP(clip_norm=0.5, noise_multiplier=2.0, delta=1e-4)
    res = make_loop(callbacks=[cb], num_clients=2, clients_per_round=2, rounds=2).fit(
        seeded(MNIST1DMLP), small_dm
    )
    ref = RDPAccountant()
    for _ in range(2):  # both clients take part in both rounds: two releases each
        ref.step(noise_multiplier=1.0, sample_rate=1.0)  # sensitivity 2 C: multiplier z / 2
    assert res.history[-1]["ldp_releases"] == 2
    assert res.history[-1]["ldp_epsilon"] == pytest.approx(ref.get_epsilon(delta=1e-4), rel=1e-9)


def test_dp_sgd_reports_the_clients_epsilon_as_opacus_computes_it(make_loop, small_dm):
    cb = DPSGD(noise_multiplier=1.2, max_grad_norm=1.0, delta=1e-5)
    res = make_loop(callbacks=[cb], num_clients=2, clients_per_round=2, rounds=2).fit(
        seeded(MNIST1DMLP), small_dm
    )
    batches = math.ceil(400 / 32)  # 800 training records over 2 clients, batch 32
    ref = RDPAccountant()
    for _ in range(2 * batches):  # two rounds of one local epoch
        ref.step(noise_multiplier=1.2, sample_rate=1 / batches)
    assert res.history[-1]["dpsgd_epsilon"] == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)


# ---------------------------------------------------------------- budget and configuration


def test_target_epsilon_refuses_a_plan_that_would_exceed_it(make_loop):
    with pytest.raises(
        ValueError, match=r"DPFedAvg: target_epsilon=1.0 is not allowed with rounds=50.*rounds=\d+"
    ):
        make_loop(
            strategy=DPFedAvg(noise_multiplier=2.0, target_epsilon=1.0),
            num_clients=10,
            clients_per_round=5,
            rounds=50,
        )
    strategy = DPFedAvg(noise_multiplier=2.0, target_epsilon=1.0)
    with pytest.raises(ValueError) as err:
        make_loop(strategy=strategy, num_clients=10, clients_per_round=5, rounds=50)
    most = int(str(err.value).rsplit("at most rounds=", 1)[1].split()[0])
    assert strategy.planned_epsilon(most) <= 1.0 < strategy.planned_epsilon(most + 1)
    make_loop(
        strategy=DPFedAvg(noise_multiplier=2.0, target_epsilon=1.0),
        num_clients=10,
        clients_per_round=5,
        rounds=most,
    )  # accepted


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"noise_multiplier": -0.1}, "noise_multiplier=-0.1 is not allowed"),
        ({"delta": 1.0}, "delta=1.0 is not allowed"),
        ({"delta": 0.0}, "delta=0.0 is not allowed"),
        ({"clip_norm": 0.0}, "clip_norm=0.0 is not allowed"),
        ({"clip_norm": -1.0}, "clip_norm=-1.0 is not allowed"),
        ({"target_quantile": 0.0}, "target_quantile=0.0 is not allowed"),
        ({"target_quantile": 1.0}, "target_quantile=1.0 is not allowed"),
        ({"target_epsilon": 0.0}, "target_epsilon=0.0 is not allowed"),
        ({"accountant": "gdp"}, "accountant='gdp' is not allowed"),
        ({"strategy": "fedavg"}, "strategy='fedavg' is not allowed"),
    ],
)
def test_dp_fedavg_rejects_invalid_settings_naming_the_key(kw, match):
    with pytest.raises(ValueError, match=f"DPFedAvg: {match}"):
        DPFedAvg(**kw)


def test_adaptive_count_noise_too_small_for_the_budget_is_refused(make_loop):
    with pytest.raises(
        ValueError, match=r"DPFedAvg: count_std=0.1 is not allowed.*noise_multiplier / 2 = 0.5"
    ):
        make_loop(strategy=DPFedAvg(noise_multiplier=1.0, adaptive=True), num_clients=4, clients_per_round=2)


@pytest.mark.parametrize(
    ("cls", "kw", "match"),
    [
        (LocalDP, {"noise_multiplier": -1.0}, "LocalDP: noise_multiplier=-1.0"),
        (LocalDP, {"clip_norm": 0.0}, "LocalDP: clip_norm=0.0"),
        (LocalDP, {"delta": 1.5}, "LocalDP: delta=1.5"),
        (DPSGD, {"noise_multiplier": -1.0}, "DPSGD: noise_multiplier=-1.0"),
        (DPSGD, {"max_grad_norm": 0.0}, "DPSGD: max_grad_norm=0.0"),
        (DPSGD, {"delta": 1.0}, "DPSGD: delta=1.0"),
        (DPSGD, {"loss_reduction": "none"}, "DPSGD: loss_reduction='none'"),
    ],
)
def test_client_mechanisms_reject_invalid_settings_naming_the_key(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(**kw)


def test_poisson_sampling_is_seeded_and_has_the_expected_size():
    sizes = [len(sample_clients(0, r, 1000, 100, "poisson")) for r in range(50)]
    assert sample_clients(0, 3, 1000, 100, "poisson") == sample_clients(0, 3, 1000, 100, "poisson")
    assert len(set(sizes)) > 1 and 90 < sum(sizes) / len(sizes) < 110


# ---------------------------------------------------------------- DP-SGD through Opacus


class BatchNormModel(MNIST1DMLP):
    """An MNIST-1D MLP with a BatchNorm layer, which Opacus cannot train privately."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.norm(x.flatten(1)))


def test_batchnorm_is_refused_with_opacus_reason_at_start_up(make_loop, small_dm, tmp_path):
    loop = make_loop(callbacks=[DPSGD()], output_dir=str(tmp_path / "refused"))
    with pytest.raises(
        ValueError,
        match=r"DPSGD: the module cannot be trained with DP-SGD; Opacus says: .*BatchNorm "
        r"cannot support training with differential privacy.*fix=True",
    ):
        loop.fit(seeded(BatchNormModel), small_dm)


def test_batchnorm_is_converted_to_groupnorm_with_fix(make_loop, small_dm):
    model = seeded(BatchNormModel)
    res = make_loop(callbacks=[DPSGD(fix=True)], rounds=1).fit(model, small_dm)
    assert isinstance(model.norm, nn.GroupNorm)
    assert "dpsgd_epsilon" in res.history[-1]


def test_dp_sgd_clips_every_per_example_gradient(make_loop, small_dm):
    """No noise and a tiny per-example bound: a step moves the weights by at most lr * bound * batch / expected batch
    (Opacus divides the sum of clipped per-example gradients by the expected batch size, records // batches)."""
    bound, lr = 1e-4, 0.05
    model = seeded(MNIST1DCNN, channels=8, lr=lr, optimizer="sgd", momentum=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = make_loop(
        callbacks=[DPSGD(noise_multiplier=0.0, max_grad_norm=bound)],
        num_clients=2,
        clients_per_round=1,
        rounds=1,
    ).fit(model, small_dm)
    expected_batch = 400 // math.ceil(400 / 32)  # 400 records per client in 13 batches
    moved = math.sqrt(sum(float((model.state_dict()[k] - v).pow(2).sum()) for k, v in before.items()))
    assert 0 < moved <= lr * bound * 400 / expected_batch * (1 + 1e-4)
    assert "dpsgd_epsilon" not in res.history[-1]  # infinite without noise: not a finite reply metric
    unclipped = seeded(MNIST1DCNN, channels=8, lr=lr, optimizer="sgd", momentum=0.0)
    make_loop(num_clients=2, clients_per_round=1, rounds=1).fit(unclipped, small_dm)
    free = math.sqrt(sum(float((unclipped.state_dict()[k] - v).pow(2).sum()) for k, v in before.items()))
    assert free > 100 * moved  # without DPSGD the same run moves much further


def test_dp_sgd_works_under_a_plain_lightning_trainer(small_dm):
    import lightning as L

    cb = DPSGD(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
    model = seeded(MNIST1DMLP)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, small_dm)
    batches = math.ceil(800 / 32)
    ref = RDPAccountant()
    for _ in range(batches):
        ref.step(noise_multiplier=1.1, sample_rate=1 / batches)
    assert cb.last_epsilon == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_resumed_dp_run_reports_the_same_epsilon_and_bound(make_loop, small_dm, tmp_path):
    def loop(rounds, out):
        strategy = DPFedAvg(clip_norm=1.0, noise_multiplier=1.0, adaptive=True, count_std=1.0)
        return make_loop(strategy=strategy, rounds=rounds, checkpoint_every=1, output_dir=str(tmp_path / out))

    full = loop(3, "full").fit(seeded(MNIST1DMLP), small_dm)
    part = loop(1, "part").fit(seeded(MNIST1DMLP), small_dm)
    resumed = loop(3, "part").fit(seeded(MNIST1DMLP), small_dm, resume=str(part.run_dir))
    for key in ("dp_epsilon", "dp_clip", "dp_noise_std"):
        assert [h[key] for h in resumed.history] == [h[key] for h in full.history]
    assert resumed.history[-1]["dp_clip"] != 1.0
    assert resumed.final_metrics["test_acc"] == full.final_metrics["test_acc"]


def test_local_dp_target_epsilon_drops_a_client_whose_budget_is_spent(make_loop, small_dm):
    cb = LocalDP(clip_norm=0.5, noise_multiplier=4.0, delta=1e-5)
    one, two = cb.epsilon(1), cb.epsilon(2)
    limited = LocalDP(clip_norm=0.5, noise_multiplier=4.0, delta=1e-5, target_epsilon=(one + two) / 2)
    res = make_loop(callbacks=[limited], num_clients=2, clients_per_round=2, rounds=2).fit(
        seeded(MNIST1DMLP), small_dm
    )
    assert res.history[0]["good"] == 2 and res.history[0]["ldp_epsilon"] == pytest.approx(one)
    assert (
        res.history[1]["good"] == 0 and res.history[1]["skipped"] == 1
    )  # both spent: nothing more is released
