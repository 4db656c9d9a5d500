"""docs/secure-aggregation.md stays true: its example runs (in a temporary folder)."""

import re
from pathlib import Path

DOC = (Path(__file__).parents[1] / "docs" / "secure-aggregation.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", DOC, flags=re.DOTALL)


def test_secure_aggregation_example_runs(tmp_path):
    assert len(BLOCKS) == 2
    code = re.sub(r'output_dir="runs/[^"]*"', f'output_dir="{tmp_path}"', BLOCKS[0])
    scope: dict = {"print": lambda *args: None}
    exec(compile(code, "docs/secure-aggregation.md", "exec"), scope)  # noqa: S102 - the documented example itself
    history = scope["result"].history
    assert len(history) == 3
    for h in history:
        assert h["secagg_dropped"] == 1.0 and h["skipped"] == 0 and h["failed"] == 1
        assert h["secagg_bytes_per_client"] > 0 and h["secagg_masked_bytes"] == h["bytes_up"]
    assert 0.0 <= history[-1]["test_acc"] <= 1.0


def test_tolerant_degree_example_holds():
    scope: dict = {}
    exec(compile(BLOCKS[1], "docs/secure-aggregation.md", "exec"), scope)  # noqa: S102 - the documented example
    assert scope["k"] == 58
    assert scope["unmask_failure"](100, 58, 0.3) < 1e-6
    assert scope["unmask_failure"](100, 20, 0.3) > 0.9
    assert scope["SecAggFedAvg"](dropout_tolerance=0.1).degree(100) == 18
