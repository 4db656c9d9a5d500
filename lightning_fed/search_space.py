"""The candidates of an architecture search (:mod:`lightning_fed.search`): the tiers of a ``fit`` recipe, a search
space over their model's constructor arguments, and each candidate built and measured by the footprint counter."""

from __future__ import annotations

import importlib
import inspect
import json
from typing import Any

import lightning as L
from jsonargparse import ArgumentParser

from lightning_fed.callbacks._compress import example_from_batch
from lightning_fed.callbacks.footprint import measure_size

MAX_CANDIDATES = 4096
"""Largest search space (the product of the knobs' value counts): every candidate is built and measured up front."""
TIERS_KEY = ("loop", "strategy", "init_args", "tiers", "init_args", "models")
"""Where a recipe lists the models of tiers 1, 2, ... (tier 0 is its ``model``)."""


def tier_entries(recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``class_path``/``init_args`` entry of every tier: the recipe's model, then the strategy's tier models."""
    node: Any = recipe
    for key in TIERS_KEY:
        node = node.get(key) if isinstance(node, dict) else None
    extra = node if isinstance(node, list) else []
    entries = [recipe["model"], *extra]
    bad = [t for t, e in enumerate(entries) if not isinstance(e, dict) or "class_path" not in e]
    if bad:
        raise ValueError(
            f"ArchSearch: recipe tier {bad[0]} is not allowed; every tier's model must be given as "
            "class_path/init_args"
        )
    return entries


def tier_names(recipe: dict[str, Any], n: int) -> list[str]:
    """The tiers' names (``ModelTiers`` ``names`` in the recipe, else ``tier0``, ``tier1``, ...)."""
    try:
        names = recipe["loop"]["strategy"]["init_args"]["tiers"]["init_args"]["names"]
    except (KeyError, TypeError):
        names = None
    return (
        [str(x) for x in names]
        if isinstance(names, list) and len(names) == n
        else [f"tier{t}" for t in range(n)]
    )


def import_class(class_path: str) -> type:
    """The class a recipe's ``class_path`` names; ``ValueError`` when it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"ArchSearch: the recipe's class_path {class_path!r} cannot be imported") from None


def check_space(space: dict[str, list[Any]], entries: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """``space`` validated against every tier's model class (known constructor arguments, non-empty lists of
    distinct values, at most :data:`MAX_CANDIDATES` combinations); ``ValueError`` naming the key otherwise."""
    if not space:
        raise ValueError(
            "ArchSearch: space={} is not allowed; name at least one constructor argument and its values"
        )
    for name, values in space.items():
        if not isinstance(values, list) or not values or len(set(map(repr, values))) != len(values):
            raise ValueError(
                f"ArchSearch: space.{name}={values!r} is not allowed; give a non-empty list of "
                "distinct values"
            )
        for t, entry in enumerate(entries):
            params = inspect.signature(import_class(entry["class_path"])).parameters
            if name not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                raise ValueError(
                    f"ArchSearch: space.{name} is not allowed; {entry['class_path']} (tier {t}) takes "
                    f"no argument {name!r} (it takes {', '.join(p for p in params if p != 'self')})"
                )
    size = 1
    for values in space.values():
        size *= len(values)
    if size > MAX_CANDIDATES:
        raise ValueError(
            f"ArchSearch: space has {size} candidates; at most {MAX_CANDIDATES} are allowed (each is "
            "built and measured before the search): give fewer values"
        )
    return {k: list(v) for k, v in space.items()}


def with_knobs(recipe: dict[str, Any], tier: int, knobs: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``recipe`` with ``knobs`` set in tier ``tier``'s ``init_args``."""
    cfg = json.loads(json.dumps(recipe))
    entry = cfg["model"] if tier == 0 else dig(cfg, TIERS_KEY)[tier - 1]
    entry["init_args"] = {**(entry.get("init_args") or {}), **knobs}
    return cfg


def dig(cfg: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """The value at the path ``keys`` of nested dicts."""
    for key in keys:
        cfg = cfg[key]
    return cfg


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted recipe key ``key`` (``loop.strategy.init_args.distill_steps``; digits index lists) in ``cfg``."""
    node: Any = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ValueError(
                f"ArchSearch: proxy key {key!r} is not allowed; {part!r} is not a section of the recipe"
            )
    node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = value


def example_input(recipe: dict[str, Any], shape: list[int] | None) -> Any:
    """One input for the footprint counter: ``zeros(shape)``, else the first training batch of the recipe's data."""
    import torch

    if shape is not None:
        if not shape or any(d < 1 for d in shape):
            raise ValueError(f"ArchSearch: example_input_shape={shape!r} is not allowed; give sizes >= 1")
        return torch.zeros(shape)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    data = parser.instantiate(parser.parse_object({"data": recipe["data"]})).data
    data.setup("fit")
    example = example_from_batch(next(iter(data.train_dataloader())))
    if example is None:
        raise ValueError(
            "ArchSearch: the recipe's first training batch gives no model input; set example_input_shape"
        )
    return example


def measure_candidate(
    entry: dict[str, Any], knobs: dict[str, Any], example: Any, where: str
) -> dict[str, float]:
    """The footprint (:func:`~lightning_fed.callbacks.footprint.measure_size`) of the tier model ``entry`` built
    with ``knobs``; ``ValueError`` naming ``where`` when its constructor refuses them."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model")
    built = {"class_path": entry["class_path"], "init_args": {**(entry.get("init_args") or {}), **knobs}}
    try:
        if any(
            isinstance(v, dict) for v in built["init_args"].values()
        ):  # nested objects: jsonargparse builds them
            model = parser.instantiate(parser.parse_object({"model": built})).model
        else:  # plain values: the constructor's own message names the refused argument
            model = import_class(entry["class_path"])(**built["init_args"])
    except Exception as err:  # noqa: BLE001 - a constructor's ValueError or jsonargparse's type error
        raise ValueError(
            f"ArchSearch: {where} is not allowed; {entry['class_path']} refuses it: "
            f"{str(err).splitlines()[0]}"
        ) from None
    return measure_size(model, example)


__all__ = [
    "MAX_CANDIDATES",
    "TIERS_KEY",
    "check_space",
    "dig",
    "example_input",
    "import_class",
    "measure_candidate",
    "set_dotted",
    "tier_entries",
    "tier_names",
    "with_knobs",
]
