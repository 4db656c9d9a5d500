"""Recipes and the lightning-fed command: every recipe parses and runs one round; bad input fails clearly."""

from pathlib import Path

import pytest
import yaml

from lightning_fed.cli import build_parser, run

RECIPES = sorted(str(p) for p in (Path(__file__).parents[1] / "recipes").rglob("*.yaml"))
QUICK = ["--loop.rounds", "1", "--loop.verbose", "false", "--loop.plot", "false", "--loop.eval_every", "1"]


def test_there_are_recipes():
    assert any(r.endswith("mnist1d/fedavg.yaml") for r in RECIPES)
    assert any(r.endswith("mnist1d/centralized.yaml") for r in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: Path(p).relative_to(Path(p).parents[1]).as_posix())
def test_recipe_parses(recipe):
    cfg = build_parser().parse_args(["fit", "--config", recipe])
    assert cfg.fit.loop.rounds >= 1


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: Path(p).relative_to(Path(p).parents[1]).as_posix())
def test_recipe_runs_one_round(recipe, tmp_path):
    res = run(["fit", "--config", recipe, *QUICK, "--loop.output_dir", str(tmp_path)])
    assert len(res.history) == 1
    assert res.history[0]["good"] >= 1
    saved = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert saved["loop"]["rounds"] == 1  # the resolved config, with overrides, is saved with the outputs


def test_saved_config_reruns_and_resumes(tmp_path):
    recipe = next(r for r in RECIPES if r.endswith("mnist1d/fedavg.yaml"))
    args = ["--loop.num_clients", "4", "--loop.clients_per_round", "2", "--loop.local_epochs", "1",
            "--loop.checkpoint_every", "1", "--loop.output_dir", str(tmp_path)]
    res = run(["fit", "--config", recipe, *QUICK, *args])
    again = run(["fit", "--config", str(res.run_dir / "config.yaml"), "--loop.rounds", "2", "--resume", str(res.run_dir)])
    assert again.run_dir == res.run_dir and [h["round"] for h in again.history] == [1, 2]


def test_print_config(capsys):
    recipe = next(r for r in RECIPES if r.endswith("mnist1d/fedavg.yaml"))
    with pytest.raises(SystemExit) as e:
        run(["fit", "--config", recipe, "--loop.rounds", "7", "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["loop"]["rounds"] == 7 and printed["model"]["class_path"].endswith("MNIST1DCNN")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loop.roundz", "3"], "roundz"),
        (["--loop.partition.init_args.alpha", "0"], "alpha must be > 0"),
        (["--loop.clients_per_round", "50"], "clients_per_round=50"),
        (["--loop.precision", "4-bit"], "precision"),
        (["--model.init_args.optimizer", "rmsprop"], "optimizer must be one of"),
    ],
)
def test_bad_configuration_names_the_key(extra, message, capsys):
    recipe = next(r for r in RECIPES if r.endswith("mnist1d/fedavg.yaml"))
    with pytest.raises(SystemExit) as e:
        run(["fit", "--config", recipe, *extra])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_and_malformed_recipe(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(tmp_path / "nope.yaml")])
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("loop: [unclosed\n")
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(bad)])
    assert "error" in capsys.readouterr().err.lower()


def test_impossible_partition_is_a_clean_error(tmp_path, capsys):
    recipe = next(r for r in RECIPES if r.endswith("mnist1d/fedavg.yaml"))
    with pytest.raises(SystemExit) as e:
        run(["fit", "--config", recipe, "--loop.num_clients", "1000", "--loop.output_dir", str(tmp_path)])
    assert e.value.code == 2 and "min_samples=10" in capsys.readouterr().err
