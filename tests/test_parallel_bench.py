"""benchmarks/parallel.py: every configuration's command line carries the precision, the process count and the
processes per GPU it is asked for (the GPU curve and the mixed-precision rows of benchmarks/gpu_run.sh)."""

from __future__ import annotations

from conftest import load_benchmark


def test_each_configuration_gets_the_precision_on_its_command_line():
    bench = load_benchmark("parallel")
    recipe = bench._command("fedavg", 2, 3, "/runs/x", "cuda", 8, "16-mixed")
    assert recipe[recipe.index("--loop.precision") + 1] == "16-mixed"
    assert recipe[recipe.index("--loop.devices") + 1] == "2"
    assert recipe[recipe.index("--loop.processes_per_device") + 1] == "8"
    worker = bench._command("transformer", 2, 3, "/runs/x", "cuda", 8, "bf16-mixed")
    assert worker[worker.index("--precision") + 1] == "bf16-mixed"
    assert worker[worker.index("--processes") + 1] == "2"

