"""Recipe errors as one line: where the bad value came from, its full key, and what is wrong.

jsonargparse reports a bad value inside an optional object (``partition: Partition | None``) as a tree of the
Union's alternatives ("Does not validate against any of the Union subtypes ... Expected a <class 'NoneType'>"),
and a constructor that refuses its arguments without the key it was given under. This module turns both into::

    recipes/x.yaml: loop.partition.init_args.alpha: must be > 0, got 0.0
    command line: loop.roundz: unknown key; did you mean loop.rounds?

Example::

    try:
        cfg = parser.parse_args(argv)
    except ArgumentError as err:
        print(parse_error(err, argv))
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_fed.identity import constructor_settings

_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)':\s*(.*)$")
_EXPECTED = re.compile(r"^Expected a <class '([\w.]+)'>\. Got value: (.*)$")
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted$")
_DOT_PATH = re.compile(r"^Expected a dot import path string: (.*)$")
_SUBTYPES = re.compile(r"^Subtypes: \[(.*)\]$")
_NOISE = ("Expected a <class 'NoneType'>", "Expected a path but ")


def parse_error(err: Exception, argv: Sequence[str]) -> str:
    """The one-line message for a jsonargparse parse error (``ArgumentError``) of the ``fit`` command."""
    text = str(err).strip()
    if m := re.match(r"^Subcommand '\w+' does not accept option '([^']+)'", text):
        return locate_source(m.group(1), argv, _unknown(m.group(1)))
    if m := re.match(r"^unrecognized arguments: (\S+)", text):
        key = m.group(1).lstrip("-").split("=", 1)[0]
        return f"command line: {key}: {_unknown(key)}"
    if m := re.match(r'^Parser key "config":\s*File does not exist: (.*)$', text):
        return f"recipe {m.group(1).strip()} does not exist"
    if text.startswith("Problems parsing config"):
        files = config_files(argv)
        where = f"{files[-1]}: " if len(files) == 1 else ""
        detail = " ".join(line.strip() for line in text.split(":", 1)[1].splitlines() if line.strip())
        return f"{where}not a valid recipe: {detail}"
    key, message = _walk(text.splitlines(), "", None)
    if key is None:
        return message
    return locate_source(key, argv, message)


def instantiation_error(err: Exception, fit_config: Mapping[str, Any], argv: Sequence[str]) -> str:
    """The one-line message for a constructor that refused its recipe arguments (``ValueError``/``TypeError`` from
    instantiating the parsed ``fit`` config, given as a dict): the objects are built again one by one, innermost
    first, to find the one that fails and the argument its message names."""
    try:
        for name in ("model", "data"):
            _build(fit_config.get(name), name)
        loop = fit_config.get("loop") or {}
        from lightning_fed.loop import FedLoop

        _construct(FedLoop, {k: _build(v, f"loop.{k}") for k, v in loop.items()}, "loop")
    except _Located as found:
        key, message = found.key, str(found.error)
        cls_name = found.cls.__name__
        message = message.removeprefix(f"{cls_name}: ")
        named = [(m.start(), p) for p in found.params if (m := re.search(rf"\b{re.escape(p)}\b", message))]
        if named:
            param = min(named)[1]
            key = f"{key}.{param}" if key == "loop" else f"{key}.init_args.{param}"
            message = message.removeprefix(f"{param} ")
        return locate_source(key, argv, message)
    except Exception:  # noqa: BLE001, S110 - a failure the second build cannot pin down: report the original
        pass
    _, message = _walk(str(err).strip().splitlines(), "", None)
    return message


def locate_source(key: str, argv: Sequence[str], message: str) -> str:
    """``"<source>: <key>: <message>"``, where source is the recipe file or ``command line`` that set ``key``
    last (``argv`` order), or nothing if neither did (a default)."""
    source = None
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args) or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else args[i + 1]
            if _in_yaml(path, key):
                source = path
        elif arg.startswith("--") and _overlaps(arg[2:].split("=", 1)[0].rstrip("+"), key):
            source = "command line"
    return f"{source}: {key}: {message}" if source else f"{key}: {message}"


def config_files(argv: Sequence[str]) -> list[str]:
    """The ``--config`` files named in ``argv``, in order."""
    args = list(argv)
    out = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    out += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    return out


# ---------------------------------------------------------------------------------------------- jsonargparse text
def _items(lines: list[str]) -> list[list[str]]:
    """The ``- ...`` items of a list block, each with its continuation lines, dedented."""
    items: list[list[str]] = []
    indent = None
    for line in lines:
        stripped = line.lstrip()
        here = len(line) - len(stripped)
        if stripped.startswith("- ") and (indent is None or here == indent):
            indent = here
            items.append([stripped[2:]])
        elif items and indent is not None and here >= indent:  # a continuation (may sit at the dash's column)
            items[-1].append(line[min(indent + 2, here):])
        elif items:
            break
    return items


def _walk(lines: list[str], key: str, cls: str | None, bases: Sequence[str] = ()) -> tuple[str | None, str]:
    """Follow the one relevant branch of a jsonargparse message down to its cause: (full key, message). ``bases``:
    the class paths the enclosing Union accepts (``Strategy`` for ``loop.strategy``)."""
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        return (key or None), "invalid value"
    first = lines[0].strip()
    rest = [ln.removeprefix("  ") for ln in lines[1:]]
    if m := _PARSER_KEY.match(first):
        sub = m.group(1) if not key else f"{key}.init_args.{m.group(1)}" if cls else f"{key}.{m.group(1)}"
        return _walk(([m.group(2)] if m.group(2) else []) + rest, sub, None)
    if m := _CLASS_PATH.match(first):
        inner_key, inner = _walk(([m.group(2)] if m.group(2) else []) + rest, key, m.group(1))
        if inner_key == key and not inner.startswith("unknown key"):
            return f"{key}.class_path" if key else None, f"cannot use class_path '{m.group(1)}': {inner}"
        return inner_key, inner
    if m := _NOT_ACCEPTED.match(first):
        full = f"{key}.init_args.{m.group(1)}" if cls else f"{key}.{m.group(1)}"
        return full, _unknown(full, _settings(cls))
    if m := _EXPECTED.match(first):
        return (key or None), f"expected {m.group(1)}, got {m.group(2)!r}"
    if m := _DOT_PATH.match(first):
        return (key or None), _not_a_class(m.group(1).strip(), bases, key)
    if first.startswith("Does not validate against any of the Union subtypes"):
        bases = next((re.findall(r"<class '([\w.]+)'>", s.group(1)) for ln in lines
                      if (s := _SUBTYPES.match(ln.strip()))), bases)
    if first.startswith(("Does not validate against any of the Union subtypes", "- ")):
        block = lines if first.startswith("- ") else lines[next((i for i, ln in enumerate(lines)
                                                                  if ln.strip() == "Errors:"), len(lines)) + 1:]
        branches = [it for it in _items(block) if not it[0].startswith(_NOISE)]
        if len(branches) == 1:
            return _walk(branches[0], key, cls, bases)
        if branches and first.startswith("- "):  # jsonargparse repeats the union: the first copy is enough
            return _walk(branches[0], key, cls, bases)
        if branches:
            return (key or None), "; ".join(b[0].strip() for b in branches)
    return (key or None), " ".join(ln.strip() for ln in lines)


def _unknown(key: str, known: Sequence[str] | None = None) -> str:
    name = key.rsplit(".", 1)[-1]
    if known is None and key.startswith("loop."):
        from lightning_fed.loop import FedLoop

        known = [p for p in inspect.signature(FedLoop.__init__).parameters if p != "self"]
    close = difflib.get_close_matches(name, list(known or []), n=1)
    return "unknown key" + (f"; did you mean {key[: len(key) - len(name)]}{close[0]}?" if close else "")


def _not_a_class(value: str, bases: Sequence[str], key: str) -> str:
    """A value where a class is expected (``--loop.strategy fedavg``): what is asked, the known classes of that kind
    whose names are close, and for ``loop.strategy`` a Lightning process strategy explained."""
    kinds = [b for b in bases if b != "NoneType"]
    found: dict[str, None] = {}
    for base in kinds:  # jsonargparse names classes it has imported
        stack = [_import(base)]
        while stack:
            for sub in stack.pop().__subclasses__():
                stack.append(sub)
                if not sub.__name__.startswith("_") and not inspect.isabstract(sub):
                    found[sub.__name__] = None
    names = list(found)
    lower = {n.lower(): n for n in names}
    close = [lower[value.lower()]] if value.lower() in lower else [
        lower[n] for n in difflib.get_close_matches(value.lower(), list(lower), n=3, cutoff=0.6)]
    what = " or ".join(k.rsplit(".", 1)[-1] for k in kinds) or "class"
    message = f"{value!r} is not {'an' if what[0] in 'AEIOU' else 'a'} {what} class: give a class name or its class_path"
    if close:
        message += f"; did you mean {' or '.join(close)}?"
    if key == "loop.strategy":
        from lightning_fed.loop import lightning_strategy_hint

        if hint := lightning_strategy_hint(value):
            message += f" ({hint})"
    return message


def _settings(class_path: str | None) -> list[str]:
    try:
        return constructor_settings(_import(class_path)) if class_path else []
    except Exception:  # noqa: BLE001 - suggestions only
        return []


# --------------------------------------------------------------------------------------------- rebuilding objects
class _Located(Exception):
    def __init__(self, key: str, cls: type, params: list[str], error: Exception) -> None:
        super().__init__(key)
        self.key, self.cls, self.params, self.error = key, cls, params, error


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _build(node: Any, key: str) -> Any:
    if isinstance(node, list):
        return [_build(v, f"{key}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, Mapping) and "class_path" in node:
        cls = _import(node["class_path"])
        args = node.get("init_args") or {}
        return _construct(cls, {k: _build(v, f"{key}.init_args.{k}") for k, v in args.items()}, key)
    if isinstance(node, Mapping):
        return {k: _build(v, f"{key}.{k}") for k, v in node.items()}
    return node


def _construct(cls: type, kwargs: dict[str, Any], key: str) -> Any:
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise _Located(key, cls, list(kwargs), err) from err


def _in_yaml(path: str, key: str) -> bool:
    try:
        node: Any = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        if isinstance(node, Mapping) and part == "init_args" and part not in node:
            continue  # the init_args level may be left out
        if isinstance(node, list) and part.startswith("["):
            i = int(part[1:-1])
            if i >= len(node):
                return False
            node = node[i]
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            return False
    return True


def _overlaps(option: str, key: str) -> bool:
    option, key = re.sub(r"\[\d+\]", "", option), re.sub(r"\[\d+\]", "", key)
    return option == key or key.startswith(f"{option}.") or option.startswith(f"{key}.")


__all__ = ["config_files", "instantiation_error", "locate_source", "parse_error"]
