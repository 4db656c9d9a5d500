"""docs/personalization.md stays true: its example runs (in a temporary folder) and its CSV recomputes the mean."""

import re
from pathlib import Path

import pytest

DOC = (Path(__file__).parents[1] / "docs" / "personalization.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", DOC, flags=re.DOTALL)


def test_example_runs_and_the_csv_gives_the_logged_mean(tmp_path):
    assert len(BLOCKS) == 1
    code = re.sub(r'output_dir="runs/[^"]*"', f'output_dir="{tmp_path}"', BLOCKS[0])
    printed = []
    scope = {"print": lambda *args: printed.append(args)}
    exec(compile(code, "docs/personalization.md", "exec"), scope)  # noqa: S102 - the documented example itself
    last = scope["last"]
    assert len(scope["rows"]) == 6
    assert printed[1][0] == pytest.approx(last["personal/acc_mean"], abs=1e-12)
    assert 0.0 <= last["personal/acc_p10"] <= last["personal/acc_mean"] <= 1.0


def test_the_quoted_error_is_the_real_one():
    from lightning_fed.models import MNIST1DCNN
    from lightning_fed.strategies import FedPer

    quoted = re.search(r"`(FedPer: personal_layers=\['fc9'\].*?)`", DOC, flags=re.DOTALL).group(1)
    with pytest.raises(ValueError) as err:
        FedPer(personal_layers=["fc9"]).check_model(MNIST1DCNN())
    assert str(err.value) == " ".join(quoted.split())
