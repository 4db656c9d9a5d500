"""``lightning-fed``: run a YAML recipe (LightningCLI conventions: ``class_path``/``init_args``,
``--print_config``, dotted overrides such as ``--loop.rounds 5``).

Example::

    lightning-fed fit --config recipes/mnist1d/fedavg.yaml --loop.rounds 5
    lightning-fed fit --config recipes/mnist1d/fedavg.yaml --print_config
    lightning-fed fit --config recipes/mnist1d/fedavg.yaml --resume last
    lightning-fed search --config recipes/search/mnist1d_tiers.yaml   # each tier's architecture, docs/tiers.md
    lightning-fed flower --config recipes/mnist1d/fedavg.yaml --app-dir flower-app   # docs/deployment.md
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

from lightning_fed import prelaunch

if __name__ == "__main__":  # `python -m lightning_fed.cli`: the other ranks start before the heavy imports below,
    prelaunch.start(sys.argv[1:])  # and import and build the recipe beside this one

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from lightning_fed.checkpoint import CheckpointError
from lightning_fed.data.partition import PartitionError
from lightning_fed.identity import ResumeMismatch
from lightning_fed.loop import FedLoop
from lightning_fed.ranks import RankFailed
from lightning_fed.recipe_errors import instantiation_error, parse_error
from lightning_fed.search import ArchSearch

log = logging.getLogger("lightning_fed")


def build_parser() -> ArgumentParser:
    """The ``lightning-fed`` argument parser with its ``fit`` and ``search`` subcommands; errors raise
    ``ArgumentError``."""
    return _build_parsers()[0]


def _build_parsers() -> tuple[ArgumentParser, ArgumentParser]:
    """The root parser and its ``fit`` subcommand parser (kept, to dump the resolved ``fit`` config)."""
    parser = ArgumentParser(prog="lightning-fed", description="Federated training of Lightning modules from recipes.",
                            exit_on_error=False)
    subcommands = parser.add_subcommands(required=True, dest="subcommand")
    fit = ArgumentParser(description="Train a LightningModule federated, as a recipe describes.", exit_on_error=False)
    fit.add_argument("--config", action=ActionConfigFile, help="YAML recipe (may be given more than once).")
    fit.add_subclass_arguments(L.LightningModule, "model", required=True, help="The LightningModule to train.")
    fit.add_subclass_arguments(L.LightningDataModule, "data", required=True, help="The data to split among clients.")
    fit.add_class_arguments(FedLoop, "loop", help="The federated loop.")
    fit.add_argument("--resume", type=str | None, default=None,
                     help="Run folder or checkpoint to continue from, or 'last' for the newest run under "
                          "loop.output_dir. The run's settings must match the checkpoint's (docs/resume.md).")
    subcommands.add_subcommand("fit", fit, help="Federated training from a recipe.")
    search = ArgumentParser(description="Search each tier's architecture within its device budget (docs/tiers.md).",
                            exit_on_error=False)
    search.add_argument("--config", action=ActionConfigFile, help="YAML search recipe (recipes/search/).")
    search.add_class_arguments(ArchSearch, None, as_group=False)
    subcommands.add_subcommand("search", search, help="Architecture search per tier under a device budget.")
    return parser, fit


def _setup_logging() -> None:
    if logging.getLogger().handlers:
        return
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    for noisy in ("lightning", "lightning.fabric", "lightning.pytorch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lightning-fed`` console script."""
    run(argv)


def run(argv: list[str] | None = None) -> Any:
    """Parse ``argv``, build the objects and run the subcommand; return its result (a ``FitResult``, or a
    ``SearchResult`` for ``search``).

    A bad recipe, a refused resume or a missing checkpoint prints ``lightning-fed: error: ...`` (the recipe
    file, the full key and what is wrong, no usage text) and exits with code 2."""
    _setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "flower":  # optional extra: imported only when asked for
        from lightning_fed.flower.command import main as flower_main

        return flower_main(argv[1:])
    parser, fit, cfg = _parse(argv)
    if cfg.subcommand == "search":
        return _search(cfg["search"])
    recipe = _build(parser, fit, cfg, argv)
    try:
        return recipe.loop.fit(recipe.model, recipe.data, resume=recipe.resume, run_config=recipe.config_text)
    except (CheckpointError, PartitionError, ResumeMismatch, FileNotFoundError, RankFailed) as err:
        _fail(str(err))


@dataclass
class Recipe:
    """A recipe's objects, built as ``lightning-fed fit`` builds them (seeded, so the initial model is the same).

    Attributes:
        model: the LightningModule.
        data: the LightningDataModule.
        loop: the FedLoop.
        resume: the ``--resume`` value.
        config_text: the resolved configuration (YAML), saved as the run's ``config.yaml``.
    """

    model: L.LightningModule
    data: L.LightningDataModule
    loop: FedLoop
    resume: str | None
    config_text: str


def load_recipe(argv: list[str]) -> Recipe:
    """Parse a ``fit`` command line (``["fit", "--config", "recipe.yaml", ...]``) and build its objects; a bad
    recipe prints ``lightning-fed: error: ...`` and exits with code 2."""
    parser, fit, cfg = _parse(argv)
    if cfg.subcommand != "fit":
        _fail(f"load_recipe builds a 'fit' command line, not '{cfg.subcommand}'")
    return _build(parser, fit, cfg, argv)


def _parse(argv: list[str]) -> tuple[ArgumentParser, ArgumentParser, Any]:
    """The parsers and the parsed command line; a parse error exits with code 2."""
    parser, fit = _build_parsers()
    try:
        cfg = parser.parse_args(argv)
    except ArgumentError as err:
        _fail(parse_error(err, argv))
    return parser, fit, cfg


def _build(parser: ArgumentParser, fit: ArgumentParser, cfg: Any, argv: list[str]) -> Recipe:
    """Instantiate a parsed ``fit`` command line (seeded first, so the initial model is the same)."""
    fit_cfg = cfg["fit"]
    L.seed_everything(fit_cfg.loop.seed, verbose=False)  # the initial global model depends on the seed
    config_text = fit.dump(fit_cfg, skip_unset=False)
    try:
        init = parser.instantiate(cfg)["fit"]
    except (ValueError, TypeError) as err:
        _fail(instantiation_error(err, fit_cfg.clone().as_dict(), argv))
    return Recipe(init.model, init.data, init.loop, fit_cfg.resume, config_text)


def _search(cfg: Any) -> Any:
    import inspect

    kwargs = {k: cfg[k] for k in inspect.signature(ArchSearch).parameters if k in cfg}
    try:
        search = ArchSearch(**kwargs)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err).replace("ArchSearch: ", "search: ", 1))
    return search.run()


def _fail(message: str) -> NoReturn:
    print(f"lightning-fed: error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    try:
        main()
    finally:
        prelaunch.stop_unadopted()
