"""Documentation blocks that run as written and fast: codecs.md's codec configurations (each builds its FedLoop)
and resume.md's run-then-resume example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).parents[1] / "docs"


def _blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("marker", ["TimeCorrelatedTopK(", 'uplink_allocation="examples"', "smoothing=0.5)\nloop"])
def test_the_codec_blocks_build_their_loop(marker):
    code = next(b for b in _blocks("codecs.md") if marker in b)
    scope: dict = {}
    exec(compile(code, "docs/codecs.md", "exec"), scope)  # noqa: S102 - the documentation's own example
    assert scope["loop"].codec is scope["codec"]


def test_the_resume_block_continues_its_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _blocks("resume.md")[0]
    exec(compile(code, "docs/resume.md", "exec"), {})  # noqa: S102 - the documentation's own example
    runs = sorted((tmp_path / "runs" / "resume-doc").iterdir())
    assert [r.name for r in runs] == ["version_0"]  # the second fit continued the first run
    assert [h["round"] for h in json.loads((runs[0] / "history.json").read_text())] == [1, 2, 3, 4, 5]
