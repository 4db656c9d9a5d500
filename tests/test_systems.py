"""Devices, networks and time: client profiles, the simulated clock against a hand computation, deadlines,
stragglers (drop and partial work), over-selection, dropouts, and the loop's step cap."""

import csv
import math

import pytest
import torch

from lightning_fed.client import ClientTrainingError
from lightning_fed.protocol import ClientMessage, ClientTask, TensorSpec
from lightning_fed.systems import PRESETS, ClientProfiles, SimulatedClock, Workload
from lightning_fed.systems.clock import FLOPS_PER_MAC, FORWARD_BACKWARD, samples_processed
from lightning_fed.systems.profiles import write_profiles_csv

HEADER = "client_id,flops_per_s,up_bps,down_bps,dropout\n"


def _csv(tmp_path, rows, header=HEADER, name="p.csv"):
    path = tmp_path / name
    path.write_text(header + "".join(r + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------ profiles
def test_heterogeneous_preset_spans_ten_times_and_is_seeded():
    a = ClientProfiles(preset="heterogeneous").resolve(40, seed=0)
    assert [p.client_id for p in a] == list(range(40))
    speeds = [p.flops_per_s for p in a]
    assert max(speeds) / min(speeds) >= 10
    counts = {
        name: sum(p.device == name for p in a) for name in ("low_end", "mid_range", "flagship", "edge_box")
    }
    assert counts == {"low_end": 12, "mid_range": 16, "flagship": 8, "edge_box": 4}  # the preset's fractions
    assert ClientProfiles(preset="heterogeneous").resolve(40, seed=0) == a
    assert ClientProfiles(preset="heterogeneous").resolve(40, seed=1) != a
    assert all(0 <= p.dropout < 1 and p.up_bps > 0 and p.down_bps > 0 for p in a)


def test_profiles_round_trip_through_csv(tmp_path):
    drawn = ClientProfiles(preset="mid_range").resolve(5, seed=3)
    write_profiles_csv(drawn, tmp_path / "fleet.csv")
    back = ClientProfiles(csv=str(tmp_path / "fleet.csv")).resolve(5, seed=99)
    assert [(p.flops_per_s, p.up_bps, p.down_bps, p.dropout) for p in back] == [
        (p.flops_per_s, p.up_bps, p.down_bps, p.dropout) for p in drawn
    ]
    assert [p.device for p in back] == ["mid_range"] * 5


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (["0,1e9,1e6,1e6,0.1", "1,0,1e6,1e6,0.1"], r"csv row 3: flops_per_s=0.0 is not allowed; .* > 0"),
        (["0,1e9,-5,1e6,0.1", "1,1e9,1e6,1e6,0.1"], r"csv row 2: up_bps=-5.0 is not allowed"),
        (["0,1e9,1e6,0,0.1", "1,1e9,1e6,1e6,0.1"], r"csv row 2: down_bps=0.0"),
        (
            ["0,1e9,1e6,1e6,1.0", "1,1e9,1e6,1e6,0.1"],
            r"csv row 2: dropout=1.0 is not allowed; .* in \[0, 1\)",
        ),
        (["0,1e9,1e6,1e6,-0.1", "1,1e9,1e6,1e6,0.1"], r"csv row 2: dropout=-0.1"),
        (["0,1e9,1e6,1e6,0", "0,1e9,1e6,1e6,0"], r"csv row 3: client_id=0 is not allowed; .* unique"),
        (
            ["0,fast,1e6,1e6,0", "1,1e9,1e6,1e6,0"],
            r"csv row 2: flops_per_s='fast' is not allowed; .* a number",
        ),
        (["x,1e9,1e6,1e6,0"], r"csv row 2: client_id='x'"),
        (["0,nan,1e6,1e6,0"], r"csv row 2: flops_per_s=nan"),
    ],
)
def test_bad_profile_rows_are_rejected_naming_row_and_key(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        ClientProfiles(csv=_csv(tmp_path, rows))


def test_bad_profiles_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"ClientProfiles: csv=.* \(missing: \['dropout'\]\)"):
        ClientProfiles(
            csv=_csv(tmp_path, ["0,1e9,1e6,1e6"], header="client_id,flops_per_s,up_bps,down_bps\n")
        )
    with pytest.raises(ValueError, match="ClientProfiles: csv=.* an existing CSV file"):
        ClientProfiles(csv=str(tmp_path / "none.csv"))
    with pytest.raises(
        ValueError, match=r"ClientProfiles: preset='phone' is not allowed; preset must be one of"
    ):
        ClientProfiles(preset="phone")
    two = ClientProfiles(csv=_csv(tmp_path, ["0,1e9,1e6,1e6,0", "2,1e9,1e6,1e6,0"]))
    with pytest.raises(ValueError, match=r"a row for every client 0..2 \(missing client_id \[1\]\)"):
        two.resolve(3, seed=0)
    with pytest.raises(ValueError, match=r"client ids below num_clients=1 \(found \[2\]\)"):
        two.resolve(1, seed=0)
    with pytest.raises(ValueError, match="dropout_scale=20 .* stays below 1"):
        ClientProfiles(preset="low_end", dropout_scale=20).resolve(3, seed=0)
    assert set(PRESETS) >= {"low_end", "mid_range", "flagship", "edge_box", "heterogeneous"}


def test_bad_clock_settings_rejected(make_loop):
    with pytest.raises(ValueError, match=r"SimulatedClock: deadline=0 is not allowed"):
        SimulatedClock(deadline=0)
    with pytest.raises(
        ValueError, match=r"SimulatedClock: straggler='wait' is not allowed; .* one of \('drop', 'partial'\)"
    ):
        SimulatedClock(straggler="wait")
    with pytest.raises(ValueError, match=r"straggler='partial' .* unless a deadline is set"):
        SimulatedClock(straggler="partial")
    with pytest.raises(ValueError, match=r"keep_first=0 is not allowed"):
        SimulatedClock(keep_first=0)
    with pytest.raises(
        ValueError, match=r"keep_first=3 is not allowed; keep_first must be at most clients_per_round=2"
    ):
        make_loop(clock=SimulatedClock(keep_first=3))
    with pytest.raises(ValueError, match=r"FedLoop: min_clients=2 is not allowed; .* keep_first=1"):
        make_loop(min_clients=2, clock=SimulatedClock(keep_first=1))


# ------------------------------------------------------------------ the clock on scripted rounds
def _fleet(tmp_path):
    """Three clients: 1, 2 and 4 GFLOP/s; uplinks 1, 2, 4 Mbit/s; downlinks 4x the uplinks; no dropouts."""
    return ClientProfiles(csv=_csv(tmp_path, ["0,1e9,1e6,4e6,0", "1,2e9,2e6,8e6,0", "2,4e9,4e6,16e6,0"]))


def _round(clock, tasks_bytes, up_bytes, workload, r=0):
    """Admit tasks with downlink messages of ``tasks_bytes``, reply with ``up_bytes``; return the tasks run, the
    clients that did not run (failure messages), the replies to discard and the clock's metrics."""
    spec = {"w": TensorSpec((1000,), torch.float32)}  # 4,000 raw bytes: the first round's uplink estimate
    tasks = [ClientTask(r, c, b"x" * n, spec, {}) for c, n in enumerate(tasks_bytes)]
    run, absent = clock.admit(r, tasks, workload)
    messages = [ClientMessage(t.client_id, b"y" * up_bytes[t.client_id], 10) for t in run]
    discard, metrics = clock.finish(r, messages + absent)
    return run, absent, discard, metrics


def _work(examples=(100, 100, 100), macs=1e6, epochs=1):
    return Workload(
        examples=list(examples),
        batch_size=10,
        drop_last=False,
        accumulate_grad_batches=1,
        local_epochs=epochs,
        macs_per_sample=lambda cid: macs,
    )


def test_round_time_matches_hand_computation(tmp_path):
    clock = SimulatedClock(profiles=_fleet(tmp_path))
    clock.bind(3, 3, seed=0)
    _, _, discard, m = _round(clock, [1000, 1000, 1000], [500, 500, 500], _work())
    # client 0: down 8*1000/4e6 = 0.002; compute 1e6 MACs * 100 samples * 3 * 2 / 1e9 = 0.6; up 8*500/1e6 = 0.004
    hand = [0.002 + 0.6 + 0.004, 0.001 + 0.3 + 0.002, 0.0005 + 0.15 + 0.001]
    assert [t.finish_s for t in clock.rows] == pytest.approx(hand, rel=1e-12)
    assert m["sim_round_s"] == pytest.approx(hand[0]) and m["sim_time_s"] == pytest.approx(hand[0])
    assert discard == {} and all(t.status == "ok" for t in clock.rows)
    assert FORWARD_BACKWARD == 3 and FLOPS_PER_MAC == 2
    _round(clock, [1000, 1000, 1000], [500, 500, 500], _work(), r=1)
    assert clock.time_s == pytest.approx(2 * hand[0])


def test_deadline_drops_the_late_clients(tmp_path):
    clock = SimulatedClock(profiles=_fleet(tmp_path), deadline=0.5)
    clock.bind(3, 3, seed=0)
    run, absent, discard, m = _round(clock, [1000] * 3, [500] * 3, _work())
    assert len(run) == 3 and absent == []  # everyone trains; the late reply is discarded when it arrives
    assert list(discard) == [0] and "client 0 past the deadline: it finished at 0.606" in discard[0]
    assert m["sim_round_s"] == 0.5 and m["sim_late"] == 1  # the server waited until the deadline


def test_partial_work_truncates_to_the_steps_that_fit(tmp_path):
    clock = SimulatedClock(profiles=_fleet(tmp_path), deadline=0.5, straggler="partial")
    clock.bind(3, 3, seed=0)
    run, _, discard, m = _round(clock, [1000] * 3, [500] * 3, _work())
    caps = {t.client_id: t.config.get("max_steps") for t in run}
    # client 0: a step (10 samples) costs 1e6 * 10 * 6 / 1e9 = 0.06 s; the budget is 0.5 - 0.002 (down)
    # - 8 * 4000 / 1e6 (uplink estimate: the uncompressed payload) = 0.466 s -> 7 of its 10 steps
    assert caps == {0: 7, 1: None, 2: None}
    row0 = clock.rows[0]
    assert (row0.status, row0.samples, row0.max_steps) == ("partial", 70, 7)
    assert row0.compute_s == pytest.approx(1e6 * 70 * 6 / 1e9)
    assert discard == {} and m["sim_partial"] == 1 and m["sim_late"] == 0
    assert m["sim_round_s"] == pytest.approx(max(t.finish_s for t in clock.rows))
    # the next round estimates the uplink from the client's previous reply (500 bytes): 0.494 s -> 8 steps
    run, _, _, _ = _round(clock, [1000] * 3, [500] * 3, _work(), r=1)
    assert run[0].config["max_steps"] == 8


def test_partial_work_with_no_step_that_fits_is_dropped_before_training(tmp_path):
    clock = SimulatedClock(profiles=_fleet(tmp_path), deadline=0.06, straggler="partial")
    clock.bind(3, 3, seed=0)
    run, absent, discard, m = _round(clock, [1000] * 3, [500] * 3, _work())
    # budgets (deadline - downlink - uplink estimate of 4,000 bytes) over step times: client 0 (0.06 - 0.002 -
    # 0.032) / 0.06 -> 0 steps; client 1 (0.06 - 0.001 - 0.016) / 0.03 -> 1; client 2 (0.06 - 0.0005 - 0.008) / 0.015 -> 3
    assert [t.client_id for t in run] == [1, 2] and [t.config["max_steps"] for t in run] == [1, 3]
    assert [msg.client_id for msg in absent] == [0] and "not one local step fits" in absent[0].failure
    assert discard == {}
    assert [t.status for t in clock.rows] == ["no_step", "partial", "partial"]
    assert m["sim_late"] == 1 and m["sim_round_s"] == 0.06  # someone never reported: the server waited


def test_over_selection_keeps_the_first_k(tmp_path):
    clock = SimulatedClock(profiles=_fleet(tmp_path), keep_first=2)
    clock.bind(3, 3, seed=0)
    # client 2 is slowed by a large reply: 8 * 400000 / 4e6 = 0.8 s of uplink, so clients 1 and 0 arrive first
    _, _, discard, m = _round(clock, [1000] * 3, [500, 500, 400_000], _work())
    assert discard == {2: "client 2 not among the first 2 to arrive"}
    assert [t.status for t in clock.rows] == ["ok", "ok", "extra"]
    assert m["sim_round_s"] == pytest.approx(clock.rows[0].finish_s) and m["sim_extra"] == 1


def test_dropouts_are_seeded_by_round_and_client(tmp_path):
    rows = [f"{c},1e9,1e6,1e6,0.3" for c in range(50)]
    profiles = ClientProfiles(csv=_csv(tmp_path, rows))
    a, b = SimulatedClock(profiles=profiles), SimulatedClock(profiles=profiles)
    a.bind(50, 50, seed=7)
    b.bind(50, 50, seed=7)
    draws = [[a.drops_out(r, c) for c in range(50)] for r in range(40)]
    assert draws == [[b.drops_out(r, c) for c in reversed(range(50))][::-1] for r in range(40)]  # order-free
    assert 0.25 < sum(map(sum, draws)) / 2000 < 0.35
    b.bind(50, 50, seed=8)
    assert draws != [[b.drops_out(r, c) for c in range(50)] for r in range(40)]
    off = SimulatedClock(profiles=profiles, dropouts=False)
    off.bind(50, 50, seed=7)
    assert not any(off.drops_out(r, c) for r in range(40) for c in range(50))


def test_samples_processed():
    assert samples_processed(100, 2, 16) == 200
    assert samples_processed(100, 2, 16, max_steps=9) == 100 + 2 * 16  # 7 steps an epoch
    assert samples_processed(100, 2, 16, drop_last=True) == 192
    assert samples_processed(100, 1, 10, accumulate=3, max_steps=2) == 60
    assert samples_processed(100, 1, 10, max_steps=100) == 100


# ------------------------------------------------------------------ in the loop
def test_clock_in_the_loop_against_hand_computation(tmp_path, make_loop, small_dm):
    from conftest import seeded

    from lightning_fed.models import MNIST1DMLP

    profiles = ClientProfiles(csv=_csv(tmp_path, ["0,1e9,1e6,4e6,0", "1,2e9,2e6,8e6,0"]))
    loop = make_loop(num_clients=2, clients_per_round=2, rounds=1, clock=SimulatedClock(profiles=profiles))
    res = loop.fit(seeded(MNIST1DMLP), small_dm)
    rows = list(csv.DictReader((res.run_dir / "clock.csv").open()))
    sizes = {
        int(r["client"]): int(r["samples"]) for r in csv.DictReader((res.run_dir / "partition.csv").open())
    }
    macs = (
        (40 * 100 + 100) + 100 + (100 * 100 + 100) + 100 + (100 * 10 + 10)
    )  # linear + bias, ReLU (as counted)
    h = res.history[0]
    assert sum(int(r["bytes_up"]) for r in rows) == h["bytes_up"]
    assert sum(int(r["bytes_down"]) for r in rows) == h["bytes_down"]
    finish = []
    for r, (flops, up, down) in zip(rows, [(1e9, 1e6, 4e6), (2e9, 2e6, 8e6)], strict=True):
        c = int(r["client_id"])
        assert int(r["samples"]) == sizes[c]  # one local epoch over its shard
        hand = 8 * int(r["bytes_down"]) / down + macs * sizes[c] * 3 * 2 / flops + 8 * int(r["bytes_up"]) / up
        assert float(r["finish_s"]) == pytest.approx(hand, rel=1e-5)  # the CSV keeps 6 significant digits
        finish.append(hand)
    assert h["sim_round_s"] == pytest.approx(max(finish)) and h["sim_time_s"] == h["sim_round_s"]


def test_partial_work_caps_local_steps_in_the_loop(tmp_path, make_loop, small_dm):
    from conftest import seeded

    from lightning_fed.callbacks.base import FedCallback
    from lightning_fed.models import MNIST1DMLP

    class Steps(FedCallback):
        def __init__(self):
            self.seen = {}

        def on_client_end(self, trainer, pl_module, reply):
            self.seen[(trainer.fed.round, reply.client_id)] = trainer.global_step

    # client 0: a 32-sample step costs 15410 MACs * 32 * 6 / 6e7 = 0.049 s: about 6 of its 26 steps fit in 0.3 s
    profiles = ClientProfiles(csv=_csv(tmp_path, ["0,6e7,1e9,1e9,0", "1,1e12,1e9,1e9,0"]))
    clock = SimulatedClock(profiles=profiles, deadline=0.3, straggler="partial")
    cb = Steps()
    res = make_loop(
        num_clients=2, clients_per_round=2, rounds=2, local_epochs=2, clock=clock, callbacks=[cb]
    ).fit(seeded(MNIST1DMLP), small_dm)
    rows = list(csv.DictReader((res.run_dir / "clock.csv").open()))
    slow = [r for r in rows if r["client_id"] == "0"]
    fast = [r for r in rows if r["client_id"] == "1"]
    assert all(r["status"] == "partial" for r in slow) and all(r["status"] == "ok" for r in fast)
    for r in slow:  # the slow client's local steps stop at its cap, the fast one runs its 2 epochs
        assert cb.seen[(int(r["round"]), 0)] == int(r["max_steps"]) >= 1
        assert float(r["finish_s"]) <= 0.3
    n_fast = math.ceil(int(fast[0]["samples"]) / 2 / 32) * 2
    assert cb.seen[(0, 1)] == n_fast
    assert [h["sim_partial"] for h in res.history] == [1, 1]


def test_local_trainer_refuses_a_bad_step_cap(make_loop, small_dm):
    from conftest import seeded

    from lightning_fed.callbacks.base import FedCallback
    from lightning_fed.models import MNIST1DMLP

    class ZeroCap(FedCallback):
        def on_round_start(self, trainer, pl_module, instructions):
            for instr in instructions:
                instr.config["max_steps"] = 0

    from lightning_fed.errors import RoundsFailed

    with pytest.raises(RoundsFailed, match="max_steps=0 is not allowed"):
        make_loop(rounds=1, callbacks=[ZeroCap()]).fit(seeded(MNIST1DMLP), small_dm)
    assert issubclass(ClientTrainingError, Exception)


def test_clock_csv_and_plot(tmp_path, make_loop, small_dm):
    from conftest import seeded

    from lightning_fed.models import MNIST1DMLP
    from lightning_fed.report import plot_history

    loop = make_loop(rounds=2, clock=SimulatedClock(profiles=ClientProfiles(preset="heterogeneous")))
    res = loop.fit(seeded(MNIST1DMLP), small_dm)
    times = [h["sim_time_s"] for h in res.history]
    assert times[1] == pytest.approx(times[0] + res.history[1]["sim_round_s"]) and times[0] > 0
    assert len(list(csv.DictReader((res.run_dir / "clock.csv").open()))) == 4  # 2 rounds x 2 clients
    again = make_loop(rounds=2, clock=loop.clock).fit(
        seeded(MNIST1DMLP), small_dm
    )  # the same clock, a new run
    assert [h["sim_time_s"] for h in again.history] == times
    from lightning_fed.report import summary_table

    cells = dict(zip(*(c._cells for c in summary_table(res.history).columns), strict=True))
    assert cells["simulated time"] == f"{times[1]:.4g} s" and "wall time" in cells
    from PIL import Image

    with_time = plot_history(res.history, tmp_path / "acc.png")
    without = plot_history(
        [{k: v for k, v in h.items() if not k.startswith("sim_")} for h in res.history],
        tmp_path / "plain.png",
    )
    assert (
        Image.open(with_time).width > Image.open(without).width
    )  # a third panel: accuracy against simulated time


def test_step_cap_matches_lightning_trainer_max_steps(tmp_path):
    import copy

    import lightning as L
    from test_parity import SEED, Base, Capture, TensorDM, assert_same_weights, client_batches
    from torch.utils.data import DataLoader

    from lightning_fed import FedLoop
    from lightning_fed.callbacks.base import FedCallback
    from lightning_fed.data import IID

    class Cap(FedCallback):
        def on_round_start(self, trainer, pl_module, instructions):
            for instr in instructions:
                instr.config["max_steps"] = 4  # of the epoch's 7 batches

    L.seed_everything(0, verbose=False)
    model, dm, fed, trn = Base(), TensorDM(), Capture(), Capture()
    loop = FedLoop(
        num_clients=1,
        clients_per_round=1,
        rounds=1,
        local_epochs=1,
        partition=IID(),
        seed=SEED,
        output_dir=str(tmp_path),
        verbose=False,
        plot=False,
        loggers=[],
        checkpoint_every=0,
        callbacks=[Cap(), fed],
    )
    loop.fit(copy.deepcopy(model), dm)
    trainer = L.Trainer(
        max_epochs=1,
        max_steps=4,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[trn],
    )
    trainer.fit(copy.deepcopy(model), DataLoader(client_batches(dm), batch_size=None))
    assert len(fed.inputs) == len(trn.inputs) == 4
    for a, b in zip(fed.inputs, trn.inputs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_same_weights(fed, trn)


def test_resume_refuses_another_clock(tmp_path, make_loop, small_dm):
    from conftest import seeded

    from lightning_fed.identity import ResumeMismatch
    from lightning_fed.models import MNIST1DMLP

    out = str(tmp_path / "o")
    res = make_loop(rounds=1, checkpoint_every=1, output_dir=out, clock=SimulatedClock(deadline=0.1)).fit(
        seeded(MNIST1DMLP), small_dm
    )
    with pytest.raises(ResumeMismatch, match=r"clock: SimulatedClock\(.*deadline=0.1.* in the checkpoint"):
        make_loop(rounds=2, output_dir=out, clock=SimulatedClock(deadline=0.2)).fit(
            seeded(MNIST1DMLP), small_dm, resume=str(res.run_dir)
        )


def test_two_processes_match_one_with_downlink_deltas(tmp_path):
    import json
    from pathlib import Path

    from test_parallel import SMALL, _assert_same, _flatten, _ranks, _state

    from lightning_fed.cli import run

    recipe = Path(__file__).parents[1] / "recipes" / "mnist1d" / "stragglers_deadline.yaml"
    delta = json.dumps(
        {
            "class_path": "lightning_fed.codecs.DownlinkDelta",
            "init_args": {"inner": {"class_path": "lightning_fed.codecs.Blockwise8bit"}},
        }
    )
    args = ["--config", str(recipe), *SMALL, "--loop.rounds", "3", "--loop.downlink_codec", delta]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(["fit", *args, "--loop.output_dir", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(before)
    _ranks([*args, "--loop.output_dir", str(tmp_path / "many")], 2)
    _assert_same(_state(tmp_path / "one"), _state(tmp_path / "many"), "downlink deltas: 2 processes vs one")
    (one_ckpt,) = (tmp_path / "one").glob("version_*/checkpoints/round-000003")
    (many_ckpt,) = (tmp_path / "many").glob("version_*/checkpoints/round-000003")
    files = sorted((one_ckpt / "receivers").glob("client-*.pt"))
    assert files and [f.name for f in files] == sorted(
        f.name for f in (many_ckpt / "receivers").glob("client-*.pt")
    )
    for f in (
        files
    ):  # the server's per-receiver references (acknowledged, and pending for clients that dropped out)
        a = _flatten(torch.load(f, weights_only=True))
        b = _flatten(torch.load(many_ckpt / "receivers" / f.name, weights_only=True))
        assert a.keys() == b.keys() and any(k.endswith("weight") for k in a)
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_discarded_replies_keep_stateful_codecs_in_step(tmp_path, make_loop, small_dm):
    from conftest import seeded

    from lightning_fed.codecs import Differential, TopK
    from lightning_fed.models import MNIST1DMLP

    # 3 of 4 clients sampled, the first 2 kept; clients 2 and 3 are slow (3 the slowest). The server still decodes a
    # discarded reply, so its copy of that sender's differential reference advances with the sender's own, and the
    # sender's next reply, when it is kept, is not refused
    profiles = ClientProfiles(
        csv=_csv(tmp_path, ["0,1e12,1e9,1e9,0", "1,1e12,1e9,1e9,0", "2,1e9,1e7,1e7,0", "3,1e8,1e6,1e6,0"])
    )
    loop = make_loop(
        num_clients=4,
        clients_per_round=3,
        rounds=8,
        codec=Differential(TopK(0.1)),
        clock=SimulatedClock(profiles=profiles, keep_first=2),
    )
    res = loop.fit(seeded(MNIST1DMLP), small_dm)
    rows = list(csv.DictReader((res.run_dir / "clock.csv").open()))
    two = [r["status"] for r in rows if r["client_id"] == "2"]
    assert "extra" in two and "ok" in two[two.index("extra") :]  # discarded, then kept later
    assert all(h["good"] == 2 for h in res.history)
    assert sum(h["rejected"] for h in res.history) == 0
