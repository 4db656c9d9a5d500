"""Clients in parallel on several processes (gloo on CPU): the same result as one process.

Each multi-process run is a real ``python -m lightning_fed.cli fit ... --loop.devices N`` in a subprocess (the ranks
re-run that command), except in the parity cases other than FedAvg's: their ranks are forked from one process per
pytest worker that has already imported lightning_fed (``tests/_rank_forks.py``), which saves each rank's 9 s of
imports and changes nothing after them. The one-process reference runs in this process with one torch thread, as
each rank has.
Compared: the whole last checkpoint (global model, strategy, codec and callback state, every client's stored state),
not just the final weights.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _rank_forks import RankForks
from safetensors.torch import load_file

from lightning_fed.checkpoint import find_checkpoint, load_checkpoint
from lightning_fed.cli import run
from lightning_fed.parallel import assign_lpt, pack_messages, unpack_messages
from lightning_fed.protocol import ClientMessage
from lightning_fed.report import without_wall_clock

ROOT = Path(__file__).parents[1]
RECIPES = ROOT / "recipes" / "mnist1d"
SMALL = ["--loop.verbose", "false", "--loop.plot", "false", "--loop.eval_every", "1", "--loop.checkpoint_every", "1",
         "--loop.local_epochs", "1", "--loop.keep_checkpoints", "5", "--loop.loggers", "[]"]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env(env=None) -> dict:
    """The environment of the ranks: one torch thread each, this tree and tests/ importable, no launcher's."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
         **(env or {})}
    for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        e.pop(k, None)
    return e


@pytest.fixture(scope="session")
def rank_forks(_cache_dir):
    """The forking server of this pytest worker (``tests/_rank_forks.py``)."""
    forks = RankForks(_env())
    yield forks
    forks.close()


def _ranks(args, devices, env=None, check=True, launcher=()):
    """Run the CLI with ``--loop.devices devices`` in a subprocess (``launcher``: a command in front, e.g.
    torchrun's); returns the completed process."""
    e = _env(env)
    cmd = [*launcher] if launcher else [sys.executable]
    proc = subprocess.run([*cmd, "-m", "lightning_fed.cli", "fit", *args, "--loop.devices", str(devices)],
                          check=False, env=e, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _forked(forks: RankForks, args, devices, log_dir: Path) -> None:
    """Run the CLI with ``--loop.devices devices`` as forked ranks (``rank_forks``), each one's output in
    ``log_dir``; assert that every rank exits with 0."""
    codes = forks.run(["fit", *args, "--loop.devices", str(devices)], devices, log_dir)
    assert codes == [0] * devices, "\n".join(p.read_text()[-3000:] for p in sorted(log_dir.glob("*.log")))


def _flatten(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() for k2, v2 in _flatten(v, f"{prefix}/{k}").items()}
    if isinstance(obj, (list, tuple)):
        return {k2: v2 for i, v in enumerate(obj) for k2, v2 in _flatten(v, f"{prefix}/{i}").items()}
    return {prefix: obj}


def _state(out_dir: Path) -> dict:
    """The last checkpoint of the only run under ``out_dir``, flattened, with every client's stored state."""
    (run_dir,) = sorted(out_dir.glob("version_*"))
    ckpt = find_checkpoint(run_dir)
    state = load_checkpoint(ckpt)
    history = state.pop("history")
    flat = _flatten(state)
    flat["history"] = without_wall_clock(history)  # every round metric but the measured seconds
    for sub in ("clients", "senders"):
        for f in sorted((ckpt / sub).glob("client-*.pt")):
            flat.update(_flatten(torch.load(f, weights_only=True), f"{sub}/{f.name}"))
    return flat


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: {sorted(set(a) ^ set(b))[:5]}"
    assert any(isinstance(v, torch.Tensor) for v in a.values())
    for k, va in a.items():
        if k.endswith("latency_ms"):  # measured wall-clock time
            continue
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, b[k]), f"{what}: {k} differs"
        else:
            assert va == b[k], f"{what}: {k} differs ({va!r} vs {b[k]!r})"


def _pruning_recipe(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((RECIPES / "fedavg_pruning_qat.yaml").read_text())
    cfg["loop"]["callbacks"][0]["init_args"]["at"] = [0, 1]
    cfg["loop"]["callbacks"][1]["init_args"]["start"] = 2
    path = tmp_path / "pruning.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


CASES = {  # name: (recipe, processes)
    "fedavg-2": ("fedavg", 2),
    "fedavg-3": ("fedavg", 3),
    "differential-codec-2": ("codec_differential", 2),
    "feddf-tiers-3": ("feddf", 3),
    "feddf-assistant-2": ("feddf_assistant", 2),  # a server-side assistant replayed on every rank
    "fedmd-assistant-2": ("fedmd_assistant", 2),  # per-tier digest targets
    "fedmd-nfdp-assistant-2": ("fedmd_nfdp_assistant", 2),
    "fedgkt-assistant-2": ("fedgkt_assistant", 2),  # a server-side assistant and its optimizer on every rank
    "ddist-assistant-2": ("ddist_assistant", 2),  # per-client digest targets along the chain of tiers
    "fedmoe-2": ("fedmoe", 2),
    "pruning-qat-2": (None, 2),
    "bf16-mixed-2": ("fedavg", 2),
    "backdoor-attack-2": ("attack_backdoor", 2),  # a server hook that writes a file in the run folder
    "scaffold-2": ("scaffold", 2),
    "fedexp-2": ("fedexp", 2),  # the step size from every reply, and the previous iterate, on every rank
    "feddyn-2": ("feddyn", 2),  # h_k in the client store on the ranks, the server state h on every rank
    "foolsgold-2": ("defence_foolsgold", 2),  # client histories kept and replayed by the server on every rank
    "fedrs-2": ("fedrs", 2),  # each client's classes read from its shard on whichever rank runs it
    "secagg-2": ("secagg", 2),  # the protocol's setup replayed on every rank, masked inputs from both
    "fedper-2": ("fedper", 2),  # personal layers in the client store (after a 1-round warm-up), personalized evaluation
    "ditto-2": ("ditto", 2),  # personal models trained through training_step on the ranks, evaluated on every rank
    "fednova-stragglers-2": ("fednova", 2),  # partial work: each reply's local_steps crosses between the ranks
    "stragglers-deadline-2": ("stragglers_deadline", 2),  # a simulated clock: dropouts, partial work, clock.csv
    "overselect-2": ("overselect", 2),
    "dp-adaptive-2": ("dp_adaptive", 2),  # server noise and the adaptive bound replayed on every rank
    "dp-local-2": ("dp_local", 2),  # client noise keyed by (seed, round, client), whoever runs the client
    "fltrust-2": ("defence_fltrust", 2),  # the server update on the root data replayed on every rank
    "reference-filter-2": ("defence_reference_filter", 2),
    "loss-filter-2": ("defence_loss_filter", 2),  # the scoring copy of the global model on every rank
    "ibau-2": ("defence_ibau", 2),  # a server-side repair on the clean data replayed on every rank
    "anp-2": ("defence_anp", 2),  # masks learnt and channels zeroed on every rank
    "activation-clip-2": ("defence_activation_clip", 2),  # bounds measured on every rank, written by rank 0
    "ccvr-2": ("fedntd_ccvr", 2),  # the clients' class statistics and the head's calibration on every rank
}


LAUNCHED = ("fedavg-2", "fedavg-3")
"""Parity cases whose ranks the command line starts, as a user's are; the others' are forked (``rank_forks``)."""


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_match_one_process(case, tmp_path, one_thread, rank_forks):
    recipe, n = CASES[case]
    path = _pruning_recipe(tmp_path) if recipe is None else RECIPES / f"{recipe}.yaml"
    args = ["--config", str(path), *SMALL, "--loop.rounds", "3"]
    if case.startswith("bf16"):
        args += ["--loop.precision", "bf16-mixed"]
    if case.startswith("fedper"):  # the warm-up ends within the run: the heads' start goes down, then stays
        args += ["--loop.strategy.init_args.warmup_rounds", "1"]
    run(["fit", *args, "--loop.output_dir", str(tmp_path / "one")])
    many = [*args, "--loop.output_dir", str(tmp_path / "many")]
    if case in LAUNCHED:
        _ranks(many, n)
    else:
        _forked(rank_forks, many, n, tmp_path / "logs")
    _assert_same(_state(tmp_path / "one"), _state(tmp_path / "many"), f"{case}: {n} processes vs one")
    tables = [sorted(next((tmp_path / w).glob("version_*")).glob("personalized/*.csv")) for w in ("one", "many")]
    assert [p.name for p in tables[0]] == [p.name for p in tables[1]]
    for a, b in zip(*tables):  # the per-client table, written once by rank 0, is the one process's
        assert a.read_text() == b.read_text(), f"{case}: {a.name} differs"
    dirs = [next((tmp_path / w).glob("version_*")) for w in ("one", "many")]
    if case.startswith("ccvr"):  # CCVR: the same calibrated model and metrics
        a, b = (load_file(str(d / "calibrated.safetensors")) for d in dirs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{case}: calibrated model differs"
        ha, hb = (json.loads((d / "history.json").read_text()) for d in dirs)
        assert [{k: v for k, v in h.items() if k.startswith("ccvr/")} for h in ha] == [
            {k: v for k, v in h.items() if k.startswith("ccvr/")} for h in hb]


def test_torchrun_starts_the_ranks(tmp_path, one_thread):
    """Processes started by torchrun (Fabric's TorchElasticEnvironment) instead of by the loop: the same result."""
    args = ["--config", str(RECIPES / "fedavg.yaml"), *SMALL, "--loop.rounds", "2"]
    run(["fit", *args, "--loop.output_dir", str(tmp_path / "one")])
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(find_free_network_port())]
    _ranks([*args, "--loop.output_dir", str(tmp_path / "many")], 2, launcher=torchrun)
    _assert_same(_state(tmp_path / "one"), _state(tmp_path / "many"), "torchrun, 2 processes, vs one")
    torchrun[-1] = str(find_free_network_port())
    wrong = _ranks([*args, "--loop.output_dir", str(tmp_path / "wrong")], 3, launcher=torchrun, check=False)
    assert wrong.returncode != 0 and "devices=3 x num_nodes=1 = 3 processes, but the launcher started 2" in wrong.stderr


def test_slurm_tasks_are_found(tmp_path, one_thread):
    """Two processes started as SLURM tasks (srun's environment, faked here): Fabric's SLURMEnvironment finds their
    ranks and the run matches one process."""
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    args = ["--config", str(RECIPES / "fedavg.yaml"), *SMALL, "--loop.rounds", "2"]
    run(["fit", *args, "--loop.output_dir", str(tmp_path / "one")])
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "fed",
            "SLURM_NODELIST": "localhost", "MASTER_PORT": str(find_free_network_port())}
    for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR"):
        base.pop(k, None)
    cmd = [sys.executable, "-m", "lightning_fed.cli", "fit", *args, "--loop.devices", "2", "--loop.output_dir",
           str(tmp_path / "many")]
    procs = [subprocess.Popen(cmd, env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    _assert_same(_state(tmp_path / "one"), _state(tmp_path / "many"), "SLURM tasks, 2 processes, vs one")


def _dying(tmp_path: Path, recipe: str) -> list[str]:
    cfg = yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())
    cfg["model"]["class_path"] = "_parallel_models.DyingCNN"
    path = tmp_path / "dying.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["--config", str(path), *SMALL, "--loop.rounds", "4"]


def _in_process(argv):
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        return run(argv)
    finally:
        sys.path.remove(str(ROOT / "tests"))


def test_resume_with_another_number_of_processes(tmp_path, one_thread, rank_forks):
    """3 processes, rank 2 killed in round 3, resumed with 2 (forked) processes: the same as one uninterrupted
    process."""
    args = _dying(tmp_path, "codec_differential")  # per-client state on both sides of the wire
    _in_process(["fit", *args, "--loop.output_dir", str(tmp_path / "one")])
    many = [*args, "--loop.output_dir", str(tmp_path / "many")]
    died = _ranks(many, 3, env={"KILL_ROUND": "3", "KILL_RANK": "2"}, check=False)
    assert died.returncode != 0 and "rank 2" in died.stderr, died.stderr[-2000:]
    _forked(rank_forks, [*many, "--resume", "last"], 2, tmp_path / "logs")
    _assert_same(_state(tmp_path / "one"), _state(tmp_path / "many"), "3 processes, resumed with 2, vs one")


def test_failing_client_on_rank_1_is_dropped(tmp_path, one_thread, rank_forks):
    cfg = yaml.safe_load((RECIPES / "fedavg.yaml").read_text())
    cfg["model"]["class_path"] = "_parallel_models.FailingCNN"
    cfg["model"]["init_args"]["fail_client"] = 19  # the smallest shard: LPT gives it to the last rank
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ["--config", str(path), *SMALL, "--loop.rounds", "3"]
    one = _in_process(["fit", *args, "--loop.output_dir", str(tmp_path / "one")])
    assert sum(h["failed"] for h in one.history) >= 1, "client 19 was never sampled: pick another"
    _forked(rank_forks, [*args, "--loop.output_dir", str(tmp_path / "many")], 2, tmp_path / "logs")
    logged = " ".join((tmp_path / "logs" / "rank-0.log").read_text().split())  # rich wraps long log lines
    assert "client 19 dropped: ValueError: client 19 has a broken sensor (rank 1)" in logged, logged[-2000:]
    _assert_same(_state(tmp_path / "one"), _state(tmp_path / "many"), "a failing client, 2 processes vs one")


def test_killed_rank_is_named_and_the_run_resumes(tmp_path, one_thread):
    """Rank 1 killed in round 3: a clear message naming it; resumed in one process, the same as never killed."""
    args = _dying(tmp_path, "fedavg")
    _in_process(["fit", *args, "--loop.output_dir", str(tmp_path / "one")])
    many = [*args, "--loop.output_dir", str(tmp_path / "many")]
    died = _ranks(many, 2, env={"KILL_ROUND": "3", "KILL_RANK": "1"}, check=False)
    assert died.returncode != 0
    assert "rank 1" in died.stderr and "killed by signal 9" in died.stderr and "round 3" in died.stderr, died.stderr[-2000:]
    assert "Continue it from its last checkpoint (after round 2) with `--resume last`" in died.stderr
    _in_process(["fit", *many, "--resume", "last"])
    _assert_same(_state(tmp_path / "one"), _state(tmp_path / "many"), "killed at round 3, resumed, vs one process")


def test_killed_rank_0_is_named_by_the_others(tmp_path):
    """Rank 0 (the process that started the others) killed in round 2, before the run's first checkpoint: rank 1
    names it, says that there is no checkpoint to continue from, and stops."""
    args = [*_dying(tmp_path, "fedavg"), "--loop.checkpoint_every", "3"]
    died = _ranks([*args, "--loop.output_dir", str(tmp_path / "many")], 2, env={"KILL_ROUND": "2", "KILL_RANK": "0"},
                  check=False)
    assert died.returncode == -9
    assert "lightning-fed: error: rank 1: rank 0 (pid" in died.stderr and "died during round 2" in died.stderr
    assert "No checkpoint has been written yet (one every 3 rounds): start the run again" in died.stderr, died.stderr


def test_lpt_balances_by_cost():
    costs = [10, 9, 8, 2, 2, 1]
    owner = assign_lpt(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    assert owner == [0, 1, 1, 0, 0, 0] and loads == [15, 17]  # by hand: 10|9, 8 -> 1, then 2, 2, 1 -> 0
    assert owner == assign_lpt(costs, 2)  # deterministic
    assert assign_lpt([1.0] * 5, 3) == [0, 1, 2, 0, 1]  # equal costs: in order, lowest rank first
    round_robin = [i % 2 for i in range(len(costs))]
    rr = [sum(c for c, o in zip(costs, round_robin) if o == r) for r in range(2)]
    assert max(loads) < max(rr)


def test_messages_travel_as_bytes():
    msgs = [ClientMessage(3, b"\x00\x01abc", 17, {"train_loss": 0.25}, raw_bytes=40, encode_s=0.5),
            ClientMessage(5, failure="ValueError: broken"), ClientMessage(8, b"", 4)]
    got, busy = unpack_messages(pack_messages(msgs, 1.5))
    assert busy == 1.5
    assert got == msgs
    blob = pack_messages(msgs, 0.0)
    with pytest.raises(ValueError, match="trailing"):
        unpack_messages(blob + b"x")


def test_gpu_of_each_rank(monkeypatch):
    """``processes_per_device`` processes share a GPU: local rank k uses GPU k // processes_per_device."""
    from lightning_fed import FedLoop
    from lightning_fed.ranks import Ranks

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    loop = FedLoop(devices=4, processes_per_device=2, accelerator="cuda", verbose=False)
    got = []
    for local in range(4):
        loop.ranks = Ranks(rank=local, world_size=4, local_rank=local, local_world_size=4)
        got.append(loop._fabric_devices())
    assert got == [[0], [0], [1], [1]]
    loop = FedLoop(devices=3, accelerator="cuda", verbose=False)
    loop.ranks = Ranks(rank=2, world_size=3, local_rank=2, local_world_size=3)
    with pytest.raises(ValueError, match="at most 2 processes per node"):
        loop._fabric_devices()
    with pytest.raises(ValueError, match="processes_per_device"):
        FedLoop(processes_per_device=0)
    with pytest.raises(ValueError, match="devices"):
        FedLoop(devices=0)


def test_devices_refused_in_process(tmp_path):
    with pytest.raises(RuntimeError, match="pytest"):
        run(["fit", "--config", str(RECIPES / "fedavg.yaml"), *SMALL, "--loop.rounds", "1", "--loop.devices", "2",
             "--loop.output_dir", str(tmp_path)])
    assert not list(tmp_path.glob("version_*"))


def test_taylor_pruning_refused_with_ranks(tmp_path):
    cfg = yaml.safe_load((RECIPES / "fedavg_pruning.yaml").read_text())
    cfg["loop"]["callbacks"] = [c for c in cfg["loop"]["callbacks"] if "Pruning" in c["class_path"]]
    cfg["loop"]["callbacks"][0]["init_args"]["importance"] = "taylor"
    path = tmp_path / "taylor.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _ranks(["--config", str(path), *SMALL, "--loop.rounds", "1", "--loop.output_dir", str(tmp_path / "o")], 2,
                  check=False)
    assert proc.returncode != 0 and "importance='taylor'" in proc.stderr
    assert not list((tmp_path / "o").glob("version_*"))


def test_a_rank_that_cannot_see_the_run_folder_is_named(tmp_path):
    """Rank 1 reading another file system (simulated: its answer is 'not seen'): a clear error naming it."""
    from lightning_fed import FedLoop
    from lightning_fed.ranks import RankFailed, Ranks

    class Blind(Ranks):
        def gather(self, blob):
            return [blob, b"0" if blob in (b"0", b"1") else blob]

        def agree(self, value):
            return value

    loop = FedLoop(verbose=False)
    loop.ranks = Blind(rank=0, world_size=2)
    with pytest.raises(RankFailed, match=r"rank\(s\) \[1\] cannot see the run folder"):
        loop._check_shared_folder(tmp_path)
    assert (tmp_path / ".ranks" / "token").exists()


def test_the_message_of_a_dead_rank_says_how_to_go_on(tmp_path):
    """``--resume last`` is offered only once the run has a checkpoint (else it would continue an earlier run's)."""
    from lightning_fed import FedLoop
    from lightning_fed.ranks import Ranks

    loop = FedLoop(output_dir=str(tmp_path), checkpoint_every=5, verbose=False)
    assert "No checkpoint has been written yet (one every 5 rounds)" in loop._resume_hint(None)
    assert "--resume last" in loop._resume_hint(4) and "(after round 5)" in loop._resume_hint(4)
    off = FedLoop(output_dir=str(tmp_path), checkpoint_every=0, verbose=False)
    assert "checkpoint_every=0" in off._resume_hint(None) and "--resume last" not in off._resume_hint(None)
    ranks = Ranks(rank=1, world_size=2, resume_hint=loop._resume_hint(None))
    message = str(ranks.failure(RuntimeError("Connection closed by peer")))
    assert message.startswith("rank 1: another rank") and message.endswith(loop._resume_hint(None))


def test_a_peer_still_dying_is_named():
    """A killed rank closes its connections before it is gone: the other ranks look again for a few seconds, so
    the one that is still exiting when the connection drops is named (it was "another rank" under load)."""
    import socket
    import subprocess
    import sys

    from lightning_fed.ranks import Ranks

    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    try:
        ranks = Ranks(rank=1, world_size=2, peers=[(socket.gethostname(), peer.pid), (socket.gethostname(), 1)])
        message = str(ranks.failure(RuntimeError("Connection closed by peer")))
    finally:
        peer.wait()
    assert message.startswith(f"rank 1: rank 0 (pid {peer.pid}) died during start-up"), message
