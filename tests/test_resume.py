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
from lightning_fed.report import without_wall_clock

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
    assert without_wall_clock(ha) == without_wall_clock(hb)  # every round metric but the measured seconds
    assert "test_acc" in hb[-1]  # the final test after the last round


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
    with pytest.raises(CheckpointError, match="no run with a checkpoint"):
        make_loop(output_dir=str(tmp_path / "empty")).fit(seeded(MNIST1DMLP), small_dm, resume="last")
    assert not (tmp_path / "empty").exists()


def _files(run_dir):
    """Every file of a run folder with its size and mtime: what a refused resume must leave alone."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*"))}


@pytest.fixture
def one_round_run(tmp_path, make_loop, small_dm):
    """A finished 1-round run (checkpointed, csv logs) and the loop settings that made it."""
    from conftest import seeded

    from lightning_fed.data import Dirichlet
    from lightning_fed.models import MNIST1DMLP

    settings = {"rounds": 1, "checkpoint_every": 1, "partition": Dirichlet(alpha=0.5, min_samples=5),
                "loggers": ["csv"], "output_dir": str(tmp_path / "p")}
    res = make_loop(**settings).fit(seeded(MNIST1DMLP), small_dm, run_config="loop: {}\n")
    return res.run_dir, settings


@pytest.mark.parametrize(
    "change, model_kw, message",
    [
        ({"partition": "alpha0.1"}, {}, (r"partition: Dirichlet\(alpha=0.5, max_tries=1000, min_samples=5\) in the "
                                          r"checkpoint, Dirichlet\(alpha=0.1, max_tries=1000, min_samples=5\) now")),
        ({"num_clients": 5}, {}, "num_clients: 4 in the checkpoint, 5 now"),
        ({"seed": 7}, {}, "seed: 0 in the checkpoint, 7 now"),
        ({"strategy": "lr0.5"}, {}, (r"strategy: FedAvg\(aggregator=WeightedMean\(\), server_lr=1.0, "
                                     r"server_optimizer=ServerSGD\(lr=1.0\)\) in the checkpoint, FedAvg\(aggregator="
                                     r"WeightedMean\(\), server_lr=0.5, server_optimizer=ServerSGD\(lr=0.5\)\) now")),
        ({"codec": "topk"}, {}, r"codec: Identity\(\) in the checkpoint, TopK\(.*ratio=0.1.*\) now"),
        ({"downlink_codec": "fp16"}, {}, r"downlink_codec: Identity\(\) in the checkpoint, Cast\(dtype='fp16'"),
        ({"local_epochs": 2}, {}, "local_epochs: 1 in the checkpoint, 2 now"),
        ({}, {"hidden": 50}, (r"model: MNIST1DMLP has a different state_dict: \S+ \(100, 40\) float32 in the "
                              r"checkpoint, \(50, 40\) float32 now")),
    ],
)
def test_resume_refuses_a_mismatch_before_writing(one_round_run, make_loop, small_dm, change, model_kw, message):
    from conftest import seeded

    from lightning_fed.codecs import Cast, TopK
    from lightning_fed.data import Dirichlet
    from lightning_fed.identity import ResumeMismatch
    from lightning_fed.models import MNIST1DMLP
    from lightning_fed.strategies import FedAvg

    run_dir, settings = one_round_run
    objects = {"alpha0.1": Dirichlet(alpha=0.1, min_samples=5), "lr0.5": FedAvg(server_lr=0.5), "topk": TopK(0.1),
               "fp16": Cast("fp16")}
    kw = dict(settings, rounds=3, **{k: objects.get(v, v) for k, v in change.items()})
    if "num_clients" in change:
        kw["clients_per_round"] = 2
    before = _files(run_dir)
    with pytest.raises(ResumeMismatch, match=message) as info:
        make_loop(**kw).fit(seeded(MNIST1DMLP, **model_kw), small_dm, resume=str(run_dir), run_config="x: 1\n")
    assert isinstance(info.value, ValueError) and "may change on resume" in str(info.value)
    assert _files(run_dir) == before  # config.yaml, partition.csv, logs, checkpoints untouched


def test_resume_names_every_difference(one_round_run, make_loop, small_dm):
    from conftest import seeded

    from lightning_fed.identity import ResumeMismatch
    from lightning_fed.models import MNIST1DMLP

    _, settings = one_round_run
    with pytest.raises(ResumeMismatch) as info:
        make_loop(**dict(settings, seed=3, partition=None)).fit(seeded(MNIST1DMLP), small_dm, resume="last")
    lines = str(info.value).splitlines()
    assert any(line.strip().startswith("seed: 0 in the checkpoint, 3 now") for line in lines)
    assert any(line.strip().startswith("partition: Dirichlet(alpha=0.5") and "IID(min_samples=1) now" in line
               for line in lines)


def test_resume_may_change_horizon_and_bookkeeping(one_round_run, make_loop, small_dm, tmp_path):
    from conftest import seeded

    from lightning_fed.data import Dirichlet
    from lightning_fed.models import MNIST1DMLP

    run_dir, settings = one_round_run
    kw = dict(settings, partition=Dirichlet(alpha=0.5 * 2 / 2, min_samples=5), rounds=2, eval_every=2,
              checkpoint_every=2, keep_checkpoints=3, loggers=[], min_clients=2, max_update_abs=1e6, verbose=False)
    res = make_loop(**kw).fit(seeded(MNIST1DMLP), small_dm, resume=str(run_dir))
    assert res.run_dir == run_dir and [h["round"] for h in res.history] == [1, 2]


def test_identity_ignores_state_and_number_types():
    from lightning_fed.codecs import Sign, TopK
    from lightning_fed.data import Dirichlet
    from lightning_fed.identity import describe, identity_differences, render

    assert identity_differences({"partition": describe(Dirichlet(1))}, {"partition": describe(Dirichlet(1.0))}) == []
    codec = TopK(0.01, values=Sign(32))
    codec.some_round_counter = 5  # state gathered while training is not a setting
    assert render(describe(codec)).startswith("TopK(") and "values=Sign(block=32" in render(describe(codec))
    assert "some_round_counter" not in render(describe(codec))
    diff = identity_differences({"codec": describe(codec)}, {"codec": describe(TopK(0.01, values=Sign(64)))})
    assert len(diff) == 1 and "values=Sign(block=32" in diff[0] and "values=Sign(block=64" in diff[0]


def test_every_loop_parameter_is_classified_for_resume():
    import inspect

    from lightning_fed import FedLoop
    from lightning_fed.identity import MAY_CHANGE, MUST_MATCH

    params = set(inspect.signature(FedLoop.__init__).parameters) - {"self"}
    assert params == set(MUST_MATCH) | set(MAY_CHANGE) and not set(MUST_MATCH) & set(MAY_CHANGE)


@pytest.fixture
def two_checkpoints(tmp_path, make_loop, small_dm):
    """A 2-round run with both checkpoints kept."""
    from conftest import seeded

    from lightning_fed.models import MNIST1DMLP

    res = make_loop(rounds=2, checkpoint_every=1, keep_checkpoints=2, output_dir=str(tmp_path / "d")).fit(
        seeded(MNIST1DMLP), small_dm)
    ckpts = res.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last", "round-000001", "round-000002"]
    return res.run_dir


def _damage(state_pt, how):
    data = state_pt.read_bytes()
    if how == "truncated":
        state_pt.write_bytes(data[: len(data) // 2])
    else:
        state_pt.write_bytes(bytes(b ^ 0x5A for b in data[:4096]) + data[4096:])


@pytest.mark.parametrize("how", ["truncated", "garbled"])
@pytest.mark.parametrize("resume", ["last", "run_dir"])
def test_damaged_newest_checkpoint_falls_back(two_checkpoints, make_loop, small_dm, caplog, how, resume):
    from conftest import seeded

    from lightning_fed.models import MNIST1DMLP

    run_dir = two_checkpoints
    _damage(run_dir / "checkpoints" / "round-000002" / "state.pt", how)
    loop = make_loop(rounds=3, checkpoint_every=1, keep_checkpoints=2, output_dir=str(run_dir.parent))
    with caplog.at_level("WARNING", logger="lightning_fed"):
        res = loop.fit(seeded(MNIST1DMLP), small_dm, resume="last" if resume == "last" else str(run_dir))
    warned = [r.getMessage() for r in caplog.records if "round-000002" in r.getMessage()]
    assert warned and "state.pt cannot be loaded" in warned[0], caplog.text
    assert "resuming from" in caplog.text and "round-000001" in caplog.text
    assert [h["round"] for h in res.history] == [1, 2, 3]  # round 2 is trained again
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last", "round-000002", "round-000003"]


def test_last_names_a_missing_folder(two_checkpoints, caplog):
    run_dir = two_checkpoints
    (run_dir / "checkpoints" / "last").write_text("round-000009")
    with caplog.at_level("WARNING", logger="lightning_fed"):
        assert find_checkpoint(run_dir).name == "round-000002"
    assert "round-000009" in caplog.text and "does not exist" in caplog.text


def test_no_intact_checkpoint(two_checkpoints, make_loop, small_dm):
    import shutil

    from conftest import seeded

    from lightning_fed.models import MNIST1DMLP

    run_dir = two_checkpoints
    _damage(run_dir / "checkpoints" / "round-000002" / "state.pt", "truncated")
    shutil.rmtree(run_dir / "checkpoints" / "round-000001" / "clients")
    before = _files(run_dir)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*\n  round-000002: .*cannot be loaded.*\n"
                                              r"  round-000001: .*clients is missing"):
        make_loop(rounds=3, output_dir=str(run_dir.parent)).fit(seeded(MNIST1DMLP), small_dm, resume="last")
    assert _files(run_dir) == before
    with pytest.raises(CheckpointError, match="cannot resume from .*round-000002: .*cannot be loaded"):
        find_checkpoint(run_dir / "checkpoints" / "round-000002")  # a checkpoint named explicitly: no fallback
