"""benchmarks/privacy.py: each row records its seed, several seeds of a cell merge into mean +- sd, and a tiny run
reports the epsilon its accountant spent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("privacy")


def _row(method: str, eps: float, seed: int, acc: float) -> dict:
    return {"method": method, "target_eps": eps, "seed": seed, "test_acc": acc}


def test_summarize_gives_each_cell_the_mean_and_sample_sd_over_its_seeds(bench):
    rows = [
        _row("fedavg", math.inf, 0, 0.90),
        _row("central", 8.0, 0, 0.80),
        _row("fedavg", math.inf, 1, 0.92),
        _row("central", 4.0, 0, 0.70),
        _row("fedavg", math.inf, 2, 0.94),
        _row("central", 8.0, 1, 0.84),
    ]
    cells = bench.summarize(rows)
    assert [(c["method"], c["target_eps"]) for c in cells] == [
        ("fedavg", math.inf),
        ("central", 8.0),
        ("central", 4.0),
    ]
    fed, c8, c4 = cells
    assert (fed["n"], fed["seeds"]) == (3, [0, 1, 2])
    assert fed["mean"] == pytest.approx(0.92)
    assert fed["sd"] == pytest.approx(0.02)  # sqrt((0.02^2 + 0 + 0.02^2) / 2)
    assert c8["mean"] == pytest.approx(0.82)
    assert c8["sd"] == pytest.approx(math.sqrt(0.02**2 * 2))  # two seeds: sqrt(2 * 0.02^2 / 1)
    assert (c4["n"], c4["sd"]) == (1, 0.0)


def test_seeded_runs_merge_into_one_table_with_the_mean_over_seeds(bench, tmp_path, capsys):
    tiny = ["--clients", "20", "--train", "400", "--per_round", "5", "--rounds", "2", "--local_epochs", "1"]
    tiny += ["--methods", "fedavg", "central", "--epsilons", "8", "--runs", str(tmp_path / "runs")]
    outs = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}.json"
        rows = bench.main([*tiny, "--seed", str(seed), "--out", str(out)])
        assert [(r["method"], r["target_eps"], r["seed"]) for r in rows] == [
            ("fedavg", math.inf, seed),
            ("central", 8.0, seed),
        ]
        assert rows[1]["noise_multiplier"] > 0
        assert rows[1]["eps"] == pytest.approx(8.0, abs=0.05)  # calibrated for the 2 rounds actually run
        saved = json.loads(out.read_text())["rows"]
        assert [(r["seed"], r["test_acc"], r["eps"]) for r in saved] == [
            (r["seed"], r["test_acc"], r["eps"]) for r in rows
        ]
        outs.append(out)
    capsys.readouterr()
    merged = bench.main(["--merge", *map(str, outs)])
    assert [r["seed"] for r in merged] == [0, 0, 1, 1]
    cells = bench.summarize(merged)
    assert [(c["method"], c["n"]) for c in cells] == [("fedavg", 2), ("central", 2)]
    assert "mean +- sd over seeds" in capsys.readouterr().out
