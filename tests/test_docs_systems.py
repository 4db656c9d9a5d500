"""docs/systems.md stays true: its examples run (fewer rounds and samples, in a temporary folder)."""

import re
from pathlib import Path

DOC = (Path(__file__).parents[1] / "docs" / "systems.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", DOC, flags=re.DOTALL)


def test_the_example_runs(tmp_path):
    code = BLOCKS[0]
    code = code.replace('output_dir="runs/systems-doc"', f'output_dir="{tmp_path}"').replace(
        "rounds=5", "rounds=2"
    )
    code = code.replace(
        "MNIST1DDataModule(batch_size=16)", "MNIST1DDataModule(batch_size=16, num_samples=1000)"
    )
    printed = []
    scope = {"print": lambda *args: printed.append(args)}
    exec(compile(code, "docs/systems.md", "exec"), scope)  # noqa: S102 - the documented example itself
    history = scope["result"].history
    assert [h["round"] for h in history] == [1, 2] and len(printed) == 2
    assert history[1]["sim_time_s"] == history[0]["sim_round_s"] + history[1]["sim_round_s"]
    assert all(h["sim_round_s"] <= 0.1 for h in history)  # the deadline bounds every round
    assert history[1]["bytes_down"] < history[1]["raw_bytes_down"] / 3  # 8-bit deltas on the downlink
    assert (scope["result"].run_dir / "clock.csv").exists()


def test_the_fedbuff_example_runs(tmp_path):
    code = BLOCKS[1]
    assert "FedBuff(" in code
    code = code.replace('output_dir="runs/fedbuff-doc"', f'output_dir="{tmp_path}"').replace("rounds=10", "rounds=3")
    code = code.replace(
        "MNIST1DDataModule(batch_size=16)", "MNIST1DDataModule(batch_size=16, num_samples=1000)"
    )
    printed = []
    scope = {"print": lambda *args: printed.append(args)}
    exec(compile(code, "docs/systems.md", "exec"), scope)  # noqa: S102 - the documented example itself
    history = scope["result"].history
    assert [h["round"] for h in history] == [1, 2, 3] and len(printed) == 3
    times = [h["sim_time_s"] for h in history]
    assert times == sorted(times) and times[0] > 0  # simulated time only moves forward
    assert all(0 <= h["sim_staleness_mean"] <= h["sim_staleness_max"] <= 20 for h in history)
    assert len(BLOCKS) == 2, "a new example in docs/systems.md needs its own test here"
