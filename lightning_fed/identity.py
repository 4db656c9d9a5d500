"""A run's identity: what a checkpoint must agree with before a run may resume from it.

A checkpoint records the settings that define the federated problem and the shape of the saved state (clients,
sampling, data split, algorithm, codecs, callbacks, local training, model architecture). Resuming compares them
with the run being started and refuses any difference, naming each one, before anything is written. The settings
in :data:`MAY_CHANGE` are the horizon and bookkeeping of a run (resuming to more ``rounds`` is how a run is
continued) and are not recorded.

Objects are described by their class and their constructor-level settings (the constructor's parameters stored
as attributes of the same name), recursively, so ``TopK(0.01, values=Sign(32))`` and ``TopK(0.02, ...)`` differ
while the state an object accumulates during training does not count. A model is described by its class and
the names, shapes and dtypes of its ``state_dict``, taken before callbacks change it (pruning, MoE conversion).

Example::

    saved = run_identity(loop, model)          # stored in every checkpoint as state["identity"]
    check_identity(saved, run_identity(other_loop, other_model), "runs/x/version_0/checkpoints/round-000010")
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import torch
from torch import nn

MUST_MATCH = ("num_clients", "clients_per_round", "seed", "local_epochs", "partition", "strategy", "codec",
              "downlink_codec", "uplink_allocation", "keep_optimizer_state", "precision", "callbacks", "sampling",
              "gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches", "personal_eval", "clock")
"""``FedLoop`` parameters a resumed run must share with its checkpoint (plus the model, see :func:`model_identity`)."""

MAY_CHANGE = ("rounds", "eval_every", "test_every", "checkpoint_every", "keep_checkpoints", "output_dir", "accelerator",
              "min_clients", "max_message_bytes", "max_update_abs", "max_norm_ratio", "loggers", "verbose", "plot", "max_failed_rounds",
              "runner", "devices", "num_nodes", "processes_per_device", "timeout_s", "calibration")
"""``FedLoop`` parameters that may differ on resume: the horizon, evaluation and checkpoint cadence, what is evaluated
(CCVR's calibration changes no training: it is stateless and seeded by the round), outputs,
device, the server's acceptance thresholds (which apply from the resumed round on), and where clients run (a
runner or the number of processes changes where the work happens, not its result)."""

LEGACY_KEYS = ("num_clients", "seed")
"""Identity fields that checkpoints written before identities were recorded kept at their top level."""

_MAX_DEPTH = 6
_SIMPLE = (bool, int, float, str, type(None))


class ResumeMismatch(ValueError):
    """The run being started differs from the checkpoint it was asked to resume from."""


def model_identity(model: nn.Module) -> dict[str, Any]:
    """A model's class and the ``[name, shape, dtype]`` of every ``state_dict`` entry."""
    return {
        "__class__": _class_name(type(model)),
        "state": [[k, list(v.shape), str(v.dtype).removeprefix("torch.")]
                  for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)],
    }


def describe(obj: Any, _depth: int = 0, _seen: frozenset[int] = frozenset()) -> Any:
    """A plain, comparable description of ``obj`` (nested dicts, lists, numbers, strings) that
    ``torch.load(weights_only=True)`` can read back.

    Simple values stay as they are; lists, tuples and dicts are described item by item; a module is described
    by :func:`model_identity`; a tensor by its shape, dtype and a digest of its values; a class or function by
    its qualified name; any other object by ``{"__class__": ..., <constructor setting>: <description>}``.
    """
    if isinstance(obj, float) and math.isnan(obj):
        return "nan"  # nan != nan would refuse every resume
    if isinstance(obj, _SIMPLE):
        return obj
    if isinstance(obj, (PurePath, torch.dtype, torch.device)):
        return str(obj)
    if _depth >= _MAX_DEPTH or id(obj) in _seen:
        return {"__class__": _class_name(type(obj))}
    seen = _seen | {id(obj)}
    if isinstance(obj, (list, tuple)):
        return [describe(v, _depth + 1, seen) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): describe(v, _depth + 1, seen) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return sorted((describe(v, _depth + 1, seen) for v in obj), key=repr)
    if isinstance(obj, nn.Module):
        return model_identity(obj)
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().contiguous()
        digest = hashlib.sha1(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()[:12]
        return {"__tensor__": list(obj.shape), "dtype": str(obj.dtype).removeprefix("torch."), "sha1": digest}
    if inspect.isclass(obj) or inspect.isroutine(obj):
        return {"__callable__": _class_name(obj)}
    out: dict[str, Any] = {"__class__": _class_name(type(obj))}
    attrs = getattr(obj, "__dict__", {})
    for name in constructor_settings(type(obj)):
        if name in attrs and not name.startswith("_"):
            out[name] = describe(attrs[name], _depth + 1, seen)
    return out


def constructor_settings(cls: type) -> list[str]:
    """The parameter names of ``cls``'s constructor, following ``**kwargs`` into base classes, sorted."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            break
        names.update(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self")
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return sorted(names)


def run_identity(loop: Any, model: nn.Module) -> dict[str, Any]:
    """The identity of a run of ``loop`` (a ``FedLoop``) on ``model``: every :data:`MUST_MATCH` setting, described
    with :func:`describe`, and ``"model"``: :func:`model_identity`."""
    out = {name: describe(getattr(loop, name)) for name in MUST_MATCH}
    out["model"] = model_identity(model)
    return out


def identity_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """One line per setting that differs, ``"<key>: <saved> in the checkpoint, <now> now"``. Keys missing from
    ``saved`` (settings added after the checkpoint was written) are not compared."""
    lines = []
    for key, value in now.items():
        if key not in saved or _same(saved[key], value):
            continue
        if key == "model":
            lines.append(f"model: {_model_difference(saved[key], value)}")
            continue
        old, new = render(saved[key]), render(value)
        if old == new:  # same short rendering, different module path or type
            old, new = render(saved[key], full=True), render(value, full=True)
        lines.append(f"{key}: {old} in the checkpoint, {new} now")
    return lines


def check_identity(saved: Mapping[str, Any], now: Mapping[str, Any], where: Any) -> None:
    """Raise :class:`ResumeMismatch` naming every difference between the checkpoint ``where`` and this run."""
    lines = identity_differences(saved, now)
    if lines:
        body = "\n  ".join(lines)
        raise ResumeMismatch(
            f"cannot resume from {where}: this run differs from the checkpoint:\n  {body}\n"
            f"only {', '.join(MAY_CHANGE)} may change on resume; start a new run (no --resume) to change the rest"
        )


def render(desc: Any, full: bool = False) -> str:
    """Text of a description, e.g. ``TopK(ratio=0.01, values=Sign(bits=32))``; ``full`` keeps module paths."""
    if isinstance(desc, list):
        return "[" + ", ".join(render(v, full) for v in desc) + "]"
    if isinstance(desc, dict):
        if "__callable__" in desc:
            return _short(desc["__callable__"], full)
        if "__tensor__" in desc:
            return f"tensor(shape={tuple(desc['__tensor__'])}, dtype={desc['dtype']}, sha1={desc['sha1']})"
        if "__class__" in desc:
            name = _short(desc["__class__"], full)
            if "state" in desc and isinstance(desc["state"], list):
                return f"{name}({len(desc['state'])} tensors, sha1={_digest(desc['state'])})"
            args = ", ".join(f"{k}={render(v, full)}" for k, v in desc.items() if k != "__class__")
            return f"{name}({args})"
        return "{" + ", ".join(f"{k!r}: {render(v, full)}" for k, v in desc.items()) + "}"
    return repr(desc)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b  # alpha=1 (Python) and alpha=1.0 (a recipe) are the same setting
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _model_difference(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 5) -> str:
    if old.get("__class__") != new.get("__class__"):
        prefix = f"{_short(old.get('__class__', '?'))} in the checkpoint, {_short(new.get('__class__', '?'))} now"
    else:
        prefix = f"{_short(new['__class__'])} has a different state_dict"
    a = {k: (tuple(s), d) for k, s, d in old.get("state", [])}
    b = {k: (tuple(s), d) for k, s, d in new.get("state", [])}
    details = [f"{k} {a[k][0]} {a[k][1]} in the checkpoint, {b[k][0]} {b[k][1]} now"
               for k in a if k in b and a[k] != b[k]]
    details += [f"{k} only in the checkpoint" for k in a if k not in b]
    details += [f"{k} only now" for k in b if k not in a]
    if len(details) > limit:
        details = details[:limit] + [f"... {len(details) - limit} more"]
    return prefix + (": " + "; ".join(details) if details else "")


def _class_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _short(name: str, full: bool = False) -> str:
    return name if full else name.rsplit(".", 1)[-1]


def _digest(state: list[Any]) -> str:
    return hashlib.sha1(repr(state).encode()).hexdigest()[:8]


__all__ = ["LEGACY_KEYS", "MAY_CHANGE", "MUST_MATCH", "ResumeMismatch", "check_identity", "constructor_settings",
           "describe", "identity_differences", "model_identity", "render", "run_identity"]
