"""Every algorithm resumes exactly: for each recipe (distillation strategies, MoE, server optimizers, SCAFFOLD,
error-feedback codecs, compression callbacks), a run stopped after round 1 and resumed to round 3 ends with the same
global model, strategy state, codec state and per-client state as an uninterrupted 3-round run."""

from pathlib import Path

import pytest
import torch

from lightning_fed.checkpoint import find_checkpoint, load_checkpoint
from lightning_fed.cli import run
from lightning_fed.report import without_wall_clock

ROOT = Path(__file__).parents[1] / "recipes" / "mnist1d"
RECIPES = ["fedmd", "fedmd_nfdp", "feddf", "feddf_assistant", "fedmd_assistant", "fedgkt_assistant", "ddist_assistant",
           "fedmd_nfdp_assistant", "fedgen", "fedgkt", "ddist", "distillation", "fedmoe", "codec_topk",
           "codec_dgc", "codec_powersgd", "codec_tcs", "codec_allocation", "fedavg_pruning_qat", "attack_backdoor",
           "defence_flame", "defence_krum", "defence_fltrust", "defence_rlr", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold",
           "defence_fine_pruning", "defence_nad", "defence_mcr", "defence_ibau", "defence_anp", "defence_activation_clip", "defence_trigger_unlearn", "defence_seam", "defence_reference_filter", "defence_reputation_filter", "defence_loss_filter", "defence_foolsgold", "secagg", "fedavg_ft",
           "fedper", "ditto", "fedprox", "fednova", "../synthetic/fedprox_synthetic_1_1", "stragglers_deadline", "fedbuff",
           "overselect", "dp_central", "dp_adaptive", "dp_local", "dp_sgd", "fedexp", "feddyn", "feddf_fedavg", "fedrs", "fedntd"]
SMALL = ["--loop.verbose", "false", "--loop.plot", "false", "--loop.eval_every", "1", "--loop.checkpoint_every", "1",
         "--loop.local_epochs", "1", "--loop.keep_checkpoints", "5"]


def _flatten(obj, prefix=""):
    """Every tensor and number in a nested checkpoint state, by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}/{i}"))
        return out
    return {prefix: obj}


def _final_state(run_dir: Path) -> dict:
    ckpt = find_checkpoint(run_dir)
    state = load_checkpoint(ckpt)
    history = state.pop("history")
    flat = _flatten(state)
    flat["history"] = without_wall_clock(history)  # every round metric but the measured seconds
    for f in sorted((ckpt / "clients").glob("client-*.pt")):
        flat.update(_flatten(torch.load(f, weights_only=True), f"clients/{f.name}"))
    return flat


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_resumes_to_identical_state(recipe, tmp_path):
    cfg = ["fit", "--config", str(ROOT / f"{recipe}.yaml"), *SMALL]
    full = run([*cfg, "--loop.rounds", "3", "--loop.output_dir", str(tmp_path / "full")])
    part = run([*cfg, "--loop.rounds", "1", "--loop.output_dir", str(tmp_path / "part")])
    resumed = run([*cfg, "--loop.rounds", "3", "--loop.output_dir", str(tmp_path / "part"), "--resume", str(part.run_dir)])
    assert [h["round"] for h in resumed.history] == [1, 2, 3]
    a, b = _final_state(full.run_dir), _final_state(resumed.run_dir)
    ha, hb = a.pop("history"), b.pop("history")  # the first run's test after its last round (1) stays in round 1
    hb[0] = {k: v for k, v in hb[0].items() if k in ha[0] or "test_" not in k}
    assert ha == hb, f"{recipe}: the round metrics differ after resume"
    assert a.keys() == b.keys()
    assert any(isinstance(v, torch.Tensor) for v in a.values())
    for k in a:
        if k.endswith("latency_ms"):  # measured wall-clock time
            continue
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{recipe}: {k} differs after resume"
        else:
            assert a[k] == b[k], f"{recipe}: {k} differs after resume ({a[k]!r} vs {b[k]!r})"
    assert resumed.final_metrics["test_acc"] == full.final_metrics["test_acc"]
    for name in ("round_0002.csv", "round_0003.csv"):  # personalized evaluation: the same per-client table
        if (full.run_dir / "personalized" / name).exists():
            assert (full.run_dir / "personalized" / name).read_text() == (resumed.run_dir / "personalized" / name).read_text()
    keys = [k for k in full.history[-1] if k.startswith("personal/")]
    assert [resumed.history[-1][k] for k in keys] == [full.history[-1][k] for k in keys]
