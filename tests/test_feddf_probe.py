"""benchmarks/feddf_probe.py: the recording FedDF distills exactly as FedDF does and records what a hand computation
says the teacher and the student label as the backdoor's target."""

from __future__ import annotations

import copy

import torch
from conftest import load_benchmark
from torch import nn

from lightning_fed.data import PublicData
from lightning_fed.strategies import FedDF


def test_recording_fed_df_distills_as_fed_df_and_records_the_target_shares():
    probe = load_benchmark("feddf_probe")
    target = probe.rb.TARGET
    torch.manual_seed(0)
    x = torch.randn(8, 40)
    teacher = torch.zeros(8, 10)
    teacher[:3, target] = 4.0  # three of eight records: the target
    teacher[3:, 5] = 3.0
    student = nn.Sequential(nn.Flatten(), nn.Linear(40, 10))
    kwargs = {"public": PublicData(num_samples=20, seed=7), "proxy_size": 8, "distill_steps": 5, "seed": 0}
    recording, plain = probe.RecordingFedDF(**kwargs), FedDF(**kwargs)
    assert probe.BUILT[-1] is recording
    with torch.no_grad():
        before = float((student(x).argmax(1) == target).float().mean())
    ours, theirs = copy.deepcopy(student), copy.deepcopy(student)
    loss = recording._distill(ours, x, teacher, torch.Generator().manual_seed(3))
    assert loss == plain._distill(theirs, x, teacher, torch.Generator().manual_seed(3))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        after = float((ours(x).argmax(1) == target).float().mean())
    (got,) = recording.records
    assert got["teacher_target"] == 3 / 8
    assert abs(got["teacher_norm"] - (3 * 4.0 + 5 * 3.0) / 8) < 1e-6
    assert got["average_target"] == before
    assert got["distilled_target"] == after
