"""docs/privacy.md stays true: its examples run (smaller data, in a temporary folder), in order."""

import math
import re
from pathlib import Path

import pytest

DOC = (Path(__file__).parents[1] / "docs" / "privacy.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", DOC, flags=re.DOTALL)


def _shrink(code: str, tmp_path: Path) -> str:
    code = re.sub(r'output_dir="runs/[^"]*"', f'output_dir="{tmp_path}"', code)
    return code.replace(
        "MNIST1DDataModule(batch_size=16)", "MNIST1DDataModule(batch_size=16, num_samples=1000)"
    )


@pytest.fixture(scope="module")
def scopes(tmp_path_factory):
    scope: dict = {"print": lambda *args: None}
    out = []
    for i, block in enumerate(BLOCKS):
        exec(compile(_shrink(block, tmp_path_factory.mktemp(f"b{i}")), "docs/privacy.md", "exec"), scope)  # noqa: S102
        out.append({"history": scope["result"].history, "strategy": scope.get("strategy")})
    return out


def test_there_are_four_examples():
    assert len(BLOCKS) == 4


def test_central_example_logs_a_growing_epsilon(scopes):
    eps = [h["dp_epsilon"] for h in scopes[0]["history"]]
    assert len(eps) == 3 and 0 < eps[0] < eps[1] < eps[2] < 10.0
    assert scopes[0]["strategy"].epsilon() == eps[-1]


def test_adaptive_example_moves_the_bound(scopes):
    clips = [h["dp_clip"] for h in scopes[1]["history"]]
    assert clips[0] == 1.0 and clips[1] != clips[0]


def test_local_and_dp_sgd_examples_report_finite_epsilons(scopes):
    assert math.isfinite(scopes[2]["history"][-1]["ldp_epsilon"])
    assert math.isfinite(scopes[3]["history"][-1]["dpsgd_epsilon"])
