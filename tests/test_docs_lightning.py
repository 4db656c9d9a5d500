"""docs/lightning.md stays true: its dataloaders example runs and prints what it says."""

import re
from pathlib import Path

DOC = (Path(__file__).parents[1] / "docs" / "lightning.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", DOC, flags=re.DOTALL)


def test_the_dataloaders_example_runs_and_validates_as_it_says(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the run folder is written under the working folder
    code = next(b for b in BLOCKS if "loop.fit(LogisticRegression" in b)
    said = float(re.search(r"# (0\.\d+)", code).group(1))
    scope: dict = {}
    exec(compile(code, "docs/lightning.md", "exec"), scope)  # noqa: S102 - the documented example itself
    assert round(scope["result"].history[-1]["val_acc"], 2) == said
    assert (tmp_path / "runs" / "loaders" / "version_0" / "final.safetensors").is_file()
