"""Importing lightning_fed loads no heavy optional dependency until a feature needs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch_pruning", "bitsandbytes", "torchao", "sklearn", "opacus")


def test_import_lightning_fed_is_lazy_about_heavy_dependencies():
    code = ("import sys, lightning_fed, lightning_fed.callbacks, lightning_fed.strategies, lightning_fed.cli; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "", f"imported at `import lightning_fed`: {out.stdout.strip()}"
