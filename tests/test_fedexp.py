"""FedExP: the server step size and update against a hand computation on two tiny replies (example-weighted and plain
mean), the floor at FedAvg's step, the average of the last two iterates, the state, resume through the CLI, and the
refusals."""

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_fed.checkpoint import find_checkpoint, load_checkpoint
from lightning_fed.cli import run
from lightning_fed.protocol import Reply
from lightning_fed.strategies import CoordinateMedian, FedAvg, FedExP, UniformMean
from lightning_fed.strategies.fedexp import fedexp_step

RECIPE = Path(__file__).parents[1] / "recipes" / "mnist1d" / "fedexp.yaml"
X0 = [0.5, -1.0]


def _model() -> nn.Module:
    m = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([X0]))
    return m


def _setup(strategy):
    strategy.setup(_model())
    return strategy


def _replies(d1, d2, n1=1, n2=3):
    return [Reply(0, {"weight": torch.tensor([d1])}, n1), Reply(1, {"weight": torch.tensor([d2])}, n2)]


def test_plain_mean_step_by_hand():
    """d_1 = (2, 0), d_2 = (-1, 1): mean (0.5, 0.5), |mean|^2 = 0.5, sum |d_i|^2 = 6, M = 2:
    step = 6 / (2 * 2 * (0.5 + 1e-3)) = 2.99401..."""
    s = _setup(FedExP(aggregator=UniformMean()))
    metrics = s.aggregate(0, _replies([2.0, 0.0], [-1.0, 1.0]))
    step = 6 / (4 * (0.5 + 1e-3))
    assert metrics["server_step"] == pytest.approx(step, rel=1e-6) and s.last_step == metrics["server_step"]
    assert s.global_flat.tolist() == pytest.approx([0.5 + step * 0.5, -1.0 + step * 0.5], rel=1e-6)


def test_example_weighted_step_by_hand():
    """Counts 1 and 3: p = (0.25, 0.75), mean (-0.25, 0.75), |mean|^2 = 0.625, sum p_i |d_i|^2 = 2.5:
    step = 2.5 / (2 * (0.625 + 1e-3)) = 1.99680..."""
    s = _setup(FedExP())
    s.aggregate(0, _replies([2.0, 0.0], [-1.0, 1.0]))
    step = 2.5 / (2 * (0.625 + 1e-3))
    assert s.last_step == pytest.approx(step, rel=1e-6)
    assert s.global_flat.tolist() == pytest.approx([0.5 - step * 0.25, -1.0 + step * 0.75], abs=1e-6)


def test_against_an_independent_float64_computation_on_random_replies():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(1, 2, generator=g, dtype=torch.float64) for _ in range(5)]
    counts = [3, 1, 4, 1, 5]
    s = _setup(FedExP(eps=1e-2))
    s.aggregate(0, [Reply(i, {"weight": d.float()}, n) for i, (d, n) in enumerate(zip(deltas, counts))])
    p = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    stacked = torch.stack([d.reshape(-1) for d in deltas])
    mean = (p[:, None] * stacked).sum(0)
    step = max(1.0, float((p * stacked.pow(2).sum(1)).sum() / (2 * (mean.pow(2).sum() + 1e-2))))
    assert step > 1
    assert s.last_step == pytest.approx(step, rel=1e-5)
    assert s.global_flat.double() == pytest.approx(
        torch.tensor(X0, dtype=torch.float64) + step * mean, abs=1e-6
    )


def test_agreeing_clients_take_fedavgs_step():
    """Equal deltas: sum p_i |d_i|^2 / (2 |d|^2) = 1/2, so the step is FedAvg's 1 and the update FedAvg's, bit for bit."""
    replies = _replies([0.3, -0.2], [0.3, -0.2])
    s, ref = _setup(FedExP()), _setup(FedAvg())
    s.aggregate(0, replies)
    ref.aggregate(0, replies)
    assert s.last_step == 1.0 and torch.equal(s.global_flat, ref.global_flat)
    assert fedexp_step([1.0, 1.0], [0.5, 0.5], 0.0, 1e-3) == pytest.approx(
        1 / 2e-3
    )  # bounded by eps at d = 0


def test_average_of_the_last_two_iterates_and_state_round_trip():
    s = _setup(FedExP(average_last=True))
    model = _model()
    s.load_global(model)  # no step yet: x_0
    assert model.weight.reshape(-1).tolist() == X0
    s.aggregate(0, _replies([2.0, 0.0], [-1.0, 1.0]))
    x1 = s.global_flat.clone()
    s.aggregate(1, _replies([0.0, 1.0], [1.0, 0.0]))
    s.load_global(model)
    assert model.weight.reshape(-1).tolist() == pytest.approx(((x1 + s.global_flat) / 2).tolist(), rel=1e-6)
    assert not torch.equal(x1, s.global_flat)
    t = _setup(FedExP(average_last=True))
    t.load_state_dict(s.state_dict())
    assert torch.equal(t.global_flat, s.global_flat) and t.last_step == s.last_step
    other = _model()
    t.load_global(other)
    assert torch.equal(other.weight, model.weight)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 0.0}, "eps=0.0 is not allowed; eps must be a number > 0"),
        ({"eps": True}, "eps=True is not allowed"),
        (
            {"aggregator": CoordinateMedian()},
            "aggregator=.* is not allowed; FedExP's step size is defined for a mean",
        ),
        ({"average_last": "yes"}, "average_last='yes' is not allowed"),
    ],
)
def test_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FedExP(**kwargs)


def test_recipe_extrapolates_and_resumes_exactly_with_the_average(tmp_path):
    """fedexp.yaml with average_last on, 3 rounds against 1 round resumed to 3: same strategy state, same history of
    test accuracy; the step exceeds FedAvg's in some round on the recipe's non-IID split."""
    cfg = [
        "fit",
        "--config",
        str(RECIPE),
        "--loop.verbose",
        "false",
        "--loop.plot",
        "false",
        "--loop.eval_every",
        "1",
        "--loop.checkpoint_every",
        "1",
        "--loop.local_epochs",
        "1",
        "--loop.strategy.init_args.average_last",
        "true",
    ]
    full = run([*cfg, "--loop.rounds", "3", "--loop.output_dir", str(tmp_path / "full")])
    part = run([*cfg, "--loop.rounds", "1", "--loop.output_dir", str(tmp_path / "part")])
    resumed = run(
        [
            *cfg,
            "--loop.rounds",
            "3",
            "--loop.output_dir",
            str(tmp_path / "part"),
            "--resume",
            str(part.run_dir),
        ]
    )
    steps = [h["server_step"] for h in full.history]
    assert min(steps) >= 1.0 and max(steps) > 1.0
    assert steps == [h["server_step"] for h in resumed.history]
    a = load_checkpoint(find_checkpoint(full.run_dir))["strategy"]
    b = load_checkpoint(find_checkpoint(resumed.run_dir))["strategy"]
    assert torch.equal(a["global_flat"], b["global_flat"]) and torch.equal(a["prev_flat"], b["prev_flat"])
    assert [h.get("val_acc") for h in full.history] == [h.get("val_acc") for h in resumed.history]


def test_doc_example_runs(tmp_path):
    import re

    doc = (Path(__file__).parents[1] / "docs" / "strategies.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL) if "FedExP(" in c)
    scope: dict = {}
    exec(compile(code.replace('"runs/fedexp"', f'"{tmp_path}"'), "docs/strategies.md", "exec"), scope)  # noqa: S102
    assert all(h["server_step"] >= 1.0 for h in scope["result"].history)
