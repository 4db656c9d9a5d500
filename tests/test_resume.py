"""Checkpoint and resume: a run killed at any point and resumed ends with the same weights."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from lightning_fed.checkpoint import CheckpointError, find_checkpoint

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import lightning as L
    import torch
    from lightning_fed import FedLoop, FedCallback, MNIST1DDataModule, Dirichlet
    from lightning_fed.models import MNIST1DMLP

    out, kill_at, resume = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
    torch.set_num_threads(1)

    class Killer(FedCallback):
        def on_round_start(self, trainer, pl_module, instructions):
            if kill_at == f"start{trainer.fed.round}":
                os.kill(os.getpid(), signal.SIGKILL)
            self.second = instructions[1].client_id  # killed in the round's second client
        def on_client_start(self, trainer, pl_module, instruction):
            if kill_at == f"client{trainer.fed.round}" and instruction.client_id == self.second:
                os.kill(os.getpid(), signal.SIGKILL)

    L.seed_everything(0, verbose=False)
    loop = FedLoop(num_clients=4, clients_per_round=2, rounds=5, local_epochs=1, partition=Dirichlet(1.0),
                   output_dir=out, verbose=False, plot=False, loggers=["csv"], checkpoint_every=1,
                   keep_optimizer_state=True, callbacks=[Killer()])
    loop.fit(MNIST1DMLP(optimizer="adam", lr=0.01), MNIST1DDataModule(batch_size=32, num_samples=1000), resume=resume)
    """
)


def _run(tmp_path, out, kill_at, resume=None):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    args = [sys.executable, str(script), str(out), kill_at] + ([resume] if resume else [])
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, check=False)  # killed on purpose


@pytest.mark.parametrize("kill_at", ["start3", "client2"])
def test_killed_run_resumes_to_identical_weights(tmp_path, kill_at):
    ref = _run(tmp_path, tmp_path / "ref", "never")
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = _run(tmp_path, tmp_path / "killed", kill_at)
    assert killed.returncode == -signal.SIGKILL
    run_dir = tmp_path / "killed" / "version_0"
    assert not (run_dir / "final.safetensors").exists()
    resumed = _run(tmp_path, tmp_path / "killed", "never", resume=str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "ref" / "version_0" / "final.safetensors")
    b = load_file(run_dir / "final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    import json

    ha = json.loads((tmp_path / "ref" / "version_0" / "history.json").read_text())
    hb = json.loads((run_dir / "history.json").read_text())
    assert [h["round"] for h in hb] == [1, 2, 3, 4, 5]
    assert [h["test_acc"] for h in ha] == [h["test_acc"] for h in hb]


def test_resume_last_and_partial_checkpoints(tmp_path, make_loop, small_dm):
    from conftest import seeded

    from lightning_fed.models import MNIST1DMLP

    loop = make_loop(rounds=2, checkpoint_every=1, keep_checkpoints=1, output_dir=str(tmp_path / "o"))
    res = loop.fit(seeded(MNIST1DMLP), small_dm)
    ckpts = sorted(p.name for p in (res.run_dir / "checkpoints").iterdir())
    assert ckpts == ["last", "round-000002"]  # older checkpoints pruned, keep_checkpoints=1
    # a half-written checkpoint left by a crash is never picked up
    (res.run_dir / "checkpoints" / "round-000003.partial").mkdir()
    assert find_checkpoint(res.run_dir).name == "round-000002"
    more = make_loop(rounds=3, checkpoint_every=1, output_dir=str(tmp_path / "o"))
    res2 = more.fit(seeded(MNIST1DMLP), small_dm, resume="last")
    assert res2.run_dir == res.run_dir and [h["round"] for h in res2.history] == [1, 2, 3]


def test_resume_errors(tmp_path, make_loop, small_dm):
    from conftest import seeded

    from lightning_fed.models import MNIST1DMLP

    with pytest.raises(CheckpointError, match="no checkpoint found"):
        make_loop().fit(seeded(MNIST1DMLP), small_dm, resume=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no run with a checkpoint"):
        make_loop(output_dir=str(tmp_path / "empty")).fit(seeded(MNIST1DMLP), small_dm, resume="last")
    res = make_loop(rounds=1, checkpoint_every=1, output_dir=str(tmp_path / "p")).fit(seeded(MNIST1DMLP), small_dm)
    with pytest.raises(ValueError, match="num_clients=4, seed=0; this run has num_clients=4, seed=7"):
        make_loop(rounds=2, seed=7, output_dir=str(tmp_path / "p")).fit(seeded(MNIST1DMLP), small_dm, resume=res.run_dir)
