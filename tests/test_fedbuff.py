"""FedBuff: staleness weights, buffer flushes on a scripted arrival order, bounded staleness, determinism, resume
mid-stream, two processes against one, and bad settings."""

import csv
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import seeded

from lightning_fed.checkpoint import find_checkpoint, load_checkpoint
from lightning_fed.models import MNIST1DMLP
from lightning_fed.protocol import ClientMessage, ClientTask, Reply
from lightning_fed.strategies import FedBuff
from lightning_fed.strategies.fedbuff import staleness_weight
from lightning_fed.systems import ClientProfiles, SimulatedClock, Workload
from lightning_fed.systems.asynchronous import BufferedSchedule

HEADER = "client_id,flops_per_s,up_bps,down_bps,dropout\n"


def _profiles(tmp_path, seconds, dropout=None):
    """Clients whose local work takes ``seconds[c]`` simulated seconds (10 samples, 1 MAC each: 60 FLOPs); the
    scripted messages are empty, so transfers take no time and the arrival times are exact."""
    rows = [f"{c},{60 / s!r},1e15,1e15,{(dropout or {}).get(c, 0)}" for c, s in enumerate(seconds)]
    path = tmp_path / "p.csv"
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return ClientProfiles(csv=str(path))


def _scripted(tmp_path, seconds, buffer_size, max_staleness=None, dropout=None):
    """A schedule on a clock with scripted compute times and a dispatch that trains nobody (empty messages)."""
    clock = SimulatedClock(profiles=_profiles(tmp_path, seconds, dropout))
    clock.bind(len(seconds), len(seconds), 0)
    work = Workload(
        examples=[10] * len(seconds),
        batch_size=10,
        drop_last=False,
        accumulate_grad_batches=1,
        local_epochs=1,
        macs_per_sample=lambda cid: 1.0,
    )
    sched = BufferedSchedule(len(seconds), buffer_size, max_staleness)
    sched.bind(clock, len(seconds), 0)
    log = []

    def dispatch(version, clients):
        log.append((version, list(clients)))
        tasks = [ClientTask(version, c, b"", {}) for c in clients]
        run, absent = clock.admit(version, tasks, work)
        plan = SimpleNamespace(tasks=tasks, stats={"bytes_down": 0, "raw_bytes_down": 0, "encode_s": 0.0})
        return plan, [ClientMessage(t.client_id, b"", 10) for t in run], absent

    return sched, clock, dispatch, log


def test_staleness_weights():
    assert staleness_weight("sqrt", 0) == 1.0
    assert staleness_weight("sqrt", 3) == 0.5
    assert staleness_weight("polynomial", 1, 1.0) == 0.5
    assert staleness_weight("polynomial", 3, 0.5) == 0.5
    assert staleness_weight("constant", 9) == 1.0


def test_buffer_flushes_follow_the_scripted_arrival_order(tmp_path):
    # 3 clients always in flight, finishing 1, 2 and 3 simulated seconds after they are sent a model; a version
    # every 2 arrivals. v0: 0 and 1 arrive (t=1, 2). v1: 0 and 1 restart at t=2; 0 (t=3) and 2 (t=3, sent at v0)
    # tie, broken by client id. v2: 0 and 2 restart at t=3; 0 (t=4, sent at v2) and 1 (t=4, sent at v1)
    sched, clock, dispatch, log = _scripted(tmp_path, [1.0, 2.0, 3.0], buffer_size=2)
    got = [sched.exchange(v, dispatch) for v in range(3)]
    assert log == [(0, [0, 1, 2]), (1, [0, 1]), (2, [0, 2])]
    assert [ex.clients for ex in got] == [[0, 1], [0, 2], [0, 1]]
    assert [ex.sim["sim_time_s"] for ex in got] == [2.0, 3.0, 4.0]
    assert [ex.sim["sim_round_s"] for ex in got] == [2.0, 1.0, 1.0]
    assert [ex.sim["sim_staleness_max"] for ex in got] == [0, 1, 1]
    assert [ex.sim["sim_staleness_mean"] for ex in got] == [0, 0.5, 0.5]
    assert [ex.sim["sim_in_flight"] for ex in got] == [1, 1, 1]
    assert [(t.round, t.client_id, t.start_s, t.staleness) for t in clock.rows] == [
        (0, 0, 0, 0),
        (0, 1, 0, 0),
        (1, 0, 2, 0),
        (1, 2, 0, 1),
        (2, 0, 3, 0),
        (2, 1, 2, 1),
    ]


def test_bounded_staleness_drops_old_updates(tmp_path):
    # as above with max_staleness=0: client 2's update (sent at v0, arriving at v1) is dropped, and v1 waits for
    # client 1 (t=4); a dropout frees its slot without counting
    sched, clock, dispatch, _ = _scripted(tmp_path, [1.0, 2.0, 3.0], buffer_size=2, max_staleness=0)
    v0, v1 = sched.exchange(0, dispatch), sched.exchange(1, dispatch)
    assert v0.clients == [0, 1] and v0.discard == {}
    assert v1.clients == [0, 2, 1] and list(v1.discard) == [2] and "max_staleness=0" in v1.discard[2]
    assert v1.sim["sim_stale"] == 1 and v1.sim["sim_time_s"] == 4.0
    assert [t.status for t in clock.rows if t.round == 1] == ["ok", "stale", "ok"]


def test_dropouts_free_their_slot_without_counting(tmp_path):
    sched, _, dispatch, _ = _scripted(tmp_path, [1.0, 2.0, 3.0], buffer_size=2, dropout={0: 0.999999})
    v0 = sched.exchange(0, dispatch)
    # client 0 drops out (noticed when its download ends, at once here); 1 and 2 fill the buffer
    assert v0.clients == [0, 1, 2] and v0.messages[0].failure is not None
    assert v0.sim["sim_dropouts"] == 1 and v0.sim["sim_time_s"] == 3.0


def test_aggregate_weights_by_staleness_against_hand_computation():
    model = seeded(MNIST1DMLP)
    strategy = FedBuff(concurrency=3, buffer_size=2, server_lr=0.5)
    strategy.setup(model)
    start = strategy.global_flat.clone()
    strategy.configure_round(0, [0])
    strategy.configure_round(2, [1])
    spec = strategy.reply_spec(None)
    d0 = {k: torch.full(s.shape, 1.0) for k, s in spec.items()}
    d1 = {k: torch.full(s.shape, 2.0) for k, s in spec.items()}
    metrics = strategy.aggregate(3, [Reply(0, d0, 30), Reply(1, d1, 10)])  # staleness 3 and 1
    w0, w1 = 0.75 / math.sqrt(4), 0.25 / math.sqrt(2)
    assert torch.allclose(strategy.global_flat, start + 0.5 * (w0 * 1.0 + w1 * 2.0))
    assert metrics["staleness_mean"] == 2 and metrics["staleness_max"] == 3
    assert metrics["staleness_weight_sum"] == pytest.approx(w0 + w1)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"buffer_size": 0}, r"FedBuff: buffer_size=0 is not allowed"),
        ({"buffer_size": 4, "concurrency": 3}, r"FedBuff: concurrency=3 is not allowed.*>= buffer_size=4"),
        ({"server_lr": -1.0}, r"FedBuff: server_lr=-1.0 is not allowed"),
        ({"staleness": "linear"}, r"FedBuff: staleness='linear' is not allowed.*one of \('sqrt'"),
        ({"max_staleness": -1}, r"FedBuff: max_staleness=-1 is not allowed"),
        (
            {"staleness": "polynomial", "staleness_exponent": 0},
            r"FedBuff: staleness_exponent=0 is not allowed",
        ),
    ],
)
def test_bad_settings_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        FedBuff(**kw)


def test_bad_loops_rejected(make_loop):
    strategy = FedBuff(concurrency=3, buffer_size=2)
    with pytest.raises(ValueError, match=r"FedLoop: clock=None is not allowed.*SimulatedClock"):
        make_loop(strategy=strategy)
    with pytest.raises(ValueError, match=r"FedLoop: clock=.*deadline=0.1.* is not allowed"):
        make_loop(strategy=strategy, clock=SimulatedClock(deadline=0.1))
    with pytest.raises(ValueError, match=r"FedLoop: num_clients=2 is not allowed.*concurrency=3"):
        make_loop(num_clients=2, clients_per_round=1, strategy=strategy, clock=SimulatedClock())


def _fit(make_loop, small_dm, **kw):
    args = {
        "num_clients": 6,
        "rounds": 4,
        "strategy": FedBuff(concurrency=4, buffer_size=2),
        "clock": SimulatedClock(profiles=ClientProfiles(preset="heterogeneous")),
    }
    return make_loop(**{**args, **kw}).fit(seeded(MNIST1DMLP), small_dm)


def _weights(run_dir):
    return load_checkpoint(find_checkpoint(run_dir))["model"]


SIM = ("sim_time_s", "sim_round_s", "sim_staleness_mean", "sim_staleness_max", "sim_dropouts", "good")


def test_same_seed_same_run(tmp_path, make_loop, small_dm):
    a = _fit(make_loop, small_dm, checkpoint_every=4, output_dir=str(tmp_path / "a"))
    b = _fit(make_loop, small_dm, checkpoint_every=4, output_dir=str(tmp_path / "b"))
    assert [[h[k] for k in SIM] for h in a.history] == [[h[k] for k in SIM] for h in b.history]
    assert max(h["sim_staleness_max"] for h in a.history) >= 1  # the run did mix versions
    wa, wb = _weights(a.run_dir), _weights(b.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = list(csv.DictReader((a.run_dir / "clock.csv").open()))
    assert len(rows) == sum(h["clients"] for h in a.history) and {"start_s", "staleness"} <= set(rows[0])
    c = _fit(make_loop, small_dm, checkpoint_every=4, output_dir=str(tmp_path / "c"), seed=1)
    assert [h["sim_time_s"] for h in c.history] != [h["sim_time_s"] for h in a.history]


def test_resume_mid_stream_is_bit_identical(tmp_path, make_loop, small_dm):
    full = _fit(make_loop, small_dm, checkpoint_every=1, output_dir=str(tmp_path / "full"))
    part = _fit(make_loop, small_dm, checkpoint_every=1, output_dir=str(tmp_path / "part"), rounds=2)
    state = load_checkpoint(find_checkpoint(part.run_dir))
    assert state["schedule"]["queue"], "the checkpoint holds clients in flight"
    resumed = make_loop(
        num_clients=6,
        rounds=4,
        strategy=FedBuff(concurrency=4, buffer_size=2),
        checkpoint_every=1,
        clock=SimulatedClock(profiles=ClientProfiles(preset="heterogeneous")),
        output_dir=str(tmp_path / "part"),
    ).fit(seeded(MNIST1DMLP), small_dm, resume=str(part.run_dir))
    assert [h["round"] for h in resumed.history] == [1, 2, 3, 4]
    assert [[h[k] for k in SIM] for h in resumed.history] == [[h[k] for k in SIM] for h in full.history]
    wa, wb = _weights(full.run_dir), _weights(resumed.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    a, b = load_checkpoint(find_checkpoint(full.run_dir)), load_checkpoint(find_checkpoint(resumed.run_dir))
    assert a["schedule"]["queue"][0]["message"].numel() > 0
    assert [e["client_id"] for e in a["schedule"]["queue"]] == [
        e["client_id"] for e in b["schedule"]["queue"]
    ]
    assert all(
        torch.equal(x["message"], y["message"])
        for x, y in zip(a["schedule"]["queue"], b["schedule"]["queue"])
    )
    assert (tmp_path / "part").joinpath(resumed.run_dir.name, "clock.csv").read_text() == (
        full.run_dir / "clock.csv"
    ).read_text()


def test_stale_updates_dropped_in_the_loop(tmp_path, make_loop, small_dm):
    res = _fit(make_loop, small_dm, rounds=6, strategy=FedBuff(concurrency=5, buffer_size=1, max_staleness=0))
    rows = list(csv.DictReader((res.run_dir / "clock.csv").open()))
    stale = [r for r in rows if r["status"] == "stale"]
    assert stale and sum(h["sim_stale"] for h in res.history) == len(stale)
    assert all(h["staleness_max"] == 0 for h in res.history if h["good"])


def test_two_processes_match_one(tmp_path):
    from pathlib import Path

    from test_parallel import SMALL, _assert_same, _ranks, _state

    from lightning_fed.cli import run

    recipe = Path(__file__).parents[1] / "recipes" / "mnist1d" / "fedbuff.yaml"
    args = ["--config", str(recipe), *SMALL, "--loop.rounds", "3", "--data.init_args.num_samples", "1000"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run(["fit", *args, "--loop.output_dir", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(before)
    assert max(h["sim_dispatched"] for h in one.history) >= 2  # versions that dispatched several clients
    _ranks([*args, "--loop.output_dir", str(tmp_path / "many")], 2)
    _assert_same(_state(tmp_path / "one"), _state(tmp_path / "many"), "FedBuff: 2 processes vs one")
