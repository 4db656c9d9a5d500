"""Our round messages inside Flower messages: a :class:`~lightning_fed.protocol.ClientTask` down, a
:class:`~lightning_fed.protocol.ClientMessage` up, each as one Flower ``ConfigRecord``.

The codec's bytes travel unchanged as a ``bytes`` value (so what lightning_fed counts is what crosses the
network), next to a JSON header with the plain fields (round, config, spec, example count, metrics…). No
pickle: a receiver only ever parses JSON and hands the bytes to the codec's decoder, which checks them.
The sender of a reply is the Flower node it came from, never a field of the message.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict

from lightning_fed.protocol import ClientMessage, ClientTask, TensorSpec

RECORD = "lightning_fed"  # the ConfigRecord's key in the message's RecordDict
ACTION = "lightning_fed"  # message types "train.lightning_fed" and "query.lightning_fed"
MAX_HEADER_CHARS = 1 << 20  # a header is a few hundred bytes; anything near this is refused before parsing


class MalformedFlowerMessage(ValueError):
    """A Flower message that does not hold a well-formed lightning_fed record; the text says what is wrong."""


def _dtype(name: Any) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise MalformedFlowerMessage(f"unknown dtype {name!r} in a payload spec")
    return value


def _json(head: dict[str, Any], what: str) -> str:
    try:
        return json.dumps(head, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{what}: only JSON values (numbers, strings, lists, dicts) travel in the header: {err}"
        ) from err


def _record(head: dict[str, Any], what: str, **blobs: bytes) -> ConfigRecord:
    """The header as JSON and the non-empty ``blobs`` as bytes (Flower's ``count_bytes`` refuses ``b""``: an empty
    one is left out and read back as ``b""``)."""
    return ConfigRecord({"head": _json(head, what), **{k: bytes(v) for k, v in blobs.items() if len(v)}})


def _header(record: RecordDict, fields: tuple[str, ...]) -> tuple[dict[str, Any], ConfigRecord]:
    if RECORD not in record.config_records:
        raise MalformedFlowerMessage(f"no {RECORD!r} ConfigRecord in the message")
    rec = record.config_records[RECORD]
    head, body = rec.get("head"), rec.get("message", b"")
    if not isinstance(head, str) or len(head) > MAX_HEADER_CHARS or not isinstance(body, bytes):
        raise MalformedFlowerMessage("the record needs a JSON 'head' (str) and a 'message' (bytes)")
    try:
        parsed = json.loads(head)
    except ValueError as err:
        raise MalformedFlowerMessage(f"the header is not JSON: {err}") from err
    if not isinstance(parsed, dict) or any(k not in parsed for k in fields):
        raise MalformedFlowerMessage(f"the header needs the fields {fields}")
    return parsed, rec


def task_record(task: ClientTask) -> RecordDict:
    """A task as a Flower ``RecordDict``: its encoded instruction and broadcast as bytes, the rest as JSON."""
    head = {
        "round": task.round,
        "client_id": task.client_id,
        "config": task.config,
        "share": task.share,
        "spec": [[k, list(s.shape), str(s.dtype), s.optional, s.max_numel] for k, s in task.spec.items()],
    }
    return RecordDict({RECORD: _record(head, "ClientTask", message=task.message, broadcast=task.broadcast)})


def read_task(record: RecordDict) -> ClientTask:
    """The task :func:`task_record` wrote."""
    head, rec = _header(record, ("round", "client_id", "config", "share", "spec"))
    broadcast = rec.get("broadcast", b"")
    if not isinstance(broadcast, bytes):
        raise MalformedFlowerMessage("'broadcast' must be bytes")
    spec = {
        str(k): TensorSpec(
            tuple(int(d) for d in shape), _dtype(dt), bool(opt), None if mx is None else int(mx)
        )
        for k, shape, dt, opt, mx in head["spec"]
    }
    return ClientTask(
        round=int(head["round"]),
        client_id=int(head["client_id"]),
        message=rec.get("message", b""),
        spec=spec,
        config=dict(head["config"]),
        share=float(head["share"]),
        broadcast=broadcast,
    )


def reply_record(msg: ClientMessage) -> RecordDict:
    """A client's reply message as a Flower ``RecordDict``: the codec's bytes unchanged, the rest as JSON."""
    head = {
        "num_examples": msg.num_examples,
        "metrics": msg.metrics,
        "failure": msg.failure,
        "raw_bytes": msg.raw_bytes,
        "encode_s": msg.encode_s,
        "decode_s": msg.decode_s,
        "local_steps": msg.local_steps,
    }
    return RecordDict({RECORD: _record(head, "ClientMessage", message=msg.message)})


def read_reply(record: RecordDict, client_id: int) -> ClientMessage:
    """The reply :func:`reply_record` wrote, from ``client_id`` (the node it came from). Untrusted: only types are
    checked here; the server's decode and validation check the rest."""
    head, rec = _header(record, ("num_examples", "metrics", "failure", "raw_bytes", "local_steps"))
    metrics = head["metrics"]
    if not isinstance(metrics, dict) or not all(
        isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values()
    ):
        raise MalformedFlowerMessage("'metrics' must map names to finite numbers")
    failure = head["failure"]
    return ClientMessage(
        client_id,
        rec.get("message", b""),
        head["num_examples"],
        {str(k): float(v) for k, v in metrics.items()},
        None if failure is None else str(failure),
        int(head["raw_bytes"]),
        float(head.get("encode_s", 0.0)),
        float(head.get("decode_s", 0.0)),
        head["local_steps"],
    )


__all__ = [
    "ACTION",
    "RECORD",
    "MalformedFlowerMessage",
    "read_reply",
    "read_task",
    "reply_record",
    "task_record",
]
