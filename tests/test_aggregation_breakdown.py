"""benchmarks/aggregation_breakdown.py: the steps of a reply's path are timed in the server's timed round, each
step where the reply's path goes (a small float32 reply judged first), and the server is left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_benchmark

from lightning_fed import server as server_mod
from lightning_fed.codecs import deferred
from lightning_fed.strategies import aggregate


def test_the_breakdown_times_the_path_of_a_reply_judged_first_and_restores_the_server(monkeypatch):
    pytest.importorskip("numba")  # the benchmark compiles a kernel of its own
    monkeypatch.syspath_prepend(
        str(Path(__file__).resolve().parents[1] / "benchmarks")
    )  # it imports aggregation
    bench = load_benchmark("aggregation_breakdown")
    wrapped = (
        server_mod.Server.receive,
        server_mod.Server.collect,
        aggregate.MeanFold.add_released,
        aggregate.measure,
        deferred.FlatValues.add_into,
    )
    steps, ours, floor = bench.in_server("identity", 4096, 5, 1, judge_first=True)
    assert {
        "Server.receive",
        "MeanFold.add_released",
        "kernels.measure (judged first)",
        "FlatValues.add_into (torch add_)",
        "Identity.decode_deferred",
    } <= set(steps)
    assert "BlockwiseCodes.add_measure (8-bit fold)" not in steps  # not this codec's path
    assert ours > 0 and floor > 0
    assert (
        server_mod.Server.receive,
        server_mod.Server.collect,
        aggregate.MeanFold.add_released,
        aggregate.measure,
        deferred.FlatValues.add_into,
    ) == wrapped


def test_the_breakdown_by_default_times_the_checked_pass(monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = load_benchmark("aggregation_breakdown")
    steps, _, _ = bench.in_server("identity", 4096, 5, 1)
    assert {"MeanFold._add_checked (the checked pass)", "kernels.axpy_checked_"} <= set(steps)
    assert "FlatValues.add_measure (added first, fused)" not in steps and "kernels.measure (judged first)" not in steps


def test_the_breakdown_with_replay_undo_times_the_fused_pass_and_the_add_aside(monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = load_benchmark("aggregation_breakdown")
    steps, _, _ = bench.in_server("identity", 4096, 5, 1, hold_bytes=3 * 4096 * 4, replay=True)
    assert "FlatValues.add_measure (added first, fused)" in steps
    assert "MeanFold._axpy_to_other (added aside: the snapshot)" in steps
    assert "kernels.measure (judged first)" not in steps and "FlatValues.add_into (torch add_)" not in steps


def test_the_kernels_alone_table_times_every_kernel(monkeypatch):
    """Each kernel of the "kernels alone" table runs with the arguments its compiled loop takes now."""
    pytest.importorskip("numba")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = load_benchmark("aggregation_breakdown")
    times = bench.kernels_alone(2048, 2, 1)
    assert "axpy_checked, a fresh accumulator (a fold's first)" in times
    assert all(0 < best <= median for best, median in times.values())
