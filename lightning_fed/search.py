"""Architecture search under a device budget: pick each tier's model size for its devices.

A tiered recipe (``recipes/mnist1d/feddf.yaml``: the loop's ``model`` is tier 0, the strategy's
``tiers.init_args.models`` are tiers 1, 2, ...) names one architecture per tier by hand. :class:`ArchSearch` turns
the size knobs of each tier's model class (any constructor arguments: the MNIST-1D CNN's ``channels`` and
``depth``, or a user module's) so that the tier's model fits its budget (MACs per sample, parameters or serialized
bytes, *measured* by the footprint counter on the built model) and scores best on validation data after a short
federated proxy run: a few rounds of the recipe itself with the candidate in the tier's place.

The search per tier is seeded and keeps its state in ``search.json`` (written atomically after every trial):
the first ``random_trials`` candidates are drawn at random among those within budget, the later ones are
neighbours of the best so far (one knob moved to the next value of its list; an evolutionary step), every draw
from ``random.Random`` keyed by (seed, tier, trial). A candidate therefore depends only on the seed and on the
trials before it, so an interrupted search continued from its folder chooses what an uninterrupted one chooses.
Candidates over budget are rejected before any training; a budget no candidate meets is refused at construction.

Example::

    search = ArchSearch(recipe="recipes/mnist1d/feddf.yaml", space={"channels": [4, 8, 16, 32], "depth": [3, 4]},
                        budgets=[{"macs": 5000}, {"macs": 20000}, {"params": 20000}],
                        proxy={"data.init_args.val_fraction": 0.1}, trials=4, output_dir="runs/search")
    result = search.run()   # result.recipe: a recipe for `lightning-fed fit --config ...`
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import ArgumentParser
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lightning_fed.search_space import (
    check_space,
    example_input,
    measure_candidate,
    set_dotted,
    tier_entries,
    tier_names,
    with_knobs,
)
from lightning_fed.validation import CheckedArguments

log = logging.getLogger("lightning_fed")

MEASURES = ("macs", "params", "bytes")
"""What a budget may bound: the footprint counter's deterministic measures (MACs per sample, parameters, bytes)."""


@dataclass
class SearchResult:
    """What :meth:`ArchSearch.run` returns.

    Attributes:
        run_dir: the search's folder (``search.json``, ``trials.csv``, ``recipe.yaml``).
        trials: every trial: ``tier``, ``trial``, ``knobs``, ``footprint``, ``score``.
        chosen: per tier, the best trial (highest score; ties to the smaller MACs, then the earlier trial).
        recipe: the written recipe, the searched one with each tier's chosen knobs.
    """

    run_dir: Path
    trials: list[dict[str, Any]] = field(default_factory=list)
    chosen: list[dict[str, Any]] = field(default_factory=list)
    recipe: Path | None = None


class ArchSearch(CheckedArguments):
    """Search each tier's size knobs for the best validation score within its measured budget.

    Args:
        recipe: the ``lightning-fed fit`` recipe whose tiers are searched (tier 0 is its ``model``, tier ``t`` its
            strategy's ``tiers.init_args.models[t-1]``); the proxy runs it and the result is written from it.
        space: constructor arguments of the tiers' model classes and the values each may take, e.g.
            ``{"channels": [4, 8, 16, 32], "depth": [3, 4, 5]}`` (a value list in increasing size: the
            evolutionary step moves one knob to its neighbour in the list). Every combination is a candidate.
        budgets: one per tier, tier 0 first: the bound on each named measure (``macs`` per sample, ``params``,
            ``bytes``), e.g. ``{"macs": 20000}``; a candidate must meet every bound of its tier.
        trials: proxy runs per tier (fewer when fewer candidates are within budget).
        random_trials: the first trials of a tier, drawn at random among the candidates within budget; the rest
            are neighbours of the best so far (``None``: half of ``trials``, at least 1).
        proxy_rounds: federated rounds of each proxy run.
        proxy: dotted recipe keys set for the proxy runs only (``{"data.init_args.val_fraction": 0.1,
            "loop.strategy.init_args.distill_steps": 20}``): a validation split to judge on, a cheaper run.
        metric: the validation metric maximized (``tier<t>/<metric>`` of a tiered run, else ``<metric>``), read
            from the last round of the proxy run; never a test metric.
        seed: seed of the draws.
        output_dir: the search's folder; a search started again with the same settings continues from it.
        example_input_shape: shape of one input for the footprint counter (``None``: the first training batch).
    """

    def __init__(
        self,
        recipe: str,
        space: dict[str, list[int | float | str | bool]],
        budgets: list[dict[str, float]],
        trials: int = 12,
        random_trials: int | None = None,
        proxy_rounds: int = 3,
        proxy: dict[str, Any] | None = None,
        metric: str = "val_acc",
        seed: int = 0,
        output_dir: str = "runs/search",
        example_input_shape: list[int] | None = None,
    ) -> None:
        if trials < 1:
            raise ValueError(f"ArchSearch: trials={trials!r} is not allowed; trials must be >= 1")
        if random_trials is not None and not 1 <= random_trials <= trials:
            raise ValueError(
                f"ArchSearch: random_trials={random_trials!r} is not allowed; it must be between 1 and "
                f"trials={trials} (or None)"
            )
        if proxy_rounds < 1:
            raise ValueError(
                f"ArchSearch: proxy_rounds={proxy_rounds!r} is not allowed; proxy_rounds must be >= 1"
            )
        if metric.startswith("test"):
            raise ValueError(
                f"ArchSearch: metric={metric!r} is not allowed; the search is judged on validation "
                "data (e.g. 'val_acc'), never on the test set"
            )
        self.recipe_path = Path(recipe)
        self.base = yaml.safe_load(self.recipe_path.read_text())
        if not isinstance(self.base, dict) or "model" not in self.base:
            raise ValueError(
                f"ArchSearch: recipe={recipe!r} is not allowed; it must be a `lightning-fed fit` recipe"
            )
        self.entries = tier_entries(self.base)
        self.names = tier_names(self.base, len(self.entries))
        self.space = check_space(space, self.entries)
        if len(budgets) != len(self.entries):
            raise ValueError(
                f"ArchSearch: budgets has {len(budgets)} entries; {recipe} has {len(self.entries)} "
                f"tiers ({', '.join(self.names)}): give one budget per tier, tier 0 first"
            )
        for t, budget in enumerate(budgets):
            bad = [k for k in budget if k not in MEASURES]
            if not budget or bad or any(not v > 0 for v in budget.values()):
                raise ValueError(
                    f"ArchSearch: budgets[{t}]={budget!r} is not allowed; bound at least one of "
                    f"{MEASURES} by a number > 0 (latency is not a budget: it is not deterministic)"
                )
        self.budgets = [{k: float(v) for k, v in b.items()} for b in budgets]
        self.trials, self.proxy_rounds, self.metric, self.seed = trials, proxy_rounds, metric, seed
        self.random_trials = random_trials if random_trials is not None else max(1, trials // 2)
        self.proxy = dict(proxy or {})
        self.output_dir = Path(output_dir)
        self.candidates = [
            dict(zip(self.space, values)) for values in itertools.product(*self.space.values())
        ]
        self._fit = _fit_parser()
        self._check_proxy()
        example = example_input(self.base, example_input_shape)
        self.footprints = [
            [measure_candidate(self.entries[t], c, example, f"space {c}") for c in self.candidates]
            for t in range(len(self.entries))
        ]
        self.feasible = [
            [i for i, fp in enumerate(self.footprints[t]) if _within(fp, self.budgets[t])]
            for t in range(len(self.entries))
        ]
        for t, ok in enumerate(self.feasible):
            if not ok:
                small = min(
                    range(len(self.candidates)), key=lambda i: _order(self.footprints[t][i], self.budgets[t])
                )
                fp = self.footprints[t][small]
                raise ValueError(
                    f"ArchSearch: budgets[{t}]={self.budgets[t]} (tier {self.names[t]}) is met by no candidate; the "
                    f"smallest, {self.candidates[small]}, measures {_fmt(fp)}: raise the budget or add smaller "
                    "values to the space"
                )
        self.history: list[dict[str, Any]] = []
        self._load_existing()

    def settings(self) -> dict[str, Any]:
        """What a continued search must share with the one it continues (kept in ``search.json``)."""
        return {
            "recipe": self.base,
            "space": self.space,
            "budgets": self.budgets,
            "trials": self.trials,
            "random_trials": self.random_trials,
            "proxy_rounds": self.proxy_rounds,
            "proxy": self.proxy,
            "metric": self.metric,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """The trials so far and the settings they belong to."""
        return {
            "settings": json.loads(json.dumps(self.settings())),
            "trials": [dict(t) for t in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses the trials of a search with other settings."""
        mine = json.loads(json.dumps(self.settings()))
        theirs = state.get("settings", {})
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            raise ValueError(
                f"ArchSearch: output_dir={str(self.output_dir)!r} holds a search with other settings "
                f"(they differ in {', '.join(differ)}): use another output_dir or delete that folder"
            )
        self.history = [dict(t) for t in state.get("trials", [])]

    def _load_existing(self) -> None:
        path = self.output_dir / "search.json"
        if path.exists():
            self.load_state_dict(json.loads(path.read_text()))

    # -- the search -------------------------------------------------------------------------------------------

    def planned(self, tier: int) -> int:
        """Trials of ``tier``: ``trials``, or every candidate within budget when there are fewer."""
        return min(self.trials, len(self.feasible[tier]))

    def next_candidate(self, tier: int) -> tuple[int, str]:
        """Index of the next candidate of ``tier`` (a function of the seed and the tier's trials so far) and how
        it was drawn (``"random"`` or ``"neighbour"``)."""
        done = [h for h in self.history if h["tier"] == tier]
        seen = {h["candidate"] for h in done}
        pool = [i for i in self.feasible[tier] if i not in seen]
        rng = random.Random(f"archsearch/{self.seed}/{tier}/{len(done)}")
        if len(done) >= self.random_trials:
            best = self.best(tier)
            near = [i for i in pool if _neighbours(self.candidates[i], best["knobs"], self.space)]
            if near:
                return rng.choice(near), "neighbour"
        return rng.choice(pool), "random"

    def best(self, tier: int) -> dict[str, Any]:
        """The best trial of ``tier`` so far: highest score, then smaller MACs, then the earlier trial."""
        done = [h for h in self.history if h["tier"] == tier]
        return min(done, key=lambda h: (-h["score"], h["footprint"]["macs"], h["trial"]))

    def run(self, console: Console | None = None) -> SearchResult:
        """Run (or continue) the search, write ``trials.csv`` after every trial and the chosen ``recipe.yaml`` at
        the end; return the :class:`SearchResult`."""
        console = console or Console(stderr=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        total = sum(self.planned(t) for t in range(len(self.entries)))
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("architecture search", total=total, completed=len(self.history))
            for tier in range(len(self.entries)):
                while sum(h["tier"] == tier for h in self.history) < self.planned(tier):
                    index, how = self.next_candidate(tier)
                    n = sum(h["tier"] == tier for h in self.history)
                    progress.update(
                        task,
                        description=f"tier {self.names[tier]}: trial {n + 1}/{self.planned(tier)} "
                        f"({_knobs(self.candidates[index])})",
                    )
                    started = time.perf_counter()
                    score = self._proxy_score(tier, self.candidates[index])
                    self.history.append(
                        {
                            "tier": tier,
                            "name": self.names[tier],
                            "trial": n,
                            "candidate": index,
                            "drawn": how,
                            "knobs": dict(self.candidates[index]),
                            "footprint": self.footprints[tier][index],
                            "score": score,
                            "seconds": round(time.perf_counter() - started, 2),
                        }
                    )
                    self._save()
                    progress.advance(task)
        chosen = [self.best(t) for t in range(len(self.entries))]
        path = self._write_recipe(chosen)
        console.print(self.table(chosen))
        log.info("architecture search: chose %s; recipe %s", [c["knobs"] for c in chosen], path)
        return SearchResult(run_dir=self.output_dir, trials=list(self.history), chosen=chosen, recipe=path)

    def table(self, chosen: list[dict[str, Any]]) -> Table:
        """A rich table of the chosen architecture of each tier against its budget."""
        table = Table(title="Architecture search: chosen per tier")
        for col in ("tier", "budget", "chosen", "macs", "params", "bytes", f"proxy {self.metric}", "trials"):
            table.add_column(col, justify="left" if col in ("tier", "budget", "chosen") else "right")
        for t, c in enumerate(chosen):
            fp = c["footprint"]
            table.add_row(
                self.names[t],
                _fmt(self.budgets[t], "<= "),
                _knobs(c["knobs"]),
                f"{fp['macs']:,.0f}",
                f"{fp['params']:,.0f}",
                f"{fp['bytes']:,.0f}",
                f"{c['score']:.4f}",
                str(self.planned(t)),
            )
        return table

    # -- one trial ----------------------------------------------------------------------------------------------

    def _proxy_config(self, tier: int, knobs: dict[str, Any], out: str) -> dict[str, Any]:
        cfg = with_knobs(self.base, tier, knobs)
        for key, value in self.proxy.items():
            set_dotted(cfg, key, value)
        loop = cfg.setdefault("loop", {})
        loop.update(
            {
                "rounds": self.proxy_rounds,
                "eval_every": self.proxy_rounds,
                "checkpoint_every": 0,
                "verbose": False,
                "plot": False,
                "loggers": None,
                "devices": 1,
                "num_nodes": 1,
                "output_dir": out,
            }
        )
        return cfg

    def _check_proxy(self) -> None:
        """Parse the proxy recipe (with the first candidate in every tier) so a bad ``proxy`` key fails here."""
        for tier in range(len(self.entries)):
            cfg = self._proxy_config(tier, self.candidates[0], str(self.output_dir / "proxy"))
            try:
                self._fit.parse_object(cfg)
            except Exception as err:  # noqa: BLE001 - jsonargparse raises several kinds; all mean a bad recipe
                raise ValueError(
                    f"ArchSearch: proxy={self.proxy!r} with space={self.space!r} does not give a "
                    f"valid recipe: {str(err).splitlines()[0]}"
                ) from None

    def _proxy_score(self, tier: int, knobs: dict[str, Any]) -> float:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="proxy-", dir=self.output_dir) as tmp:
            cfg = self._fit.parse_object(self._proxy_config(tier, knobs, tmp))
            L.seed_everything(cfg.loop.seed, verbose=False)  # as `lightning-fed fit`: the initial model
            init = self._fit.instantiate(cfg)
            result = init.loop.fit(init.model, init.data)
        key = f"tier{tier}/{self.metric}" if len(self.entries) > 1 else self.metric
        last = result.history[-1] if result.history else {}
        if key not in last:
            raise RuntimeError(
                f"ArchSearch: the proxy run logged no {key!r} (it logged "
                f"{sorted(k for k in last if 'val' in k) or 'no validation metric'}): give the data a "
                "validation split in `proxy` (e.g. data.init_args.val_fraction: 0.1)"
            )
        return float(last[key])

    # -- files --------------------------------------------------------------------------------------------------

    def _save(self) -> None:
        _atomic_write(self.output_dir / "search.json", json.dumps(self.state_dict(), indent=1))
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["tier", "name", "trial", "drawn", *self.space, *MEASURES, "score", "seconds"])
        for h in self.history:
            writer.writerow(
                [
                    h["tier"],
                    h["name"],
                    h["trial"],
                    h["drawn"],
                    *(h["knobs"][k] for k in self.space),
                    *(int(h["footprint"][m]) for m in MEASURES),
                    h["score"],
                    h["seconds"],
                ]
            )
        _atomic_write(self.output_dir / "trials.csv", buf.getvalue())

    def _write_recipe(self, chosen: list[dict[str, Any]]) -> Path:
        cfg = self.base
        for t, c in enumerate(chosen):
            cfg = with_knobs(cfg, t, c["knobs"])
        cfg.setdefault("loop", {})["output_dir"] = str(self.output_dir / "fit")
        lines = [
            f"# Written by `lightning-fed search` from {self.recipe_path} (seed {self.seed}): each tier's",
            f"# architecture chosen by {self.proxy_rounds}-round proxy runs on validation data, within its budget.",
            "#   lightning-fed fit --config " + str(self.output_dir / "recipe.yaml"),
        ]
        for t, c in enumerate(chosen):
            lines.append(
                f"# tier {self.names[t]}: {_knobs(c['knobs'])}; budget {_fmt(self.budgets[t], '<= ')}, "
                f"measured {_fmt(c['footprint'])}; proxy {self.metric} {c['score']:.4f}"
            )
        path = self.output_dir / "recipe.yaml"
        _atomic_write(path, "\n".join(lines) + "\n" + yaml.safe_dump(cfg, sort_keys=False))
        return path


# -- recipe plumbing ------------------------------------------------------------------------------------------------


def _fit_parser() -> ArgumentParser:
    from lightning_fed.cli import _build_parsers

    return _build_parsers()[1]


def _within(fp: dict[str, float], budget: dict[str, float]) -> bool:
    return all(fp[k] <= v for k, v in budget.items())


def _order(fp: dict[str, float], budget: dict[str, float]) -> tuple[float, ...]:
    return tuple(fp[k] / v for k, v in budget.items())


def _neighbours(a: dict[str, Any], b: dict[str, Any], space: dict[str, list[Any]]) -> bool:
    """Whether ``a`` differs from ``b`` in one knob, by one step of that knob's value list."""
    diff = [k for k in space if a[k] != b[k]]
    return len(diff) == 1 and abs(space[diff[0]].index(a[diff[0]]) - space[diff[0]].index(b[diff[0]])) == 1


def _knobs(knobs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items())


def _fmt(values: dict[str, float], prefix: str = "") -> str:
    return ", ".join(f"{k} {prefix}{v:,.0f}" for k, v in values.items() if k in MEASURES)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


__all__ = ["MEASURES", "ArchSearch", "SearchResult"]
