"""docs/robustness.md stays true: its examples run (smaller data, in a temporary folder)."""

import re
from pathlib import Path

DOC = (Path(__file__).parents[1] / "docs" / "robustness.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", DOC, flags=re.DOTALL)


def _run(code: str, tmp_path: Path) -> dict:
    code = re.sub(r'output_dir=f?"runs/[^"]*"', f'output_dir="{tmp_path}"', code)
    scope: dict = {"print": lambda *args: None}
    exec(compile(code, "docs/robustness.md", "exec"), scope)  # noqa: S102 - the documented example itself
    return scope


def test_there_are_thirteen_examples():
    assert len(BLOCKS) == 13


def test_trigger_example_runs_and_its_comments_are_true(tmp_path):
    import torch

    scope = _run(BLOCKS[0], tmp_path)
    middle = scope["middle"]
    assert (middle.trigger_start, middle.trigger_pattern, middle.trigger_size, middle.trigger_value) == (
        18,
        "constant",
        4,
        3.0,
    )
    written = scope["apply_trigger"](torch.zeros(1, 40), start=18, pattern="constant")[0]
    assert written[16:24].tolist() == [0.0, 0.0, 3.0, 3.0, 3.0, 3.0, 0.0, 0.0]
    assert written.nonzero().flatten().tolist() == [18, 19, 20, 21]


def test_detection_callback_example_runs_and_its_comment_is_true(tmp_path):
    scope = _run(BLOCKS[2], tmp_path)
    assert scope["detection"].totals() == {"precision": 1.0, "recall": 1.0, "tp": 6.0, "fp": 0.0, "fn": 0.0}
    assert [h["det_recall"] for h in scope["result"].history] == [1.0, 1.0]


def test_krum_detection_example_runs(tmp_path):
    scope = _run(BLOCKS[3], tmp_path)
    history = scope["result"].history
    assert len(history) == 3
    for h in history:
        assert 0.0 <= h["precision"] <= 1.0 and 0.0 <= h["recall"] <= 1.0
        assert h["malicious"] == 2.0 and h["agg_dropped"] == 2.0
    assert "round,client,attack" in (scope["result"].run_dir / "malicious_clients.csv").read_text()


def test_backdoor_example_runs(tmp_path):
    scope = _run(BLOCKS[4], tmp_path)
    last = scope["result"].history[-1]
    assert 0.0 <= last["test_asr"] <= 1.0 and "agg_dropped" in last  # the FLAME run is the last one


def test_defences_example_runs(tmp_path):
    scope = _run(BLOCKS[5], tmp_path)
    last = scope["result"].history[-1]  # the MCR run
    assert 0.0 <= last["test_asr"] <= 1.0 and 0.1 <= last["mcr_t"] <= 0.9
    assert {"mcr_acc_before", "mcr_endpoint_acc", "mcr_acc_after"} <= last.keys()
    fp = scope["defences"]["fine-pruning"]
    assert fp.records[-1]["pruned_channels"] == 10 and fp.records[-1]["channels"] == 15
    assert scope["defences"]["nad"].done == [2]


def test_robust_lr_and_fltrust_example_runs(tmp_path):
    scope = _run(BLOCKS[1], tmp_path)
    rlr, fltrust = (scope["rules"][k][0] for k in ("robust LR", "FLTrust"))
    assert 0.0 <= rlr.report()["agg_disputed"] <= 1.0 and rlr.last.dropped == []
    assert len(fltrust.last.scores) == 10 and all(s >= 0 for s in fltrust.last.scores)
    assert set(fltrust.last.dropped) == {i for i, s in enumerate(fltrust.last.scores) if s == 0}


def test_reference_filter_and_ibau_example_runs(tmp_path):
    scope = _run(BLOCKS[6], tmp_path)
    assert scope["detection"].totals()["recall"] == 1.0
    assert scope["detection"].tp == 6  # 2 flipped replies a round, 3 rounds
    assert len(scope["rule"].last.scores) == 10 and len(scope["rule"].last.dropped) >= 2
    record = scope["ibau"].records[-1]
    assert scope["ibau"].done == [2] and record["radius"] > 0
    assert 0.0 <= scope["result"].history[-1]["test_asr"] <= 1.0


def test_activation_clip_example_runs_and_the_deployed_copy_carries_the_bounds(tmp_path):
    import torch

    from lightning_fed.callbacks.activation_clip import ClipHook

    scope = _run(BLOCKS[7], tmp_path)
    clip, deployed = scope["clip"], scope["deployed"]
    assert clip.done == [2] and set(clip.bounds) == {"conv1", "conv2", "conv3"}
    assert {"clip_acc_before", "clip_acc_after"} <= scope["result"].history[-1].keys()
    for name, bound in clip.bounds.items():
        (hook,) = deployed.get_submodule(name)._forward_hooks.values()
        assert isinstance(hook, ClipHook) and torch.equal(hook.bound, bound)


def test_trigger_unlearn_example_runs_and_writes_its_triggers(tmp_path):
    import torch

    scope = _run(BLOCKS[8], tmp_path)
    nc, record, triggers = scope["nc"], scope["record"], scope["triggers"]
    assert nc.done == [2] and len(record["norms"]) == 10 and record["unlearned"] >= 1
    assert record["unlearned_classes"] == (record["flagged_classes"] or [min(range(10), key=record["norms"].__getitem__)])
    assert {"nc_acc_before", "nc_acc_after", "nc_flagged", "nc_unlearned"} <= scope["result"].history[-1].keys()
    assert set(triggers) == {f"{k}_{c}" for k in ("mask", "pattern") for c in range(10)}
    assert torch.equal(triggers["mask_0"], nc.masks[0])


def test_foolsgold_example_runs_and_its_report_matches_its_weights(tmp_path):
    scope = _run(BLOCKS[9], tmp_path)
    last, history = scope["strategy"].last, scope["result"].history
    assert len(last.scores) == 10 and all(0.0 <= w <= 1.0 for w in last.scores)
    assert last.dropped == [i for i, w in enumerate(last.scores) if w == 0.0]
    assert history[-1]["fg_zeroed"] == float(len(last.dropped))
    totals = scope["detection"].totals()
    assert totals["tp"] + totals["fn"] == 6  # 2 malicious replies a round, 3 rounds
    assert sorted(scope["strategy"].history) == list(range(10))


def test_fresh_distill_example_runs_and_replaces_the_model(tmp_path):
    scope = _run(BLOCKS[10], tmp_path)
    fresh, history = scope["fresh"], scope["result"].history
    assert fresh.done == [2] and fresh.records[-1]["transfer"] == 500 + 160
    assert (fresh.patches, fresh.patch_min, fresh.patch_max, fresh.patch_amplitude) == (2, 2, 8, 4.0)
    assert {"fresh_acc_before", "fresh_acc_after", "fresh_agreement"} <= history[-1].keys()
    assert "fresh_acc_after" not in history[0]
    assert scope["seam"].forget_lr == 0.1
def test_reputation_filter_example_runs_and_its_records_match(tmp_path):
    scope = _run(BLOCKS[11], tmp_path)
    strategy, history = scope["strategy"], scope["result"].history
    assert sorted(strategy.counts) == list(range(10)) and all(a + b == 3 for a, b in strategy.counts.values())
    assert history[-1]["rep_dropped"] == float(len(strategy.last.dropped))
    totals = scope["detection"].totals()
    assert totals["tp"] + totals["fn"] == 6  # 2 malicious replies a round, 3 rounds


def test_loss_filter_example_runs_and_drops_the_flipped_replies(tmp_path):
    scope = _run(BLOCKS[12], tmp_path)
    strategy, history = scope["strategy"], scope["result"].history
    assert sorted(strategy.records) == list(range(10)) and all(n == 3 for _, n in strategy.records.values())
    assert history[-1]["loss_dropped"] == float(len(strategy.last.dropped))
    assert scope["detection"].totals() == {"precision": 1.0, "recall": 1.0, "tp": 6.0, "fp": 0.0, "fn": 0.0}
    bad = scope["attack"].malicious(0, 10)
    assert all(strategy.mean_score(c) < 0 for c in bad)
