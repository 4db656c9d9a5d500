"""Constructor validation: one message format for every misconfiguration, naming the key, the bad value and
what is allowed (so a bad recipe fails at parse time with a message that says how to fix it)."""

from __future__ import annotations

import functools
import inspect
import numbers
import os
import re
import types
import typing
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
_PLURAL = {"int": "ints", "float": "numbers", "bool": "bools", "str": "strings", "None": "Nones"}
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
# An annotation the check understands: ("one", names) for a value of one of the simple types ``names``,
# ("list", names) for a list (or tuple) of them, ("tuple", (names, names, ...)) for a list or tuple of that length.
Kinds = tuple[tuple[str, Any], ...]


def _split(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets: ``"int | list[int | None]"`` -> ``["int", "list[int | None]"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _names(text: str) -> frozenset[str] | None:
    names = frozenset(_split(text, "|"))
    return names if names <= _SIMPLE.keys() else None


def annotation_kinds(annotation: Any) -> Kinds | None:
    """What ``annotation`` allows, as :data:`Kinds`: int, float, bool, str, None, lists of them
    (``list[str]``, ``tuple[int, ...]``) and fixed tuples (``tuple[float, float]``), and unions of those (a string
    under ``from __future__ import annotations``, or the types); ``None`` for anything else (not checked)."""
    if annotation is inspect.Parameter.empty:
        return None
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    simple: set[str] = set()
    kinds: list[tuple[str, Any]] = []
    for alternative in _split(text, "|"):
        if alternative in _SIMPLE:
            simple.add(alternative)
            continue
        match = re.fullmatch(r"(list|tuple)\[(.+)\]", alternative)
        if match is None:
            return None
        items = _split(match.group(2), ",")
        if match.group(1) == "list" or (len(items) == 2 and items[1] == "..."):
            if len(items) > 2 or (names := _names(items[0])) is None:
                return None
            kinds.append(("list", names))
        else:
            item_names = [_names(item) for item in items]
            if any(names is None for names in item_names):
                return None
            kinds.append(("tuple", tuple(item_names)))
    return ((("one", frozenset(simple)),) if simple else ()) + tuple(kinds)


def _is(value: Any, names: frozenset[str]) -> bool:
    if value is None:
        return "None" in names
    if isinstance(value, (bool, np.bool_)):
        return "bool" in names
    if isinstance(value, numbers.Integral):
        return "int" in names or "float" in names
    if isinstance(value, numbers.Real):
        return "float" in names
    if isinstance(value, (str, os.PathLike)):
        return "str" in names
    return False


def fits(value: Any, kinds: Kinds) -> bool:
    """Whether ``value`` is what ``kinds`` (:func:`annotation_kinds`) allows: an int (numpy's too, never a bool)
    for ``int``, any real number but a bool for ``float``, a bool for ``bool``, a string or a path for ``str``; a
    list or tuple of such values for ``list[...]`` (never a string for ``list[str]``)."""
    for kind, spec in kinds:
        if kind == "one" and _is(value, spec):
            return True
        if isinstance(value, (list, tuple)):
            if kind == "list" and all(_is(item, spec) for item in value):
                return True
            if kind == "tuple" and len(value) == len(spec) and all(map(_is, value, spec)):
                return True
    return False


def python_scalars(value: Any) -> Any:
    """``value`` with numpy scalars made Python's (``np.int64(32)`` -> ``32``, ``np.float32(0.5)`` -> ``0.5``,
    ``np.bool_`` -> ``bool``), also as the items of a list or tuple (a new one; the caller's is left as it was);
    ``value`` itself when there is none. Torch (``DataLoader(batch_size=np.int64(32))`` refuses it), JSON and
    YAML take only Python's numbers."""
    if isinstance(value, np.generic) and isinstance(value, (np.bool_, np.number)):
        return value.item()
    if type(value) in (list, tuple) and any(isinstance(item, np.generic) for item in value):
        return type(value)(python_scalars(item) for item in value)
    return value


def instance_kinds(annotation: Any, namespace: dict[str, Any]) -> tuple[tuple[type, ...], bool] | None:
    """The library's classes an argument annotated ``annotation`` must be an instance of, and whether ``None`` is
    allowed: ``Strategy | None`` -> ``((Strategy,), True)``, its names looked up in ``namespace`` (the defining
    module's globals) when it is a string. ``None`` when any alternative is something else (a simple type, a
    container, a class from outside ``lightning_fed``, a protocol, a name the module does not hold at run time)."""
    if annotation is inspect.Parameter.empty:
        return None
    if isinstance(annotation, str):
        parts: list[Any] = []
        for name in _split(annotation, "|"):
            if name == "None":
                parts.append(None)
            elif not name.isidentifier() or name not in namespace:
                return None
            else:
                parts.append(namespace[name])
    elif isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        parts = [None if arg is type(None) else arg for arg in typing.get_args(annotation)]
    else:
        parts = [annotation]
    classes = tuple(part for part in parts if part is not None)
    if not classes or not all(isinstance(c, type) and c.__module__.startswith("lightning_fed")
                              and not getattr(c, "_is_protocol", False) for c in classes):
        return None
    return classes, None in parts


def _instance_words(classes: tuple[type, ...], none: bool) -> str:
    words = [f"{'an' if c.__name__[0] in 'AEIOU' else 'a'} {c.__name__}" for c in classes]
    return " or ".join(words + (["None"] if none else []))


def _words(names: frozenset[str], table: dict[str, str]) -> str:
    return " or ".join(table[name] for name in _SIMPLE if name in names)


def described(kinds: Kinds) -> str:
    """``"an int or a list of ints or None"`` for ``int | list[int] | None``: what the message says an argument
    must be."""
    phrases = []
    for kind, spec in kinds:
        if kind == "one" and spec - {"None"}:
            phrases.append(_words(spec - {"None"}, _SIMPLE))
        elif kind == "list":
            phrases.append(f"a list of {_words(spec, _PLURAL)}")
        elif kind == "tuple" and len(set(spec)) == 1:
            phrases.append(f"a list of {len(spec)} {_words(spec[0], _PLURAL)}")
        elif kind == "tuple":
            phrases.append(f"a list of {len(spec)}: " + ", ".join(_words(names, _SIMPLE) for names in spec))
    if any(kind == "one" and "None" in spec for kind, spec in kinds):
        phrases.append("None")
    return " or ".join(phrases)


_ABSENT = object()


def _given(name: str, index: int | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The value a call gives the parameter ``name`` (positional at ``index``), or ``_ABSENT``."""
    if name in kwargs:
        return kwargs[name]
    if index is not None and index < len(args):
        return args[index]
    return _ABSENT


def check_arguments(cls: type) -> type:
    """Make ``cls.__init__`` refuse an argument of the wrong simple type before it runs.

    The arguments annotated with int, float, bool, str or None, lists of them, fixed tuples of them and unions of
    those (e.g. ``int | None``, ``int | list[int] | None``, ``tuple[float, float]``) are checked against their
    annotation (:func:`fits`); a wrong one raises :class:`ArgumentTypeError` (a
    ``TypeError`` and a ``ValueError``) in :func:`need`'s format, naming the class the user built, so
    ``FedLoop(rounds=2.5)`` or ``FedAvg(server_lr="1")`` fail where they are written rather than as a comparison
    error or a silent coercion later. A numpy scalar that fits (``np.int64(32)`` for an int) reaches the
    constructor as the Python number it stands for (:func:`python_scalars`). Other arguments are left to the
    class.
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
    rules, others = [], []
    for index, p in enumerate(params):
        if p.kind not in (*_POSITIONAL, inspect.Parameter.KEYWORD_ONLY):
            continue
        kinds = annotation_kinds(p.annotation)
        (rules if kinds is not None else others).append((index if p.kind in _POSITIONAL else None, p.name,
                                                         kinds if kinds is not None else p.annotation))
    if not rules and not others:
        return cls
    objects: list[tuple[int | None, str, tuple[type, ...], bool]] | None = None

    def object_rules() -> list[tuple[int | None, str, tuple[type, ...], bool]]:
        """The arguments annotated with the library's classes, resolved at the first call (every module the
        annotations name is imported by then)."""
        nonlocal objects
        if objects is None:
            namespace = getattr(init, "__globals__", {})
            objects = [(index, name, *found) for index, name, annotation in others
                       if (found := instance_kinds(annotation, namespace)) is not None]
        return objects

    @functools.wraps(init)
    def checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
        for index, name, kinds in rules:
            value = _given(name, index, args, kwargs)
            if value is _ABSENT:
                continue
            if not fits(value, kinds):
                raise ArgumentTypeError(
                    f"{type(self).__name__}: {name}={value!r} is not allowed; {name} must be {described(kinds)}"
                )
            plain = python_scalars(value)
            if plain is not value:  # a numpy scalar passed on as the Python number it stands for
                if name in kwargs:
                    kwargs[name] = plain
                else:
                    args = (*args[:index], plain, *args[index + 1 :])  # type: ignore[index,operator]
        for index, name, classes, none in object_rules():
            value = _given(name, index, args, kwargs)
            if value is _ABSENT:
                continue
            if (value is None and none) or isinstance(value, classes):
                continue
            hint = ""
            if isinstance(value, type) and issubclass(value, classes):
                hint = f" (the class itself was given: {value.__name__}(...) builds one)"
            elif (explain := getattr(type(self), "_argument_hint", None)) and (said := explain(name, value)):
                hint = f" ({said})"
            raise ArgumentTypeError(f"{type(self).__name__}: {name}={value!r} is not allowed; {name} must be "
                                    f"{_instance_words(classes, none)}{hint}")
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


__all__ = [
    "ArgumentTypeError", "CheckedArguments", "Kinds", "annotation_kinds", "check_arguments", "described", "fits",
    "instance_kinds", "need", "python_scalars",
]
