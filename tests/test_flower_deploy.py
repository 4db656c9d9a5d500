"""A real Flower deployment on localhost: a SuperLink and three SuperNodes as separate processes (insecure mode),
the recipe's app started with ``flwr run``; one SuperNode is killed in the middle of round 2. Round 1 ends with
the same global weights as ``lightning-fed fit``; round 2 aggregates the two replies that came once the round's
timeout has passed (the missing client is logged) and the run finishes.

Each ClientApp message starts a ``flwr-clientapp`` process (Flower's design), so this test takes minutes on a
small CPU; the round timeout is generous so that a slow but live node is never dropped."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from lightning_fed.cli import run
from lightning_fed.flower.command import main as flower_main
from lightning_fed.flower.local import LocalDeployment

ROOT = Path(__file__).parents[1]
ROUND_TIMEOUT_S = 150
ARGS = [
    "--config",
    str(ROOT / "recipes" / "mnist1d" / "fedavg.yaml"),
    "--loop.num_clients",
    "3",
    "--loop.clients_per_round",
    "3",
    "--loop.rounds",
    "2",
    "--loop.local_epochs",
    "1",
    "--loop.eval_every",
    "2",
    "--loop.checkpoint_every",
    "1",
    "--loop.verbose",
    "false",
    "--loop.plot",
    "false",
    "--loop.loggers",
    "[]",
    "--data.init_args.num_samples",
    "1000",
]


@pytest.mark.timeout(900)
def test_superlink_and_supernodes_on_localhost_survive_a_killed_node(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "runs"
    flower_main(
        [
            *ARGS,
            "--loop.output_dir",
            str(out),
            "--app-dir",
            str(tmp_path / "app"),
            "--round-timeout",
            str(ROUND_TIMEOUT_S),
            "--connect-timeout",
            "300",
        ]
    )
    with LocalDeployment(num_nodes=3, workdir=tmp_path / "deploy") as dep:
        flwr = dep.start_run(tmp_path / "app")
        victim, killed = dep.log("node2"), False
        deadline = time.monotonic() + 840
        while flwr.poll() is None and time.monotonic() < deadline:
            if not killed and victim.read_text().count("Receiving: train.lightning_fed") >= 2:
                dep.kill(dep.nodes[2])  # the node and its ClientApp die in the middle of round 2
                killed = True
            time.sleep(0.5)
        log = dep.log("flwr").read_text()
        assert flwr.poll() == 0, f"flwr run did not finish: {log[-3000:]}"
    assert killed, "round 2 never reached the third node"
    (run_dir,) = sorted(out.glob("version_*"))
    history = json.loads((run_dir / "history.json").read_text())
    assert [(h["round"], h["good"], h["failed"]) for h in history] == [(1, 3, 0), (2, 2, 1)]
    assert "round 2: client 2" in log and ("no reply from node" in log or "Flower error" in log)
    assert (run_dir / "final.safetensors").is_file()
    # round 1 (every node alive) ends with the same global weights as the one-process run
    fit = run(["fit", *ARGS, "--loop.output_dir", str(tmp_path / "fit")]).run_dir

    def round1(d: Path) -> dict[str, torch.Tensor]:
        return torch.load(d / "checkpoints" / "round-000001" / "state.pt", weights_only=True)["model"]

    ours, theirs = round1(fit), round1(run_dir)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
