"""Constructor validation: one message format for every misconfiguration, naming the key, the bad value and
what is allowed (so a bad recipe fails at parse time with a message that says how to fix it)."""

from __future__ import annotations

from typing import Any


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


__all__ = ["need"]
