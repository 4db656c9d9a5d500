"""benchmarks/robustness.py in its quick mode: every requested cell is produced, the post-training defences repair
copies of the undefended backdoor run only, detection is reported where a rule detects, saved results reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("robustness")


def test_quick_mode_produces_every_requested_cell(bench, tmp_path, capsys):
    out = tmp_path / "cells.json"
    rows = bench.main(
        [
            "--quick",
            "--fractions",
            "0.2",
            "--attacks",
            "clean",
            "sign_flip",
            "backdoor",
            "--defences",
            "none",
            "krum",
            "fp",
            "nad",
            "mcr",
            "fp+nad",
            "feddf",
            "--json",
            str(out),
        ]
    )
    cells = {(r["attack"], r["defence"]) for r in rows}
    assert cells == {
        ("clean", "none"),
        ("sign_flip", "none"),
        ("sign_flip", "krum"),
        ("backdoor", "none"),
        ("backdoor", "krum"),
        ("backdoor", "fp"),
        ("backdoor", "nad"),
        ("backdoor", "mcr"),
        ("backdoor", "fp+nad"),
        ("backdoor", "feddf"),
    }
    assert all(0.0 <= r["acc"] <= 1.0 and 0.0 <= r["asr"] <= 1.0 for r in rows)
    krum = [r for r in rows if r["defence"] == "krum"]
    assert all(set(r["detection"]) == {"precision", "recall", "tp", "fp", "fn"} for r in krum)
    assert all(
        r["detection"]["tp"] + r["detection"]["fn"] > 0 for r in krum
    )  # the malicious clients were sampled
    printed = capsys.readouterr().out
    assert "n/a¹" in printed and "multi-Krum" in printed
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    again = bench.main(["--load", str(out)])
    assert len(again) == len(rows)


def test_post_training_defences_leave_the_trained_model_alone(bench):
    import torch

    from lightning_fed.data import PublicData

    args = bench.parse(["--quick"])
    model = bench.seeded_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clean = PublicData(num_samples=60, seed=7, labeled=True)
    fixed = bench.repair(model, bench.post_defence("fp+nad", clean, 0, args), 0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert fixed.conv3.out_channels < model.conv3.out_channels  # pruned, and the original is not


def test_a_combination_repairs_its_own_rules_model(bench, tmp_path, capsys):
    models = tmp_path / "models"
    argv = [
        "--quick",
        "--fractions",
        "0.2",
        "--attacks",
        "sign_flip",
        "backdoor",
        "--defences",
        "normbound/fp+nad",
        "--fp-max-drop",
        "1.0",
        "--fp-ratio",
        "0.5",
        "--models",
        str(models),
    ]
    rows = bench.main(argv)
    rows_by = {r["defence"]: r for r in rows}
    cells = {(r["attack"], r["defence"]) for r in rows}
    # the rule's own training run is a cell; no undefended run is trained for a combination alone, and a
    # combination (a backdoor defence) trains nothing under a byzantine attack
    assert cells == {("backdoor", "normbound"), ("backdoor", "normbound/fp+nad")}
    (combo,) = [r for r in rows if r["defence"] == "normbound/fp+nad"]
    # any held-out drop allowed: the largest ratio of the grid up to --fp-ratio
    assert combo["fp_ratio"] == 0.5
    assert sorted(p.name for p in models.iterdir()) == [
        "20-0.2-backdoor-0-normbound.malicious.json",
        "20-0.2-backdoor-0-normbound.pt",
    ]
    printed = capsys.readouterr().out
    assert "norm bound, then FP + NAD" in printed
    # a second run reuses the saved model: its rule cell has no training record and does not replace the first's
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps(rows))
    bench.main([*argv, "--json", str(second)])
    reused = [r for r in json.loads(second.read_text()) if r["defence"] == "normbound"]
    assert reused[0]["reused"] and "detection" not in reused[0]
    assert not any(r.get("reused") for r in json.loads(second.read_text()) if r["defence"] != "normbound")
    merged = bench.main(["--load", str(first), str(second)])
    kept = {r["defence"]: r for r in merged}["normbound"]
    assert kept["detection"] == rows_by["normbound"]["detection"]


def test_load_keeps_cells_of_other_triggers_and_attack_seeds_apart(bench, tmp_path):
    base = {
        "clients": 20,
        "seed": 0,
        "fraction": 0.2,
        "attack": "backdoor",
        "defence": "none",
        "acc": 0.8,
        "asr": 1.0,
        "seconds": 1.0,
    }
    rows = [
        base,
        {**base, "attack_seed": 0, "acc": 0.7},  # the same cell as the first (offset 0): replaces it
        {**base, "attack_seed": 1, "acc": 0.6},
        {**base, "trigger": [18, "constant"], "acc": 0.5},
    ]
    files = []
    for i, r in enumerate(rows):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps([r]))
    merged = bench.main(["--load", *map(str, files)])
    assert sorted(r["acc"] for r in merged) == [0.5, 0.6, 0.7]


def test_fine_pruning_ratio_is_chosen_on_the_selection_records(bench):
    from lightning_fed.data import PublicData

    clean = PublicData(num_samples=60, seed=7, labeled=True)
    select = PublicData(num_samples=40, seed=8, labeled=True)
    model = bench.seeded_model(0)
    strict = bench.parse(["--quick", "--fp-max-drop", "-1.0", "--fp-ratio", "0.8"])
    loose = bench.parse(["--quick", "--fp-max-drop", "1.0", "--fp-ratio", "0.8"])
    capped = bench.parse(["--quick", "--fp-max-drop", "1.0", "--fp-ratio", "0.3"])
    # no drop allowed: the least pruning of the grid
    assert bench.choose_fp_ratio(model, clean, select, 0, strict) == bench.FP_GRID[0]
    assert bench.choose_fp_ratio(model, clean, select, 0, loose) == 0.8
    assert bench.choose_fp_ratio(model, clean, select, 0, capped) == 0.3


def test_combination_columns_split_into_rule_and_post_step(bench):
    assert bench.split_post("fp+nad") == ("none", "fp+nad")
    assert bench.split_post("flame/fp+nad") == ("flame", "fp+nad")
    assert "normbound/fp+nad" in bench.DEFENCES and bench.LABELS["krum/nad"] == "multi-Krum, then NAD"


def test_a_collapsed_run_is_marked_in_its_cell(bench):
    row = {
        "clients": 20,
        "fraction": 0.2,
        "attack": "sign_flip",
        "defence": "none",
        "asr": 0.0,
        "seconds": 1.0,
    }
    rows = [{**row, "seed": 0, "acc": 0.1, "collapsed": "3 consecutive rounds could not aggregate"}]
    rows.append({**row, "seed": 1, "acc": 0.3})
    assert bench.cell(rows, "acc", 2) == "20.0 ±14.1 †1"
    assert bench.cell(rows[1:], "acc", 2) == "30.0 (n=1)"
    ((_, _, body, note), *_) = bench.grids(rows)
    assert body == [["sign flip", "20.0 ±14.1 †1"]] and "†k" in note


def test_defence_lr_is_chosen_on_the_selection_records(bench):
    from lightning_fed.data import PublicData

    clean = PublicData(num_samples=60, seed=7, labeled=True)
    select = PublicData(num_samples=40, seed=8, labeled=True)
    model = bench.seeded_model(0)
    lrs = ["--defence-lr", "0.01", "0.05", "0.02"]
    loose = bench.parse(["--quick", *lrs, "--select-drop", "1.0"])
    strict = bench.parse(["--quick", *lrs, "--select-drop", "-1.0"])
    one = bench.parse(["--quick", "--defence-lr", "0.03"])
    assert bench.repair_selected(model, "nad", clean, select, 0, loose, None)[1] == 0.05  # the largest passes
    assert (
        bench.repair_selected(model, "nad", clean, select, 0, strict, None)[1] == 0.01
    )  # none: the smallest
    fixed, lr = bench.repair_selected(model, "nad", clean, select, 0, one, None)
    again = bench.repair(model, bench.post_defence("nad", clean, 0, one, None, 0.03), 0)
    assert lr == 0.03
    assert all(torch.equal(a, b) for a, b in zip(fixed.state_dict().values(), again.state_dict().values()))


def test_new_rules_and_their_cost_without_an_attack(bench, capsys):
    argv = [
        "--quick",
        "--fractions",
        "0.2",
        "--attacks",
        "clean",
        "backdoor",
        "--defences",
        "none",
        "rlr",
        "fltrust",
        "fltrust/fp",
        "--clean-rules",
    ]
    rows = bench.main(argv)
    cells = {(r["attack"], r["defence"]) for r in rows}
    assert cells == {
        ("clean", "none"),
        ("clean", "rlr"),
        ("clean", "fltrust"),
        ("backdoor", "none"),
        ("backdoor", "rlr"),
        ("backdoor", "fltrust"),
        ("backdoor", "fltrust/fp"),
    }
    assert {r["assumed"] for r in rows if r["attack"] == "clean" and r["defence"] != "none"} == {0.2}
    fltrust = [r for r in rows if r["defence"] == "fltrust" and r["attack"] == "backdoor"]
    assert set(fltrust[0]["detection"]) == {"precision", "recall", "tp", "fp", "fn"}
    printed = capsys.readouterr().out
    assert "| no attack |" not in printed and "no attack" in printed and "robust LR" in printed
    assert bench.make_aggregator("rlr", 0.2, 10, 0).threshold(10) == 3
    assert bench.make_aggregator("fltrust", 0.2, 10, 0, local_epochs=5).epochs == 5


def test_oracle_drops_exactly_the_malicious_and_the_filters_report_detection(bench):
    argv = [
        "--quick",
        "--fractions",
        "0.2",
        "--attacks",
        "clean",
        "sign_flip",
        "--defences",
        "oracle",
        "refilter",
        "refilter_krum",
        "--clean-rules",
    ]
    rows = bench.main(argv)
    cells = {(r["attack"], r["defence"]) for r in rows}
    # without an attack the oracle is plain FedAvg: its clean run is the reference ("none"), trained once
    assert cells == {
        ("clean", "none"),
        ("clean", "refilter"),
        ("clean", "refilter_krum"),
        ("sign_flip", "oracle"),
        ("sign_flip", "refilter"),
        ("sign_flip", "refilter_krum"),
    }
    by = {r["defence"]: r for r in rows if r["attack"] == "sign_flip"}
    det = by["oracle"]["detection"]
    assert det["precision"] == 1.0 and det["recall"] == 1.0 and det["fp"] == 0 and det["tp"] > 0
    assert set(by["refilter"]["detection"]) == {"precision", "recall", "tp", "fp", "fn"}
    assert bench.make_aggregator("refilter_krum", 0.2, 10, 0).byzantine == 3
    assert bench.make_aggregator("oracle", 0.2, 10, 0) is None  # no attack: the weighted mean


def test_ibau_radius_and_anp_settings_are_chosen_on_the_selection_records(bench):
    from lightning_fed.data import PublicData

    clean = PublicData(num_samples=60, seed=7, labeled=True)
    select = PublicData(num_samples=40, seed=8, labeled=True)
    model = bench.seeded_model(0)
    grid = ["--ibau-eps", "0.3", "0.1", "0.2"]
    loose = bench.parse(["--quick", *grid, "--select-drop", "1.0", "--anp-eps", "0.4", "0.1"])
    strict = bench.parse(["--quick", *grid, "--select-drop", "-1.0", "--anp-eps", "0.4", "0.1"])
    assert bench.choose_ibau_eps(model, clean, select, 0, loose) == 0.3  # the largest passes
    assert bench.choose_ibau_eps(model, clean, select, 0, strict) == 0.1  # none: the smallest
    loose.anp_iterations = strict.anp_iterations = 100  # --quick's 2 updates leave every mask near 1
    # any drop allowed: the pair that prunes the most channels (the largest threshold); none allowed: prune nothing
    assert bench.choose_anp(model, clean, select, 0, loose)[1] == bench.ANP_GRID[-1]
    assert bench.choose_anp(model, clean, select, 0, strict) == (0.4, 0.0)


def test_clip_column_chooses_its_quantile_on_the_selection_records(bench):
    from lightning_fed.data import PublicData

    rows = bench.main(
        [
            "--quick",
            "--fractions",
            "0.2",
            "--attacks",
            "backdoor",
            "--defences",
            "clip",
            "--clip-q",
            "1.0",
            "0.5",
            "--select-drop",
            "1.0",
        ]
    )
    assert {(r["attack"], r["defence"]) for r in rows} == {("backdoor", "none"), ("backdoor", "clip")}
    (cell,) = [r for r in rows if r["defence"] == "clip"]
    assert cell["clip_quantile"] == 0.5  # any drop allowed: the tightest bounds
    clean = PublicData(num_samples=60, seed=7, labeled=True)
    select = PublicData(num_samples=40, seed=8, labeled=True)
    strict = bench.parse(["--quick", "--clip-q", "0.9", "1.0", "0.5", "--select-drop", "-1.0"])
    assert (
        bench.choose_clip_quantile(bench.seeded_model(0), clean, select, 0, strict) == 1.0
    )  # none: the loosest


def test_nc_column_chooses_its_lr_on_the_selection_records_and_records_detection(bench):
    from lightning_fed.data import PublicData

    rows = bench.main(
        [
            "--quick",
            "--fractions",
            "0.2",
            "--attacks",
            "backdoor",
            "--defences",
            "nc",
            "--defence-lr",
            "0.01",
            "0.05",
            "--select-drop",
            "1.0",
        ]
    )
    assert {(r["attack"], r["defence"]) for r in rows} == {("backdoor", "none"), ("backdoor", "nc")}
    (cell,) = [r for r in rows if r["defence"] == "nc"]
    assert cell["defence_lr"] == 0.05  # any drop allowed: the largest
    # the default fallback unlearns the smallest-mask class when none is flagged
    det = cell["nc"]
    assert len(det["norms"]) == 10 and det["unlearned_classes"]
    assert det["flagged_classes"] or det["unlearned_classes"] == [
        min(range(10), key=det["norms"].__getitem__)
    ]
    clean = PublicData(num_samples=60, seed=7, labeled=True)
    select = PublicData(num_samples=40, seed=8, labeled=True)
    strict = bench.parse(["--quick", "--defence-lr", "0.05", "0.01", "--select-drop", "-1.0"])
    model = bench.seeded_model(0)
    fixed, lr, _ = bench.repair_nc(model, clean, select, 0, strict)
    assert lr == 0.01  # none within the budget: the smallest
    # the same as the callback's own step at that lr
    again = bench.repair(model, bench.post_defence("nc", clean, 0, strict, nc_lr=0.01), 0)
    for k, v in again.state_dict().items():
        assert torch.equal(fixed.state_dict()[k], v), k


def _saved_asr(bench, saved, size, value, start, pattern) -> float:
    """The attack success rate of the saved quick-run model ``saved`` on the quick run's test records."""
    from lightning_fed.callbacks import attack_success_rate

    model = bench.seeded_model(0)
    model.load_state_dict(torch.load(saved))
    dm = bench.MNIST1DDataModule(batch_size=16, num_samples=500)
    dm.prepare_data()
    dm.setup("test")
    x, y = bench.test_tensors(dm)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=500)
    return attack_success_rate(model, loader, 0, size, value, start=start, pattern=pattern)


def test_trigger_options_reach_training_measurement_and_saved_names(bench, tmp_path):
    attack = bench.make_attack("backdoor_mr", 0.2, 0, 5.0, (18, "constant"))
    assert (attack.trigger_start, attack.trigger_pattern, attack.boost) == (18, "constant", 5.0)
    default = bench.make_attack("backdoor", 0.2, 0, 5.0)
    assert (default.trigger_start, default.trigger_pattern) == (None, "alternating")
    models = tmp_path / "models"
    args = [
        "--quick",
        "--fractions",
        "0.2",
        "--attacks",
        "backdoor",
        "--defences",
        "none",
        "--models",
        str(models),
    ]
    rows = bench.main([*args, "--trigger-start", "18", "--trigger-pattern", "constant"])
    (row,) = rows
    assert row["trigger"] == [18, "constant"]
    saved = models / "20-0.2-backdoor-0-trigger18constant.pt"
    # apart from the default trigger's models, with the malicious set it was trained against
    assert sorted(p.name for p in models.iterdir()) == [bench.set_path(saved).name, saved.name]
    assert row["asr"] == _saved_asr(bench, saved, 4, 3.0, 18, "constant")
    with pytest.raises(SystemExit):
        bench.parse(["--trigger-start", "37"])


def test_trigger_size_and_value_reach_training_measurement_and_saved_names(bench, tmp_path):
    attack = bench.make_attack("backdoor", 0.2, 0, 5.0, (10, "constant", 6, 2.5))
    assert (attack.trigger_start, attack.trigger_size, attack.trigger_value) == (10, 6, 2.5)
    assert bench.full_trigger((None, "alternating")) == (None, "alternating", 4, 3.0)
    assert bench.trigger_tag((None, "alternating", 4, 3.0)) == bench.trigger_tag((None, "alternating")) == ""
    assert bench.trigger_tag((18, "constant", 4, 3.0)) == "-trigger18constant"
    models = tmp_path / "models"
    args = ["--quick", "--fractions", "0.2", "--attacks", "backdoor", "--defences", "none", "--models", str(models)]
    extra = ["--trigger-start", "10", "--trigger-pattern", "constant", "--trigger-size", "6", "--trigger-value", "2.5"]
    (row,) = bench.main([*args, *extra])
    assert row["trigger"] == [10, "constant", 6, 2.5]
    saved = models / "20-0.2-backdoor-0-trigger10constant-size6-value2.5.pt"
    assert saved.exists()
    assert row["asr"] == _saved_asr(bench, saved, 6, 2.5, 10, "constant")
    with pytest.raises(SystemExit):
        bench.parse(["--trigger-start", "35", "--trigger-size", "6"])
    with pytest.raises(SystemExit):
        bench.parse(["--trigger-size", "0"])


def test_norm_constrained_model_replacement_cuts_to_twice_its_own_update(bench):
    from types import SimpleNamespace

    from lightning_fed.callbacks.attacks import malicious_clients
    from lightning_fed.context import FedContext
    from lightning_fed.protocol import Reply

    def trainer(cid):
        fed = FedContext(num_clients=10, num_rounds=2, eval_every=1, run_dir=".", round=0, client_id=cid)
        return SimpleNamespace(fed=fed)

    attack = bench.make_attack("backdoor_mr_norm", 0.3, 0, boost=5.0)
    assert isinstance(attack, bench.NormMatchedBackdoor) and attack.boost == 5.0 and attack.ratio == 2.0
    bad = malicious_clients(0.3, 10, 0)
    good = next(c for c in range(10) if c not in bad)
    reply = Reply(
        bad[0], {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0]), "n": torch.tensor([7])}, 10
    )
    attack.on_client_end(trainer(bad[0]), None, reply)  # own norm 5: boosted to 25, cut to 2 x 5
    assert reply.payload["a"].tolist() == pytest.approx([6.0, 0.0]) and reply.payload["b"].tolist() == [8.0]
    assert reply.payload["n"].tolist() == [7]
    honest = Reply(good, {"a": torch.tensor([3.0, 4.0])}, 10)
    attack.on_client_end(trainer(good), None, honest)
    assert honest.payload["a"].tolist() == [3.0, 4.0]
    weak = bench.make_attack("backdoor_mr_norm", 0.3, 0, boost=1.5)  # a boost under the ratio is not cut
    reply = Reply(bad[0], {"a": torch.tensor([3.0, 4.0])}, 10)
    weak.on_client_end(trainer(bad[0]), None, reply)
    assert reply.payload["a"].tolist() == pytest.approx([4.5, 6.0])
    with pytest.raises(ValueError, match=r"ratio=0.5; allowed: >= 1"):
        bench.NormMatchedBackdoor(ratio=0.5)


def test_norm_constrained_replies_reach_the_server_at_twice_the_unboosted_norm(bench, tmp_path):
    """Round 0 starts from the same global model in both runs, so a malicious client's reply under the constrained
    attack is twice its reply under the plain backdoor (the same poisoned training): at most the attack's norm."""

    def recording(kind):
        class Recorder(kind):
            def on_aggregate_start(self, trainer, pl_module, replies):
                if trainer.fed.round == 0:
                    bad = set(self.malicious(0, trainer.fed.num_clients))
                    self.norms = {
                        r.client_id: float(
                            torch.linalg.vector_norm(torch.cat([v.flatten() for v in r.payload.values()]))
                        )
                        for r in replies
                        if r.client_id in bad
                    }

        return Recorder

    args = bench.parse(["--quick"])
    norms = {}
    for name, kind in (("backdoor", bench.Backdoor), ("backdoor_mr_norm", bench.NormMatchedBackdoor)):
        made = bench.make_attack(name, 0.2, 0, boost=5.0)
        attack = recording(kind)(
            **{k: getattr(made, k) for k in ("fraction", "mode", "seed", "target", "boost")}
        )
        bench.train(args, 20, 0, attack, "none", tmp_path / name)
        norms[name] = attack.norms
    plain, capped = norms["backdoor"], norms["backdoor_mr_norm"]
    assert plain and plain.keys() == capped.keys()
    for cid, n in plain.items():
        assert capped[cid] == pytest.approx(2.0 * n, rel=1e-4)


def test_the_sleeper_row_flips_at_its_own_length_from_a_third_of_the_rounds(bench):
    sleeper = bench.make_attack("sign_flip_sleeper", 0.2, 3, 5.0, rounds=30)
    assert isinstance(sleeper, bench.SignFlip) and sleeper.scale == 1.0 and sleeper.start_round == 10
    plain = bench.make_attack("sign_flip", 0.2, 3, 5.0)
    assert plain.scale == 4.0 and plain.start_round == 0
    # the same malicious set as the plain row, and none of it before round 10
    assert sleeper.malicious(10, 20) == plain.malicious(0, 20) and sleeper.malicious(9, 20) == []
    matched = bench.make_attack("sign_flip_x1", 0.2, 3, 5.0, rounds=30)
    assert matched.scale == 1.0 and matched.start_round == 0 and matched.malicious(0, 20) == plain.malicious(0, 20)
    assert {"sign_flip_x1", "sign_flip_sleeper"} <= set(bench.BYZANTINE) & set(bench.LABELS)
    assert bench.make_attack("sign_flip_sleeper", 0.2, 3, 5.0, rounds=2).start_round == 1  # --quick: one honest round
    with pytest.raises(ValueError, match="sign_flip_sleeper starts after a third of the run's rounds: pass rounds"):
        bench.make_attack("sign_flip_sleeper", 0.2, 3, 5.0)


def test_reputation_columns_and_an_all_malicious_round_refused_by_the_oracle(bench):
    from lightning_fed.errors import AggregationRefused
    from lightning_fed.strategies.robust import AggregationReport

    rows = bench.main(
        [
            "--quick",
            "--fractions",
            "0.2",
            "--attacks",
            "sign_flip",
            "--defences",
            "reputation",
            "reputation_roundnorm",
        ]
    )
    by = {r["defence"]: r for r in rows}
    assert set(by) == {"reputation", "reputation_roundnorm"}
    assert all(set(r["detection"]) == {"precision", "recall", "tp", "fp", "fn"} for r in rows)
    oracle = bench.Oracle(bench.make_attack("sign_flip", 0.2, 0, 5.0))
    x, w = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0.5, 0.5])
    oracle.drop = [1]
    out = torch.empty(2)
    report = AggregationReport()
    oracle.combine(out, x, w, report)
    assert out.tolist() == [1.0, 0.0] and report.dropped == [1]
    oracle.drop = [0, 1]  # every reply malicious: no honest reply to average
    with pytest.raises(AggregationRefused, match="the 2 replies are all malicious"):
        oracle.combine(out, x, w, AggregationReport())


def test_loss_filter_columns_score_on_the_servers_clean_records(bench):
    rows = bench.main(
        ["--quick", "--fractions", "0.2", "--attacks", "sign_flip_x1", "--defences", "lossfilter", "lossfilter_round",
         "--loss-clean", "50"]
    )
    by = {r["defence"]: r for r in rows}
    assert set(by) == {"lossfilter", "lossfilter_round"}
    assert all(set(r["detection"]) == {"precision", "recall", "tp", "fp", "fn"} for r in rows)
    assert all(r["detection"]["tp"] > 0 for r in rows), rows  # flipped replies dropped even in the quick setting
    assert all(r["loss_clean"] == 50 for r in rows)
    assert bench.LABELS["lossfilter"] == "loss filter" and bench.DETECTS["lossfilter_round"] == "dropped"


def test_attack_seed_offset_draws_another_malicious_set(bench, monkeypatch, tmp_path):
    from lightning_fed.callbacks.attacks import malicious_clients

    assert malicious_clients(0.2, 100, 0) != malicious_clients(0.2, 100, 1)
    seen = []

    def train(args, clients, seed, attack, defence, out, **kwargs):  # no training: what the run would get
        seen.append((seed, attack.seed))
        return bench.seeded_model(seed), {}, None

    monkeypatch.setattr(bench, "train", train)
    argv = [
        "--quick",
        "--clients",
        "100",
        "--fractions",
        "0.2",
        "--attacks",
        "sign_flip",
        "--defences",
        "none",
    ]
    assert bench.parse(argv).attack_seed_offset == 0
    (row,) = bench.main([*argv, "--attack-seed-offset", "1", "--seeds", "2"])
    assert seen == [(2, 3)] and row["seed"] == 2 and row["attack_seed"] == 3
    (row,) = bench.main(argv)
    assert seen[-1] == (0, 0) and row["attack_seed"] == 0
    assert bench.saved_path(tmp_path, 100, 0.2, "backdoor", 0).name == "100-0.2-backdoor-0.pt"
    named = bench.saved_path(tmp_path, 100, 0.2, "backdoor", 0, attack_seed_offset=1)
    assert named.name == "100-0.2-backdoor-0-attackseed+1.pt"


def test_a_saved_model_is_reused_only_against_its_own_malicious_set(bench, tmp_path):
    saved = bench.saved_path(tmp_path, 20, 0.2, "backdoor", 0)
    saved.write_bytes(b"")
    with pytest.raises(SystemExit, match="not recorded"):  # saved before the list existed: the old draw
        bench.check_saved_set(saved, [3, 7])
    bench.set_path(saved).write_text('{"malicious": [3, 8]}')
    assert bench.set_path(saved).name == "20-0.2-backdoor-0.malicious.json"
    with pytest.raises(SystemExit, match=r"\[3, 8\], this run's are \[3, 7\]"):
        bench.check_saved_set(saved, [3, 7])
    bench.check_saved_set(saved, [3, 8])
    # the probes' loader checks it too (20 clients, 20 %, the attack seeded like the run)
    torch.save(bench.seeded_model(0).state_dict(), saved)
    with pytest.raises(SystemExit, match="this run's are"):
        bench.load_saved(tmp_path, "backdoor", 0)
    bench.set_path(saved).write_text(json.dumps({"malicious": bench.malicious_clients(0.2, 20, 0)}))
    assert not bench.load_saved(tmp_path, "backdoor", 0).training


def test_fresh_then_nc_unlearns_on_the_student_within_one_budget(bench):
    from lightning_fed.callbacks._defence import accuracy
    from lightning_fed.data import PublicData

    argv = ["--quick", "--fractions", "0.2", "--attacks", "backdoor", "--defences", "fresh+nc"]
    rows = bench.main(
        [*argv, "--nc-lr", "0.02", "0.01", "--nc-steps", "20", "--fresh-epochs", "2", "--select-drop", "1"]
    )
    (cell,) = [r for r in rows if r["defence"] == "fresh+nc"]
    assert (
        cell["defence_lr"] == 0.02 and cell["fresh_temperature"] in bench.parse([]).fresh_t
    )  # any drop: the largest
    assert len(cell["nc"]["norms"]) == 10
    # the chain's budget is the teacher's selection accuracy, not the student's
    clean = PublicData(num_samples=60, seed=7, labeled=True)
    select = PublicData(num_samples=40, seed=8, labeled=True)
    args = bench.parse(["--quick", "--nc-lr", "0.05", "0.01", "--nc-steps", "20", "--select-drop", "0"])
    student = bench.seeded_model(1)
    above = accuracy(student, select.x, select.y) + 0.5  # out of reach: the smallest lr
    assert bench.repair_nc(student, clean, select, 0, args, base=above)[1] == 0.01
    assert bench.repair_nc(student, clean, select, 0, args, base=-1.0)[1] == 0.05  # any copy is within it


def test_the_fresh_columns_choose_their_temperature_by_their_own_rules(bench):
    from lightning_fed.callbacks._defence import accuracy
    from lightning_fed.data import PublicData

    args = bench.parse(["--select-drop", "0.02"])
    model, clean = bench.seeded_model(0), PublicData(num_samples=40, seed=7, labeled=True)
    select = PublicData(num_samples=50, seed=8, labeled=True)
    base = accuracy(model, select.x, select.y)
    a, b, c = object(), object(), object()  # the students, highest temperature first, as fresh_candidates lists them
    within = [(4.0, base + 0.10, a), (2.0, base - 0.01, b), (1.0, base - 0.03, c)]
    # fresh: the lowest temperature within the budget (1 is 3 points below: 2); freshpatch: the best on the records
    assert bench.choose_fresh_temperature(model, clean, select, 0, args, "fresh", within) == (2.0, b)
    assert bench.choose_fresh_temperature(model, clean, select, 0, args, "freshpatch", within) == (4.0, a)
    tie = [(4.0, 0.5, a), (2.0, 0.7, b), (1.0, 0.7, c)]
    assert bench.choose_fresh_temperature(model, clean, select, 0, args, "freshpatch", tie) == (1.0, c)
    below = [(4.0, base - 0.1, a), (2.0, base - 0.2, b), (1.0, base - 0.3, c)]
    assert bench.choose_fresh_temperature(model, clean, select, 0, args, "fresh", below) == (4.0, a)


def test_the_freshpatch_column_records_every_temperature(bench):
    argv = ["--quick", "--fractions", "0.2", "--attacks", "backdoor", "--defences", "freshpatch"]
    rows = bench.main([*argv, "--fresh-epochs", "1"])
    (cell,) = [r for r in rows if r["defence"] == "freshpatch"]
    cands = cell["fresh_candidates"]
    assert [c["t"] for c in cands] == sorted(bench.parse([]).fresh_t, reverse=True)
    best = max(c["select_acc"] for c in cands)
    chosen = min(c["t"] for c in cands if c["select_acc"] == best)
    assert cell["fresh_temperature"] == chosen
    picked = next(c for c in cands if c["t"] == chosen)
    assert (cell["acc"], cell["asr"]) == (picked["acc"], picked["asr"])  # the cell is the chosen student's
