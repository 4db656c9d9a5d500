"""benchmarks/robustness.py in its quick mode: every requested cell is produced, the post-training defences repair
copies of the undefended backdoor run only, detection is reported where a rule detects, saved results reload."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("robustness_bench", ROOT / "benchmarks" / "robustness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_mode_produces_every_requested_cell(bench, tmp_path, capsys):
    out = tmp_path / "cells.json"
    rows = bench.main(
        [
            "--quick",
            "--fractions",
            "0.2",
            "--attacks",
            "clean",
            "sign_flip",
            "backdoor",
            "--defences",
            "none",
            "krum",
            "fp",
            "nad",
            "mcr",
            "fp+nad",
            "feddf",
            "--json",
            str(out),
        ]
    )
    cells = {(r["attack"], r["defence"]) for r in rows}
    assert cells == {
        ("clean", "none"),
        ("sign_flip", "none"),
        ("sign_flip", "krum"),
        ("backdoor", "none"),
        ("backdoor", "krum"),
        ("backdoor", "fp"),
        ("backdoor", "nad"),
        ("backdoor", "mcr"),
        ("backdoor", "fp+nad"),
        ("backdoor", "feddf"),
    }
    assert all(0.0 <= r["acc"] <= 1.0 and 0.0 <= r["asr"] <= 1.0 for r in rows)
    krum = [r for r in rows if r["defence"] == "krum"]
    assert all(set(r["detection"]) == {"precision", "recall", "tp", "fp", "fn"} for r in krum)
    assert all(
        r["detection"]["tp"] + r["detection"]["fn"] > 0 for r in krum
    )  # the malicious clients were sampled
    printed = capsys.readouterr().out
    assert "n/a¹" in printed and "multi-Krum" in printed
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    again = bench.main(["--load", str(out)])
    assert len(again) == len(rows)


def test_post_training_defences_leave_the_trained_model_alone(bench):
    import torch

    from lightning_fed.data import PublicData

    args = bench.parse(["--quick"])
    model = bench.seeded_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clean = PublicData(num_samples=60, seed=7, labeled=True)
    fixed = bench.repair(model, bench.post_defence("fp+nad", clean, 0, args), 0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert fixed.conv3.out_channels < model.conv3.out_channels  # pruned, and the original is not
