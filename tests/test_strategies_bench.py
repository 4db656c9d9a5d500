"""The measures of benchmarks/strategies.py against hand computations: a final accuracy is the mean of the last
evaluations, and "rounds to FedAvg" is the first round whose trailing mean reaches the target, measured the same way
for every strategy."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("strategies")


def test_trailing_mean_by_hand(bench):
    accs = [0.1, 0.4, 0.7, 0.2]
    assert bench.trailing_mean(accs, 3) == pytest.approx([0.1, 0.25, 0.4, 13 / 30])
    assert bench.trailing_mean(accs, 1) == accs
    assert bench.final_acc(accs, 3) == pytest.approx(13 / 30)
    assert bench.final_acc(accs, 1) == 0.2


def test_one_lucky_evaluation_does_not_reach_the_target(bench):
    fedavg = [0.5, 0.8, 0.82, 0.84]  # final (last 3): 0.82
    spike = [0.5, 0.9, 0.6, 0.7, 0.85, 0.9, 0.8]  # a single 0.9 in round 2
    target = bench.final_acc(fedavg, 3)
    # trailing means from round 3: 0.667, 0.733, 0.717, 0.817, 0.85
    assert bench.rounds_to(spike, target, 3) == 7
    assert bench.rounds_to(spike, target, 1) == 2  # the single-evaluation measure counts the spike
    assert bench.rounds_to(fedavg, target, 3) == 4  # FedAvg reaches its own final accuracy at its last round
    assert bench.rounds_to([0.1, 0.2], 0.9, 3) is None


@pytest.fixture(scope="module")
def grid(bench):
    import sys

    sys.modules.setdefault("strategies", bench)  # strategies_grid imports the benchmark as a sibling module
    return load_benchmark("strategies_grid")


def test_grid_selection_by_family_and_label(grid):
    assert grid.selected("fedavgm s1 m0.7", None, None)
    assert grid.selected("fedavgm s1 m0.7", ["fedavgm"], ["fedavgm s1 m0.7"])
    assert not grid.selected("fedavgm s1 m0.9", None, ["fedavgm s1 m0.7"])
    assert not grid.selected("fedadam s0.1 t1e-2", ["fedavgm"], None)
    with pytest.raises(SystemExit):  # a label outside the grid is refused before anything runs
        grid.main(["--labels", "fedavgm s9 m0.1"])


def test_budget_verdict_by_hand(grid):
    fedavg = {"strategy": "fedavg lr0.1", "acc": [0.5] * 27 + [0.8, 0.84, 0.86]}  # final (last 3): 0.8333
    target = grid.final_acc(grid.reference([fedavg, {"strategy": "fedavg lr0.05", "acc": [0.7] * 30}])["acc"])
    assert target == pytest.approx(2.5 / 3)
    half = {"strategy": "fedavgm s1 m0.7", "acc": [0.5] * 12 + [0.83, 0.84, 0.84]}  # 15 rounds, final 0.8367
    low = {
        "strategy": "fedadam s0.1 t1e-2",
        "acc": [0.5] * 12 + [0.9, 0.8, 0.78],
    }  # best single, final 0.8267
    best, met = grid.budget_verdict([fedavg, half, low], target, 30)
    assert best is half and met
    best, met = grid.budget_verdict([low], target, 30)  # one lucky evaluation does not count
    assert best is low and not met
    long = {"strategy": "fedavgm s1 m0.7", "acc": [0.5] * 14 + [0.83, 0.84, 0.84]}  # 17 rounds: over half
    assert grid.budget_verdict([long], target, 30) == (long, False)
    assert grid.budget_verdict([fedavg], target, 30) == (None, False)  # FedAvg is not a server-side strategy


@pytest.mark.parametrize("recipe", ["fedavg", "fedavgm", "fedadam", "fedyogi"])
def test_constant_lr_drops_the_client_lr_decay(grid, recipe):
    from lightning_fed.callbacks import RoundLRDecay
    from lightning_fed.cli import load_recipe

    argv = ["fit", "--config", str(ROOT / "recipes" / "mnist1d" / f"{recipe}.yaml")]
    assert any(isinstance(c, RoundLRDecay) for c in load_recipe(argv).loop.callbacks)
    assert not any(isinstance(c, RoundLRDecay) for c in load_recipe([*argv, *grid.NO_DECAY]).loop.callbacks)


def test_every_grid_configuration_parses_to_what_its_label_says(grid):
    """Each grid row's recipe and CLI arguments build (jsonargparse), with the label's settings applied."""
    from lightning_fed.cli import load_recipe
    from lightning_fed.strategies import FedDyn, FedExP, Scaffold

    built = {}
    for label, recipe, more in grid.GRID:
        built[label] = load_recipe(["fit", "--config", str(ROOT / "recipes" / "mnist1d" / f"{recipe}.yaml"), *more])
    assert len(built) == len(grid.GRID)  # labels are unique
    sc = built["scaffold lr0.05 m0.9"]
    assert isinstance(sc.loop.strategy, Scaffold) and (sc.model.hparams.lr, sc.model.hparams.momentum) == (0.05, 0.9)
    assert built["scaffold lr0.2"].model.hparams.momentum == 0.0
    ex = built["fedexp lr0.05 avg"]
    assert isinstance(ex.loop.strategy, FedExP) and ex.loop.strategy.average_last
    assert built["fedexp lr0.1"].model.hparams.lr == 0.1 and not built["fedexp lr0.1"].loop.strategy.average_last
    assert built["fedyogi s0.03 t1e-2"].loop.strategy.server_optimizer.tau == 0.01
    assert type(built["fedexp lr0.05 uniform"].loop.strategy.aggregator).__name__ == "UniformMean"
    assert not any(built[k].loop.strategy.average_last for k in built if k.startswith("fedexp") and "avg" not in k)
    dyn = built["feddyn a0.001 lr0.1"]
    assert isinstance(dyn.loop.strategy, FedDyn) and dyn.loop.strategy.alpha == 0.001 and dyn.model.hparams.lr == 0.1
    assert (built["feddyn a0.1 lr0.05"].loop.strategy.alpha, built["feddyn a0.1 lr0.05"].model.hparams.lr) == (0.1, 0.05)
    assert grid.family("feddyn a0.01 lr0.05") in grid.SERVER_SIDE
    assert built["feddyn a0.01 lr0.05 mean"].loop.strategy.evaluate_mean
    assert not any(built[k].loop.strategy.evaluate_mean for k in built if k.startswith("feddyn") and "mean" not in k)


def test_fedavg_avg_rows_are_fedavg_steps(grid):
    """The "fedavg ... avg" rows run FedExP with an eps so large that its step is always FedAvg's 1."""
    from lightning_fed.cli import load_recipe
    from lightning_fed.strategies.fedexp import fedexp_step

    label, recipe, more = next(g for g in grid.GRID if g[0] == "fedavg lr0.1 avg")
    strategy = load_recipe(["fit", "--config", str(ROOT / "recipes" / "mnist1d" / f"{recipe}.yaml"), *more]).loop.strategy
    assert strategy.average_last and grid.family(label) == "fedavg"
    assert fedexp_step([1e3, 1e3], [0.5, 0.5], 0.0, strategy.eps) == 1.0  # deltas of norm ~30 and opposite


def test_feddf_grid_rows_are_one_architecture_feddf_and_server_side(grid):
    """The FedDF rows build FedDF without tiers on fedavg.yaml's clients, with the label's distillation steps, client
    learning rate and server momentum; their family counts as server-side in the verdicts, FedAvg's does not."""
    from lightning_fed.cli import load_recipe
    from lightning_fed.strategies import FedDF, ServerMomentum, ServerSGD

    rows = {label: (recipe, more) for label, recipe, more in grid.GRID if grid.family(label) == "feddf"}
    assert len(rows) >= 4
    fedavg = load_recipe(["fit", "--config", str(ROOT / "recipes" / "mnist1d" / "fedavg.yaml")])
    for label, (recipe, more) in rows.items():
        built = load_recipe(["fit", "--config", str(ROOT / "recipes" / "mnist1d" / f"{recipe}.yaml"), *more])
        s = built.loop.strategy
        assert isinstance(s, FedDF) and s.tiers is None and s.temperature == 1.0 and s.proxy_size == 1000
        words = label.split()
        assert f"d{s.distill_steps}" in words and f"dlr{s.distill_lr:.0e}".replace("e-0", "e-") in words
        lr = next((float(w[2:]) for w in words if w.startswith("lr")), fedavg.model.hparams.lr)
        assert built.model.hparams.lr == lr and built.model.hparams.momentum == fedavg.model.hparams.momentum
        if "m0.7" in words:
            assert isinstance(s.server_optimizer, ServerMomentum) and s.server_optimizer.momentum == 0.7
        else:
            assert isinstance(s.server_optimizer, ServerSGD) and s.server_optimizer.lr == 1.0
    fedavg_row = {"strategy": "fedavg lr0.1", "acc": [0.5] * 5 + [0.8] * 3}  # 8 rounds, final 0.8
    feddf_row = {"strategy": next(iter(rows)), "acc": [0.5, 0.85, 0.85, 0.85]}  # 4 rounds, final 0.85
    assert grid.budget_verdict([fedavg_row, feddf_row], 0.8, 8) == (feddf_row, True)
    assert grid.budget_verdict([fedavg_row], 0.8, 8) == (None, False)


def test_feddf_server_cost_times_the_distilling_step(capsys):
    """benchmarks/feddf_server_cost.py runs FedDF's real server step (teacher logits, average, distillation) and
    prints one row per distillation setting beside FedAvg's."""
    cost = load_benchmark("feddf_server_cost")
    from lightning_fed.data import PublicData
    from lightning_fed.strategies import FedDF

    s = FedDF(public=PublicData(num_samples=50, seed=7), proxy_size=50, distill_steps=2)
    assert cost.server_seconds(s, clients=2, rounds=1) > 0
    assert s.last_routes == [("ensemble", "tier0")]  # the one architecture was distilled from the ensemble
    cost.main(["--distill_steps", "1", "--clients", "2", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "FedAvg" in out and "FedDF, 1 distillation steps" in out


def test_fedrs_grid_rows_parse_to_their_alpha_and_client_lr(grid):
    """The FedRS rows build FedRS with the label's alpha and client learning rate; their family is server-side."""
    from lightning_fed.cli import load_recipe
    from lightning_fed.strategies import FedRS

    rows = {label: (recipe, more) for label, recipe, more in grid.GRID if grid.family(label) == "fedrs"}
    assert len(rows) == 4 and "fedrs" in grid.GRID_SERVER_SIDE
    for label, (recipe, more) in rows.items():
        cfg = load_recipe(["fit", "--config", str(ROOT / "recipes" / "mnist1d" / f"{recipe}.yaml"), *more])
        _, a, lr = label.split()
        assert isinstance(cfg.loop.strategy, FedRS) and cfg.loop.strategy.alpha == float(a[1:])
        assert cfg.loop.strategy.client.alpha == float(a[1:]) and cfg.model.hparams.lr == float(lr[2:])


def test_fedacg_grid_rows_parse_to_their_lambda_beta_and_client_lr(grid):
    """The FedACG rows build FedProx (mu = beta) with Nesterov server momentum (lambda), lr 1; their family is
    server-side; the recipe is the paper's lambda with the rows' best beta."""
    from lightning_fed.cli import load_recipe
    from lightning_fed.strategies import FedProx, ServerMomentum

    rows = {label: (recipe, more) for label, recipe, more in grid.GRID if grid.family(label) == "fedacg"}
    assert len(rows) == 8 and "fedacg" in grid.GRID_SERVER_SIDE
    for label, (recipe, more) in rows.items():
        cfg = load_recipe(["fit", "--config", str(ROOT / "recipes" / "mnist1d" / f"{recipe}.yaml"), *more])
        words = label.split()
        s, opt = cfg.loop.strategy, cfg.loop.strategy.server_optimizer
        assert isinstance(s, FedProx) and isinstance(opt, ServerMomentum) and opt.nesterov and opt.lr == 1.0
        assert opt.momentum == float(words[1][1:]) and s.mu == s.client.mu == float(words[2][1:])
        lr = next((float(w[2:]) for w in words if w.startswith("lr")), 0.05)
        assert cfg.model.hparams.lr == lr and cfg.model.hparams.momentum == 0.9
    recipe = load_recipe(["fit", "--config", str(ROOT / "recipes" / "mnist1d" / "fedacg.yaml")]).loop.strategy
    assert (recipe.mu, recipe.server_optimizer.momentum) == (0.1, 0.85)


def test_fedntd_grid_rows_parse_to_their_beta_temperature_and_client_lr(grid):
    """The FedNTD rows build FedNTD with the label's beta, temperature and client learning rate (clients included);
    their family is server-side; the recipe is the paper's beta 1 and temperature 1."""
    from lightning_fed.cli import load_recipe
    from lightning_fed.strategies import FedNTD

    rows = {label: (recipe, more) for label, recipe, more in grid.GRID if grid.family(label) == "fedntd"}
    assert len(rows) == 5 and "fedntd" in grid.GRID_SERVER_SIDE
    for label, (recipe, more) in rows.items():
        cfg = load_recipe(["fit", "--config", str(ROOT / "recipes" / "mnist1d" / f"{recipe}.yaml"), *more])
        words = label.split()
        s = cfg.loop.strategy
        assert isinstance(s, FedNTD) and (s.beta, s.temperature) == (float(words[1][1:]), float(words[2][1:]))
        assert (s.client.beta, s.client.temperature) == (s.beta, s.temperature)
        lr = next((float(w[2:]) for w in words if w.startswith("lr")), 0.05)
        assert cfg.model.hparams.lr == lr and cfg.model.hparams.momentum == 0.9
    recipe = load_recipe(["fit", "--config", str(ROOT / "recipes" / "mnist1d" / "fedntd.yaml")]).loop.strategy
    assert (recipe.beta, recipe.temperature) == (1.0, 1.0)


def test_ccvr_grid_rows_calibrate_their_strategy_row_and_are_judged_on_the_calibrated_model(grid):
    """Each "ccvr <row>" builds that row's strategy and client learning rate with CCVR on the loop; its family is
    server-side and not FedAvg's (a calibrated FedAvg never sets the target); the grid judges it on the calibrated
    accuracies and keeps the plain ones."""
    from lightning_fed.calibration import CCVR
    from lightning_fed.cli import load_recipe

    rows = {label: (recipe, more) for label, recipe, more in grid.GRID if grid.family(label) == "ccvr"}
    assert len(rows) == 3 and "ccvr" in grid.GRID_SERVER_SIDE
    plain = {label: (recipe, more) for label, recipe, more in grid.GRID}
    for label, (recipe, more) in rows.items():
        cfg = load_recipe(["fit", "--config", str(ROOT / "recipes" / "mnist1d" / f"{recipe}.yaml"), *more])
        base = plain[label.removeprefix("ccvr ")]
        ref = load_recipe(["fit", "--config", str(ROOT / "recipes" / "mnist1d" / f"{base[0]}.yaml"), *base[1]])
        assert isinstance(cfg.loop.calibration, CCVR) and ref.loop.calibration is None
        assert type(cfg.loop.strategy) is type(ref.loop.strategy) and cfg.model.hparams.lr == ref.model.hparams.lr
    row = {"acc": [0.5, 0.6], "acc_calibrated": [0.7, 0.8]}
    assert grid.judged("ccvr fedavg lr0.05", row)["acc"] == [0.7, 0.8]
    assert grid.judged("ccvr fedavg lr0.05", row)["acc_plain"] == [0.5, 0.6]
    assert grid.judged("fedavg lr0.05", row)["acc"] == [0.5, 0.6]
    with pytest.raises(SystemExit, match="no ccvr/test_acc"):
        grid.judged("ccvr fedavg lr0.05", {"acc": [0.5]})
    assert grid.reference([{"strategy": "fedavg lr0.05", "acc": [0.5] * 3},
                           {"strategy": "ccvr fedavg lr0.05", "acc": [0.9] * 3}])["strategy"] == "fedavg lr0.05"


def test_a_calibrated_row_is_scored_on_the_calibrated_model(bench):
    """``fedntd_ccvr`` is a server-side row of the strategy benchmark, judged on the calibrated global model."""
    assert "fedntd_ccvr" in bench.SERVER_SIDE and "fedntd_ccvr" in bench.STRATEGIES
    assert bench.scored({"acc": [0.5], "acc_calibrated": [0.8]}) == [0.8]
    assert bench.scored({"acc": [0.5]}) == [0.5]
