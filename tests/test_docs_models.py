"""docs/models.md stays true: its language-model and recurrent-model examples run."""

import re
from pathlib import Path

import pytest

DOC = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", DOC, flags=re.DOTALL)


@pytest.mark.parametrize("name", ["TinyLM", "Recurrent"])
def test_models_doc_example_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Lightning and the QAT export write to the working folder
    code = next(b for b in BLOCKS if f"class {name}(" in b).replace("\nprint(", "\n_ = (")
    scope: dict = {}
    exec(compile(code, "docs/models.md", "exec"), scope)  # noqa: S102 - the documented example itself
    assert scope["footprint"].results["after"]["macs"] > 0
