"""The command line starts a multi-process run's other ranks before its heavy imports (lightning_fed.prelaunch)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from lightning_fed.prelaunch import launch_command, planned_processes

ROOT = Path(__file__).parents[1]
TWO = str(ROOT / "recipes/mnist1d/fedavg_2proc.yaml")
ONE = str(ROOT / "recipes/mnist1d/fedavg.yaml")


@pytest.mark.parametrize(("argv", "expected"), [
    (["fit", "--config", TWO], 2),
    (["fit", f"--config={TWO}"], 2),
    (["fit", "--config", ONE], 1),
    (["fit", "--config", ONE, "--loop.devices", "3"], 3),
    (["fit", "--config", ONE, "--loop.devices=4", "--loop.rounds", "2"], 4),
    (["fit", "--loop.devices", "3", "--config", TWO], 2),  # the last setting wins, as in the parser
    (["fit", "--config", TWO, "--loop.num_nodes", "2"], None),  # several nodes: launched by torchrun / SLURM
    (["fit", "--config", TWO, "--loop", "{devices: 3}"], None),  # a whole section: left to the parser
    (["fit", "--config", "/no/such/recipe.yaml"], None),
    (["fit", "--config", TWO, "--loop.devices", "two"], None),
    (["fit", "--config"], None),
    (["--help"], None),
    ([], None),
])
def test_planned_processes_reads_the_recipe_and_the_overrides(argv, expected):
    assert planned_processes(argv) == expected


def test_a_bad_recipe_with_two_processes_fails_once_and_leaves_no_rank_behind(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "lightning_fed.cli", "fit", "--config", TWO, "--loop.rounds", "-1",
                           "--loop.output_dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 2
    assert "loop.rounds" in proc.stderr
    assert not list(tmp_path.iterdir())  # refused before anything was written
    leftover = subprocess.run(["pgrep", "-f", f"--loop.output_dir {tmp_path}"], capture_output=True, text=True, check=False)
    assert leftover.stdout.strip() == ""  # the early rank was stopped with the command


def test_a_script_starts_its_ranks_when_it_calls_fit(tmp_path):
    """Without the command line's early start, FedLoop.fit re-runs the script for the other rank (ranks.launch)."""
    script = tmp_path / "run.py"
    script.write_text(f"""
import lightning as L
from lightning_fed import FedLoop, MNIST1DDataModule
from lightning_fed.models import MNIST1DMLP

if __name__ == "__main__":
    L.seed_everything(0)
    loop = FedLoop(num_clients=4, clients_per_round=2, rounds=1, devices=2, verbose=False, plot=False, loggers=[],
                   checkpoint_every=0, output_dir={str(tmp_path / "runs")!r})
    loop.fit(MNIST1DMLP(), MNIST1DDataModule(batch_size=64))
""")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[rank: 1]" in proc.stderr  # the script ran a second time, as rank 1 (Lightning prefixes its output)
    assert len(list((tmp_path / "runs").glob("*/final.safetensors"))) == 1  # written by rank 0 only


@pytest.mark.parametrize("xdist", [False, True])
def test_a_session_with_no_command_to_re_run_is_refused_with_its_reason(monkeypatch, xdist):
    """`python -c` or a notebook has no command for the extra ranks; under pytest-xdist that is pytest's worker."""
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # no __file__, no __spec__
    if xdist:
        monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    else:
        monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    with pytest.raises(RuntimeError, match="would re-run pytest" if xdist else "an interactive session has none"):
        launch_command()


def test_a_script_is_re_run_as_it_was_started(monkeypatch, tmp_path):
    main = types.ModuleType("__main__")
    main.__file__ = str(tmp_path / "train.py")
    main.__spec__ = None
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")  # a script started from a test is not pytest
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "train.py"), "--lr", "0.1"])
    assert launch_command() == [sys.executable, str(tmp_path / "train.py"), "--lr", "0.1"]
