"""The README's examples stay true: its recipe parses, its Python example runs (shortened), and .ci/run runs
exactly the README's test command."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_fed.cli import build_parser
from lightning_fed.data import MNIST1DDataModule
from lightning_fed.models import MNIST1DCNN
from lightning_fed.weights import float_state, load_into

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_recipe_parses_and_builds(tmp_path):
    recipe = next(b for b in _blocks("yaml") if "class_path" in b)
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    parser = build_parser()
    cfg = parser.parse_args(["fit", "--config", str(path)])
    init = parser.instantiate_classes(cfg)["fit"]
    assert type(init.loop.codec).__name__ == "TopK" and type(init.loop.callbacks[0]).__name__ == "StructuredPruning"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    code = next(b for b in _blocks("python") if "FedLoop(" in b)
    code = code.replace("rounds=30", "rounds=1").replace("local_epochs=5", "local_epochs=1")
    code = code.replace('output_dir="runs/example"', f'output_dir="{tmp_path}", verbose=False, plot=False')
    code = code.replace("MNIST1DDataModule(batch_size=32)", "MNIST1DDataModule(batch_size=32, num_samples=1000)")
    code = code.replace("num_clients=20", "num_clients=4").replace("clients_per_round=10", "clients_per_round=2")
    scope: dict = {}
    torch.manual_seed(0)  # the example builds its model unseeded
    exec(compile(code, "README", "exec"), scope)  # noqa: S102 - the test runs the README's own example
    result = scope["result"]
    torch.manual_seed(0)
    initial = float_state(MNIST1DCNN())
    final = MNIST1DCNN()
    load_into(final, load_file(str(result.run_dir / "final.safetensors")))
    # it trained: the saved model moved from the initial one by exactly the round's reported update
    moved = torch.cat([(v - initial[k]).flatten() for k, v in float_state(final).items()]).norm().item()
    assert moved > 0 and moved == pytest.approx(result.history[0]["update_norm"], rel=1e-4)
    # and the accuracy it prints is the saved model's on the test set
    dm = MNIST1DDataModule(batch_size=32, num_samples=1000)
    dm.setup()
    x, y = dm.test_set.tensors
    with torch.no_grad():
        expected = (final.eval()(x).argmax(1) == y).float().mean().item()
    assert result.final_metrics["test_acc"] == pytest.approx(expected, abs=1e-6)


def test_ci_runs_the_readme_test_command():
    lines = README.splitlines()
    marker = next(i for i, line in enumerate(lines) if "test-command" in line)
    command = lines[marker + 2].strip()
    assert "pytest" in command and ".[test]" in command
    assert "test-command" in (ROOT / ".ci" / "run").read_text()
