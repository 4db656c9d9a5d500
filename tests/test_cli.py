"""Recipes and the lightning-fed command: every recipe parses and runs one round; bad input fails clearly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_fed.cli import build_parser, run

# `fit` recipes; recipes/search/ holds `lightning-fed search` recipes (tests/test_search.py)
RECIPES = sorted(str(p) for p in (Path(__file__).parents[1] / "recipes").rglob("*.yaml") if p.parent.name != "search")
FEDAVG = next(r for r in RECIPES if r.endswith("mnist1d/fedavg.yaml"))
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
    if yaml.safe_load(Path(recipe).read_text())["loop"].get("devices", 1) > 1:  # the ranks re-run the command
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
        proc = subprocess.run([sys.executable, "-m", "lightning_fed.cli", "fit", "--config", recipe, *QUICK,
                               "--loop.output_dir", str(tmp_path)], env=env, capture_output=True, text=True,
                              check=False, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        (run_dir,) = tmp_path.glob("version_*")
        history = json.loads((run_dir / "history.json").read_text())
        assert len(history) == 1 and history[0]["good"] >= 1 and "rank1_busy_s" in history[0]
        return
    res = run(["fit", "--config", recipe, *QUICK, "--loop.output_dir", str(tmp_path)])
    assert len(res.history) == 1
    assert res.history[0]["good"] >= 1
    saved = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert saved["loop"]["rounds"] == 1  # the resolved config, with overrides, is saved with the outputs


def test_saved_config_reruns_and_resumes(tmp_path):
    recipe = FEDAVG
    args = ["--loop.num_clients", "4", "--loop.clients_per_round", "2", "--loop.local_epochs", "1",
            "--loop.checkpoint_every", "1", "--loop.output_dir", str(tmp_path)]
    res = run(["fit", "--config", recipe, *QUICK, *args])
    again = run(["fit", "--config", str(res.run_dir / "config.yaml"), "--loop.rounds", "2", "--resume", str(res.run_dir)])
    assert again.run_dir == res.run_dir and [h["round"] for h in again.history] == [1, 2]


def test_print_config(capsys):
    recipe = FEDAVG
    with pytest.raises(SystemExit) as e:
        run(["fit", "--config", recipe, "--loop.rounds", "7", "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["loop"]["rounds"] == 7 and printed["model"]["class_path"].endswith("MNIST1DCNN")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loop.roundz", "3"], "roundz"),
        (["--loop.partition.init_args.alpha", "0"], "command line: loop.partition.init_args.alpha: must be > 0"),
        (["--loop.clients_per_round", "50"], "clients_per_round=50"),
        (["--loop.precision", "4-bit"], "precision"),
        (["--model.init_args.optimizer", "rmsprop"], "model.init_args.optimizer: must be one of"),
    ],
)
def test_bad_configuration_names_the_key(extra, message, capsys):
    recipe = FEDAVG
    with pytest.raises(SystemExit) as e:
        run(["fit", "--config", recipe, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-fed: error: ") and message in err and "usage" not in err


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
    recipe = FEDAVG
    with pytest.raises(SystemExit) as e:
        run(["fit", "--config", recipe, "--loop.num_clients", "1000", "--loop.output_dir", str(tmp_path)])
    assert e.value.code == 2 and "min_samples=10" in capsys.readouterr().err


def _recipe(tmp_path, edit, name="x.yaml"):
    """The FedAvg recipe with ``edit`` applied to its parsed YAML, written to tmp_path/name."""
    recipe = yaml.safe_load(Path(FEDAVG).read_text())
    edit(recipe)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _set(*keys_value):
    *keys, value = keys_value

    def edit(recipe):
        node = recipe
        for k in keys[:-1]:
            node = node[k]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return edit


_DELETE = object()


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set("loop", "partition", "init_args", "alpha", 0), "loop.partition.init_args.alpha: must be > 0, got 0.0"),
        (_set("loop", "num_clients", "twenty"), "loop.num_clients: expected int, got 'twenty'"),
        (_set("loop", "roundz", 3), "loop.roundz: unknown key; did you mean loop.rounds?"),
        (_set("loop", "strategy", "init_args", "server_lrr", 1.0),
         "loop.strategy.init_args.server_lrr: unknown key; did you mean loop.strategy.init_args.server_lr?"),
        (_set("loop", "partition", "class_path", "lightning_fed.data.Dirichlett"),
         ("loop.partition.class_path: cannot use class_path 'lightning_fed.data.Dirichlett': module "
          "'lightning_fed.data' has no attribute 'Dirichlett'")),
        (_set("loop", "callbacks", 0, "init_args", "min_scale", 5),
         "loop.callbacks[0].init_args.min_scale: min_scale=5.0 is not allowed; min_scale must be in [0, 1]"),
        (_set("loop", "clients_per_round", 50), "loop.clients_per_round: clients_per_round=50 is not allowed"),
        (_set("loop", "partition", "dirichlet"),
         ("loop.partition: 'dirichlet' is not a Partition class: give a class name or its class_path; did you mean "
         "Dirichlet?\n")),
        (_set("loop", "strategy", "init_args", "aggregator", "krum"),
         ("loop.strategy.init_args.aggregator: 'krum' is not an Aggregator class: give a class name or its "
         "class_path; did you mean Krum?\n")),
        (_set("loop", "codec", "zzz"), "loop.codec: 'zzz' is not a Codec class: give a class name or its class_path\n"),
    ],
    ids=["constructor", "type", "unknown", "unknown-init-arg", "class_path", "list-item", "loop", "class-name",
         "nested-class-name", "no-such-class"],
)
def test_recipe_error_names_file_and_key(tmp_path, capsys, edit, message):
    path = _recipe(tmp_path, edit)
    with pytest.raises(SystemExit) as e:
        run(["fit", "--config", path, "--loop.output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err == f"lightning-fed: error: {path}: {message}\n" or err.startswith(f"lightning-fed: error: {path}: {message}")
    assert "Union" not in err and "usage" not in err and "NoneType" not in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_lightning_process_strategy_is_explained(tmp_path, capsys):
    """``--loop.strategy ddp`` (Lightning's strategies) says that processes are ``devices``."""
    with pytest.raises(SystemExit) as e:
        run(["fit", "--config", FEDAVG, "--loop.strategy", "ddp", "--loop.output_dir", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-fed: error: command line: loop.strategy: 'ddp' is not a Strategy class")
    assert "Lightning's process strategies" in err and "devices=N" in err and "did you mean" not in err
    assert not (tmp_path / "out").exists()


def test_missing_recipe_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(["fit", "--config", str(tmp_path / "nope.yaml")])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"lightning-fed: error: recipe '{tmp_path / 'nope.yaml'}' does not exist\n"


def test_console_script_error_has_no_usage_or_traceback(tmp_path):
    import subprocess
    import sys

    path = _recipe(tmp_path, _set("loop", "partition", "init_args", "alpha", 0))
    out = subprocess.run([sys.executable, "-m", "lightning_fed.cli", "fit", "--config", path], capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 2
    assert out.stderr == f"lightning-fed: error: {path}: loop.partition.init_args.alpha: must be > 0, got 0.0\n"
    assert "Traceback" not in out.stderr and "usage" not in out.stderr


def test_refused_resume_is_a_clean_error(tmp_path, capsys):
    recipe = FEDAVG
    args = ["--loop.num_clients", "4", "--loop.clients_per_round", "2", "--loop.local_epochs", "1",
            "--loop.checkpoint_every", "1", "--loop.output_dir", str(tmp_path), *QUICK]
    res = run(["fit", "--config", recipe, *args])
    before = {p: p.stat().st_mtime_ns for p in res.run_dir.rglob("*")}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(["fit", "--config", recipe, *args, "--loop.rounds", "2", "--loop.partition.init_args.alpha", "0.1",
             "--resume", "last"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("lightning-fed: error: cannot resume from ")
    assert "partition: Dirichlet(alpha=0.5, max_tries=1000, min_samples=10) in the checkpoint, " \
           "Dirichlet(alpha=0.1, max_tries=1000, min_samples=10) now" in err
    assert {p: p.stat().st_mtime_ns for p in res.run_dir.rglob("*")} == before
    with pytest.raises(SystemExit) as e:
        run(["fit", "--config", recipe, *QUICK, "--loop.output_dir", str(tmp_path / "empty"), "--resume", "last"])
    assert e.value.code == 2 and "no run with a checkpoint" in capsys.readouterr().err
