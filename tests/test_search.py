"""Architecture search under a device budget: every choice within its measured budget, deterministic for a seed,
an interrupted search continues to the same choice, impossible budgets and bad spaces refused at construction,
and the recipe it writes runs with `lightning-fed fit`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from lightning_fed.callbacks.footprint import measure_size
from lightning_fed.cli import build_parser, run
from lightning_fed.models import MNIST1DCNN
from lightning_fed.search import ArchSearch

ROOT = Path(__file__).parents[1]
FEDDF = str(ROOT / "recipes" / "mnist1d" / "feddf.yaml")
SEARCH_RECIPE = ROOT / "recipes" / "search" / "mnist1d_tiers.yaml"
# a tiny proxy: 600 samples, 4 clients (2 a round), one round, a few distillation steps
TINY = {
    "data.init_args.num_samples": 600,
    "data.init_args.val_fraction": 0.2,
    "loop.num_clients": 4,
    "loop.clients_per_round": 2,
    "loop.local_epochs": 1,
    "loop.strategy.init_args.distill_steps": 2,
    "loop.strategy.init_args.proxy_size": 64,
    "loop.strategy.init_args.public.init_args.num_samples": 64,
}
SPACE = {"channels": [4, 8, 16], "depth": [3, 4]}
BUDGETS = [{"macs": 5000}, {"params": 2000}, {"bytes": 12000}]


def search(out: Path, **kw) -> ArchSearch:
    args = {
        "recipe": FEDDF,
        "space": SPACE,
        "budgets": BUDGETS,
        "trials": 2,
        "random_trials": 1,
        "proxy_rounds": 1,
        "proxy": TINY,
        "seed": 0,
        "output_dir": str(out),
    }
    args.update(kw)
    return ArchSearch(**args)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One complete tiny search (3 tiers, 2 trials each: a random draw, then a neighbour of the best)."""
    return search(tmp_path_factory.mktemp("search") / "a").run()


def _history(result):
    return [(h["tier"], h["knobs"], h["score"]) for h in result.trials]


def test_every_trial_and_choice_within_its_measured_budget(done):
    assert [sum(h["tier"] == t for h in done.trials) for t in range(3)] == [2, 2, 2]
    assert [h["drawn"] for h in done.trials] == ["random", "neighbour"] * 3
    for h in done.trials:
        assert all(h["footprint"][k] <= v for k, v in BUDGETS[h["tier"]].items()), h
        assert 0.0 <= h["score"] <= 1.0
    # the written recipe's models, built and measured again, are within their tiers' budgets
    cfg = build_parser().parse_args(["fit", "--config", str(done.recipe)])
    init = build_parser().instantiate(cfg)["fit"]
    models = [init.model, *init.loop.strategy.tiers.models]
    for t, (model, chosen) in enumerate(zip(models, done.chosen, strict=True)):
        fp = measure_size(model, torch.zeros(1, 40))
        assert fp == chosen["footprint"]
        assert all(fp[k] <= v for k, v in BUDGETS[t].items()), (t, fp)
        assert {k: model.hparams[k] for k in SPACE} == chosen["knobs"]
    # the chosen trial is the best-scoring one of its tier
    for t, chosen in enumerate(done.chosen):
        assert chosen["score"] == max(h["score"] for h in done.trials if h["tier"] == t)


def test_over_budget_candidates_are_never_trained(done):
    over = {
        (16, 3),
        (16, 4),
    }  # 14,394 and 18,314 MACs: over tier 0's 5,000; 2,474 and 3,258 params: over tier 1's
    for h in done.trials:
        if h["tier"] in (0, 1):
            assert (h["knobs"]["channels"], h["knobs"]["depth"]) not in over


def test_results_are_written(done):
    rows = (done.run_dir / "trials.csv").read_text().splitlines()
    assert rows[0] == "tier,name,trial,drawn,channels,depth,macs,params,bytes,score,seconds"
    assert len(rows) == 1 + 6
    text = done.recipe.read_text()
    assert text.startswith("# Written by `lightning-fed search`") and "budget macs <= 5,000" in text


def test_deterministic_for_a_seed(done, tmp_path):
    again = search(tmp_path / "b").run()
    assert _history(again) == _history(done)
    assert again.recipe.read_text().replace(str(again.run_dir), "") == done.recipe.read_text().replace(
        str(done.run_dir), ""
    )
    # another seed draws another first candidate of tier 2 (five candidates within budget; pinned for seeds 0, 1)
    assert search(tmp_path / "c", seed=1).next_candidate(2)[0] != search(tmp_path / "d").next_candidate(2)[0]


def test_interrupted_search_resumes_to_the_same_choice(done, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    first = search(out)
    real = ArchSearch._proxy_score
    calls = {"n": 0}

    def killed_after_three(self, tier, knobs):
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed during the fourth proxy run (tier 1's second trial)
        calls["n"] += 1
        return real(self, tier, knobs)

    monkeypatch.setattr(ArchSearch, "_proxy_score", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    monkeypatch.setattr(ArchSearch, "_proxy_score", real)
    assert len(yaml.safe_load((out / "search.json").read_text())["trials"]) == 3
    resumed = search(out)
    assert len(resumed.history) == 3  # continued from the folder, not started over
    result = resumed.run()
    assert _history(result) == _history(done)
    assert [c["knobs"] for c in result.chosen] == [c["knobs"] for c in done.chosen]


def test_impossible_budget_refused_with_the_smallest_footprint(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"budgets\[1\]=\{'macs': 100.0\} \(tier tier1\) is met by no candidate; "
        r"the smallest, \{'channels': 4, 'depth': 3\}, measures params 338, "
        r"macs 1,446, bytes 1,912",
    ):
        search(tmp_path, budgets=[{"macs": 5000}, {"macs": 100}, {"macs": 5000}])
    assert not (tmp_path / "search.json").exists()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (
            {"space": {"width": [4, 8]}},
            r"space.width is not allowed; .*MNIST1DCNN \(tier 0\) takes no argument 'width'",
        ),
        ({"space": {"channels": []}}, r"space.channels=\[\] is not allowed; give a non-empty list"),
        (
            {"space": {"channels": [4, 4]}},
            r"space.channels=\[4, 4\] is not allowed; give a non-empty list of distinct",
        ),
        ({"space": {"depth": [2, 3]}}, r"space \{'depth': 2\} is not allowed; .*depth=2 is not allowed"),
        ({"space": {}}, r"space=\{\} is not allowed"),
        ({"budgets": [{"macs": 5000}]}, r"budgets has 1 entries; .* has 3 tiers \(tier0, tier1, tier2\)"),
        (
            {"budgets": [{"latency_ms": 1}, {"macs": 1e5}, {"macs": 1e5}]},
            r"budgets\[0\]=\{'latency_ms': 1\} is not",
        ),
        (
            {"budgets": [{"macs": 0}, {"macs": 1e5}, {"macs": 1e5}]},
            r"budgets\[0\]=\{'macs': 0\} is not allowed",
        ),
        (
            {"metric": "test_acc"},
            r"metric='test_acc' is not allowed; the search is judged on validation data",
        ),
        ({"trials": 0}, r"trials=0 is not allowed"),
        ({"proxy": {"loop.roundz": 2}}, r"proxy=\{'loop.roundz': 2\} .* does not give a valid recipe"),
    ],
)
def test_bad_configuration_refused_naming_the_key(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        search(tmp_path, **kw)
    assert not (tmp_path / "search.json").exists()


def test_other_settings_in_the_same_folder_refused(done):
    with pytest.raises(ValueError, match=r"holds a search with other settings \(they differ in seed\)"):
        search(done.run_dir, seed=5)


def test_user_module_through_its_constructor_arguments(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes" / "mnist1d" / "fedavg.yaml").read_text())
    recipe["model"] = {"class_path": "lightning_fed.models.MNIST1DMLP", "init_args": {"hidden": 100}}
    path = tmp_path / "mlp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proxy = {
        "data.init_args.num_samples": 600,
        "data.init_args.val_fraction": 0.2,
        "loop.num_clients": 4,
        "loop.clients_per_round": 2,
        "loop.local_epochs": 1,
    }
    result = ArchSearch(
        recipe=str(path),
        space={"hidden": [8, 16, 32, 64]},
        budgets=[{"params": 2000}],
        trials=2,
        proxy_rounds=1,
        proxy=proxy,
        output_dir=str(tmp_path / "out"),
    ).run()
    # hidden=32: 40*32+32 + 32*32+32 + 32*10+10 = 2,698 parameters, over budget; 8 and 16 fit
    assert sorted(h["knobs"]["hidden"] for h in result.trials) == [8, 16]
    assert (
        yaml.safe_load(result.recipe.read_text())["model"]["init_args"]["hidden"]
        == result.chosen[0]["knobs"]["hidden"]
    )


def test_cli_search_then_fit_the_written_recipe(tmp_path):
    out = tmp_path / "cli"
    proxy = "{" + ", ".join(f'"{k}": {v}' for k, v in TINY.items()) + "}"
    res = run(
        [
            "search",
            "--config",
            str(SEARCH_RECIPE),
            "--trials",
            "1",
            "--proxy_rounds",
            "1",
            "--recipe",
            FEDDF,
            "--proxy",
            proxy,
            "--output_dir",
            str(out),
        ]
    )
    assert res.recipe == out / "recipe.yaml" and len(res.trials) == 3
    fit = run(
        [
            "fit",
            "--config",
            str(res.recipe),
            "--loop.rounds",
            "1",
            "--loop.num_clients",
            "4",
            "--loop.clients_per_round",
            "2",
            "--loop.local_epochs",
            "1",
            "--loop.verbose",
            "false",
            "--loop.plot",
            "false",
            "--loop.strategy.init_args.distill_steps",
            "2",
            "--loop.output_dir",
            str(tmp_path / "fit"),
        ]
    )
    assert len(fit.history) == 1 and fit.history[0]["good"] >= 1
    saved = yaml.safe_load((fit.run_dir / "config.yaml").read_text())
    tiers = [saved["model"], *saved["loop"]["strategy"]["init_args"]["tiers"]["init_args"]["models"]]
    assert [{k: m["init_args"][k] for k in SPACE} for m in tiers] == [c["knobs"] for c in res.chosen]


def test_cli_refuses_a_bad_search_recipe(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(
            [
                "search",
                "--config",
                str(SEARCH_RECIPE),
                "--space",
                '{"width": [4]}',
                "--output_dir",
                str(tmp_path),
            ]
        )
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("lightning-fed: error: search: space.width is not allowed")


def test_search_recipe_parses():
    cfg = build_parser().parse_args(["search", "--config", str(SEARCH_RECIPE)])
    assert cfg.search.recipe == "recipes/mnist1d/feddf.yaml" and len(cfg.search.budgets) == 3


def test_cnn_depth_knob():
    torch.manual_seed(0)
    deep = MNIST1DCNN(channels=6, depth=5)
    x = torch.randn(3, 40)
    for split in (1, 2, 3):
        torch.testing.assert_close(deep.classify(deep.extract(x, split), split), deep(x))
    assert len(deep.extra) == 2
    # depth 3 is the paper's model: same parameter names as before the knob existed
    assert list(MNIST1DCNN(channels=6).state_dict()) == [
        f"{n}.{p}" for n in ("conv1", "conv2", "conv3", "head") for p in ("weight", "bias")
    ]
    with pytest.raises(ValueError, match=r"depth=2 is not allowed; depth must be >= 3"):
        MNIST1DCNN(depth=2)


def test_docs_tiers_footprint_example(capsys):
    doc = (ROOT / "docs" / "tiers.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL) if "measure_size" in b)
    exec(compile(code, "docs/tiers.md", "exec"), {})  # noqa: S102 - the documented example itself
    printed = capsys.readouterr().out.splitlines()
    assert printed == [line[2:] for line in code.splitlines() if line.startswith("# ")]
