"""``lightning-fed``: run a YAML recipe (LightningCLI conventions: ``class_path``/``init_args``,
``--print_config``, dotted overrides such as ``--loop.rounds 5``).

Example::

    lightning-fed fit --config recipes/mnist1d/fedavg.yaml --loop.rounds 5
    lightning-fed fit --config recipes/mnist1d/fedavg.yaml --print_config
    lightning-fed fit --config recipes/mnist1d/fedavg.yaml --resume last
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_fed.checkpoint import CheckpointError
from lightning_fed.data.partition import PartitionError
from lightning_fed.loop import FedLoop

log = logging.getLogger("lightning_fed")


def build_parser() -> ArgumentParser:
    """The ``lightning-fed`` argument parser with its ``fit`` subcommand."""
    parser = ArgumentParser(prog="lightning-fed", description="Federated training of Lightning modules from recipes.")
    subcommands = parser.add_subcommands(required=True, dest="subcommand")
    fit = ArgumentParser(description="Train a LightningModule federated, as a recipe describes.")
    fit.add_argument("--config", action=ActionConfigFile, help="YAML recipe (may be given more than once).")
    fit.add_subclass_arguments(L.LightningModule, "model", required=True, help="The LightningModule to train.")
    fit.add_subclass_arguments(L.LightningDataModule, "data", required=True, help="The data to split among clients.")
    fit.add_class_arguments(FedLoop, "loop", help="The federated loop.")
    fit.add_argument("--resume", type=str | None, default=None,
                     help="Run folder or checkpoint to continue from, or 'last' for the newest run under loop.output_dir.")
    subcommands.add_subcommand("fit", fit, help="Federated training from a recipe.")
    return parser


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
    """Parse ``argv``, build the objects and run the subcommand; return its result (a ``FitResult``)."""
    _setup_logging()
    parser = build_parser()
    cfg = parser.parse_args(argv)
    fit_cfg = cfg["fit"]
    L.seed_everything(fit_cfg.loop.seed, verbose=False)  # the initial global model depends on the seed
    sub = parser._subcommands_action._name_parser_map["fit"]
    config_text = sub.dump(fit_cfg, skip_none=False)
    try:
        init = parser.instantiate_classes(cfg)["fit"]
    except (ValueError, TypeError) as err:
        parser.error(f"invalid configuration: {err}")
    try:
        return init.loop.fit(init.model, init.data, resume=fit_cfg.resume, run_config=config_text)
    except (CheckpointError, PartitionError, FileNotFoundError) as err:
        print(f"lightning-fed: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
