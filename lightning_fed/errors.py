"""Whose failure is it: a client's own (drop that client) or lightning_fed's (stop the run).

A federated run must survive a client whose code, data or device fails: that client is dropped with a
logged reason. It must not survive a bug in lightning_fed itself, which would otherwise be logged as a
"dropped client" round after round while the model silently stops training. :func:`is_client_fault`
decides from the exception: a :class:`ClientError` (raised on purpose: a simulated fault, a client whose
model no longer fits its instruction, a bad ``configure_optimizers``) is the client's; otherwise the
innermost frame of the traceback that is not in a library lightning_fed builds on (torch, Lightning, the
standard library…) decides: the user's code → the client's fault; lightning_fed's own code → ours.
"""

from __future__ import annotations

import sys
from types import TracebackType

# Libraries that user code calls into: a failure raised inside them belongs to whoever called them.
LIBRARIES = frozenset({
    "torch", "lightning", "lightning_fabric", "pytorch_lightning", "lightning_utilities", "torchmetrics", "numpy",
    "safetensors", "torch_pruning", "torchao", "bitsandbytes", "jsonargparse", "typing_extensions", "_pytest",
})
# lightning_fed modules that play the user's part (example models and data modules).
USER_SIDE = ("lightning_fed.models", "lightning_fed.data.mnist1d")


class ClientError(RuntimeError):
    """A client's own failure (simulated fault, a model that no longer fits its instruction…): the client is
    dropped with this message, the run goes on."""


class ModelMismatch(ClientError, ValueError):
    """A model's entries no longer match a payload (names or shapes): on a client, its code changed its model, so
    that client is dropped; on the server it stops the run like any other failure there."""


class AggregationRefused(ValueError):
    """An aggregation rule cannot combine this round's replies (e.g. Krum got ``n <= 2f + 2``): the round cannot
    aggregate. Raised by the aggregator before anything is changed (the global weights and the server optimizer's
    state are untouched), with the reason; the loop is meant to count the round as skipped (like one with fewer
    than ``min_clients`` valid replies), not to stop the run.

    Example::

        try:
            strategy.aggregate(server_round, replies)
        except AggregationRefused as err:  # e.g. "Krum(byzantine=2, select=None) needs at least 7 replies, got 5"
            log.warning("round %d skipped: %s", server_round + 1, err)
    """


class RoundsFailed(RuntimeError):
    """Too many consecutive rounds without enough valid replies to aggregate: the run stops."""


def _owner(tb: TracebackType | None) -> str | None:
    """The module of the innermost traceback frame outside :data:`LIBRARIES` and the standard library."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        name = str(frame.f_globals.get("__name__", ""))
        top = name.split(".", 1)[0]
        if top in LIBRARIES or top in sys.stdlib_module_names:
            continue
        return name
    return None


def is_client_fault(err: BaseException) -> bool:
    """Whether ``err``, raised during a client's work, is that client's failure (see the module docstring)."""
    if isinstance(err, ClientError):
        return True
    if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: never a client's
        return False
    owner = _owner(err.__traceback__)
    if owner is None:
        return False
    ours = owner == "lightning_fed" or owner.startswith("lightning_fed.")
    return not ours or owner.startswith(USER_SIDE)


__all__ = ["AggregationRefused", "ClientError", "ModelMismatch", "RoundsFailed", "is_client_fault"]
