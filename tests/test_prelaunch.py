"""The command line starts a multi-process run's other ranks before its heavy imports (lightning_fed.prelaunch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_fed.prelaunch import planned_processes

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
