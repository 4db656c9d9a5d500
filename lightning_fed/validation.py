"""Constructor validation: one message format for every misconfiguration, naming the key, the bad value and
what is allowed (so a bad recipe fails at parse time with a message that says how to fix it)."""

from __future__ import annotations

import functools
import inspect
import numbers
import os
from typing import Any

import numpy as np


def need(owner: str, cond: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``ValueError`` unless ``cond``: ``"<owner>: <key>=<value!r> is not allowed; <key> must be <allowed>"``.

    Example::

        need("FedLoop", rounds >= 1, "rounds", rounds, ">= 1")

    Args:
        owner: the class (or function) whose argument is checked, as the user writes it in a recipe.
        cond: whether the value is acceptable.
        key: the argument's name (e.g. ``"ratio"`` or ``"layer_ratios['conv1']"``).
        value: the value given.
        allowed: what the argument must be (e.g. ``">= 1"``, ``"one of ('a', 'b')"``).

    Raises:
        ValueError: when ``cond`` is false.
    """
    if not cond:
        raise ValueError(f"{owner}: {key}={value!r} is not allowed; {key} must be {allowed}")


class ArgumentTypeError(TypeError, ValueError):
    """A constructor argument of the wrong simple type (:func:`check_arguments`): a ``TypeError``, and a
    ``ValueError`` like every other misconfiguration (:func:`need`), so either ``except`` catches it."""


_SIMPLE = {"int": "an int", "float": "a number", "bool": "True or False", "str": "a string", "None": "None"}
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _annotation_parts(annotation: Any) -> frozenset[str] | None:
    """``{"int", "None"}`` for ``int | None`` (a string under ``from __future__ import annotations``, or the types);
    ``None`` when any part is not one of int, float, bool, str, None (such arguments are not checked)."""
    if annotation is inspect.Parameter.empty:
        return None
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = frozenset(part.strip() for part in text.split("|"))
    return parts if parts <= _SIMPLE.keys() else None


def fits(value: Any, parts: frozenset[str]) -> bool:
    """Whether ``value`` is of one of the simple types ``parts`` names: an int (numpy's too, never a bool) for
    ``int``, any real number but a bool for ``float``, a bool for ``bool``, a string or a path for ``str``."""
    if value is None:
        return "None" in parts
    if isinstance(value, (bool, np.bool_)):
        return "bool" in parts
    if isinstance(value, numbers.Integral):
        return "int" in parts or "float" in parts
    if isinstance(value, numbers.Real):
        return "float" in parts
    if isinstance(value, (str, os.PathLike)):
        return "str" in parts
    return False


def described(parts: frozenset[str]) -> str:
    """``"an int or None"`` for ``{"int", "None"}``: what the message says an argument must be."""
    return " or ".join(_SIMPLE[name] for name in _SIMPLE if name in parts)


def check_arguments(cls: type) -> type:
    """Make ``cls.__init__`` refuse an argument of the wrong simple type before it runs.

    The arguments annotated with int, float, bool, str or None (and their unions, e.g. ``int | None``) are
    checked against their annotation (:func:`fits`); a wrong one raises :class:`ArgumentTypeError` (a
    ``TypeError`` and a ``ValueError``) in :func:`need`'s format, naming the class the user built, so
    ``FedLoop(rounds=2.5)`` or ``FedAvg(server_lr="1")`` fail where they are written rather than as a comparison
    error or a silent coercion later. Other arguments are left to the class.
    The recipe path checks the same types earlier (jsonargparse); this is the check for Python users.
    ``inspect.signature`` and the documentation still see the original ``__init__``.

    Example::

        @check_arguments
        class Thing:
            def __init__(self, rounds: int = 1) -> None: ...

    Returns:
        ``cls``, its own ``__init__`` (if it defines one with such arguments) wrapped.
    """
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "__checks_arguments__", False):
        return cls
    params = list(inspect.signature(init).parameters.values())[1:]  # without self
    rules = []
    for index, p in enumerate(params):
        parts = _annotation_parts(p.annotation)
        if parts is not None and p.kind in (*_POSITIONAL, inspect.Parameter.KEYWORD_ONLY):
            rules.append((index if p.kind in _POSITIONAL else None, p.name, parts))
    if not rules:
        return cls

    @functools.wraps(init)
    def checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
        for index, name, parts in rules:
            if name in kwargs:
                value = kwargs[name]
            elif index is not None and index < len(args):
                value = args[index]
            else:
                continue
            if not fits(value, parts):
                raise ArgumentTypeError(
                    f"{type(self).__name__}: {name}={value!r} is not allowed; {name} must be {described(parts)}"
                )
        init(self, *args, **kwargs)

    checked_init.__checks_arguments__ = True  # type: ignore[attr-defined]
    cls.__init__ = checked_init  # type: ignore[misc]
    return cls


class CheckedArguments:
    """Base of the configurable classes: every subclass's ``__init__`` checks its simple-typed arguments
    (:func:`check_arguments`). Strategies, codecs, callbacks, partitions, models and ``FedLoop`` derive from it."""

    __slots__ = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_arguments(cls)


__all__ = ["ArgumentTypeError", "CheckedArguments", "check_arguments", "described", "fits", "need"]
