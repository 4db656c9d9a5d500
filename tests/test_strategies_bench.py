"""The measures of benchmarks/strategies.py against hand computations: a final accuracy is the mean of the last
evaluations, and "rounds to FedAvg" is the first round whose trailing mean reaches the target, measured the same way
for every strategy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("strategies_bench", ROOT / "benchmarks" / "strategies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trailing_mean_by_hand(bench):
    accs = [0.1, 0.4, 0.7, 0.2]
    assert bench.trailing_mean(accs, 3) == pytest.approx([0.1, 0.25, 0.4, 13 / 30])
    assert bench.trailing_mean(accs, 1) == accs
    assert bench.final_acc(accs, 3) == pytest.approx(13 / 30)
    assert bench.final_acc(accs, 1) == 0.2


def test_one_lucky_evaluation_does_not_reach_the_target(bench):
    fedavg = [0.5, 0.8, 0.82, 0.84]  # final (last 3): 0.82
    spike = [0.5, 0.9, 0.6, 0.7, 0.85, 0.9, 0.8]  # a single 0.9 in round 2
    target = bench.final_acc(fedavg, 3)
    # trailing means from round 3: 0.667, 0.733, 0.717, 0.817, 0.85
    assert bench.rounds_to(spike, target, 3) == 7
    assert bench.rounds_to(spike, target, 1) == 2  # the single-evaluation measure counts the spike
    assert bench.rounds_to(fedavg, target, 3) == 4  # FedAvg reaches its own final accuracy at its last round
    assert bench.rounds_to([0.1, 0.2], 0.9, 3) is None
