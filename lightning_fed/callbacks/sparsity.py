"""Unstructured magnitude sparsity whose federated updates carry only the unmasked weights.

Zhu & Gupta, "To prune, or not to prune", 2017 (gradual magnitude pruning): at each step of the schedule the
smallest-magnitude weights are masked to zero, up to the target sparsity; masked weights stay zero while training
goes on. In FedLoop the server computes the masks from the aggregated global model, and the uplink carries, for
every masked tensor, only the packed vector of its unmasked entries (:class:`SparseUplink`), so sparsity also
cuts the bytes clients send.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fed.callbacks._compress import (
    in_fedloop,
    on_server,
    parse_schedule,
    reset_stale_client_state,
    warn_once,
)
from lightning_fed.callbacks.base import FedCallback
from lightning_fed.codecs.base import Codec, DecodeArgs, EncodeArgs, Identity
from lightning_fed.codecs.wire import MalformedMessage
from lightning_fed.context import fed_context
from lightning_fed.protocol import Instruction, Payload, PayloadSpec, TensorSpec

log = logging.getLogger("lightning_fed")

SCOPES = ("layer", "global")


def magnitude_masks(params: dict[str, Tensor], sparsity: float, scope: str) -> dict[str, Tensor]:
    """Boolean keep-masks that zero the ``sparsity`` fraction of smallest-magnitude entries, per tensor
    (``scope="layer"``) or across all tensors (``"global"``). Ties at the threshold are broken by index."""
    if not params:
        return {}
    if scope == "global":
        flat = torch.cat([p.detach().abs().reshape(-1).float() for p in params.values()])
        k = int(sparsity * flat.numel())
        keep = torch.ones_like(flat, dtype=torch.bool)
        if k:
            keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
        out, off = {}, 0
        for name, p in params.items():
            out[name] = keep[off : off + p.numel()].view(p.shape).clone()
            off += p.numel()
        return out
    out = {}
    for name, p in params.items():
        a = p.detach().abs().reshape(-1).float()
        k = int(sparsity * a.numel())
        keep = torch.ones_like(a, dtype=torch.bool)
        if k:
            keep[torch.topk(a, k, largest=False, sorted=False).indices] = False
        out[name] = keep.view(p.shape)
    return out


class SparseUplink(Codec):
    """Wraps an uplink codec: entries with a mask are sent as the 1-D vector of their unmasked values and
    scattered back (zeros elsewhere) on the server, which knows the masks (they come from the global model).

    :class:`MagnitudeSparsity` installs it around the loop's codec by itself; the inner codec then compresses
    the packed vectors. Both halves forward the per-client state and the per-call arguments to the inner codec
    unchanged (the decoder with the packed spec), and the server's :meth:`accept` hands the inner codec the
    aggregated replies packed as it decoded them.

    Example::

        codec = SparseUplink(Identity())
        codec.masks = {"conv1.weight": mask}
        msg = codec.encode(payload, client_state, EncodeArgs(round=r, share=s))
        out = codec.decode(msg, sender_state, DecodeArgs(round=r, sender=cid, spec=spec))

    Args:
        inner: the codec that encodes the packed payload; default Identity.
    """

    def __init__(self, inner: Codec | None = None) -> None:
        self.inner = inner if inner is not None else Identity()
        self.name = f"sparse+{self.inner.name}"
        self.masks: dict[str, Tensor] = {}

    def pack(self, payload: Payload) -> Payload:
        """``payload`` with every masked entry replaced by the 1-D vector of its unmasked values."""
        return {k: (v.reshape(-1)[self.masks[k].reshape(-1)] if k in self.masks else v) for k, v in payload.items()}

    def encode(self, payload: Payload, state: dict[str, Any], args: EncodeArgs = EncodeArgs()) -> bytes:
        """Pack masked entries into their unmasked values, then encode with the inner codec (same client state
        and ``args``: the client's share of the uplink budget, the round, the broadcast)."""
        return self.inner.encode(self.pack(payload), state, args)

    def packed_spec(self, spec: PayloadSpec | None) -> PayloadSpec | None:
        """``spec`` with every masked entry as a 1-D vector of its kept count (what the inner codec carries)."""
        if spec is None:
            return None
        return {k: (TensorSpec((int(self.masks[k].sum()),), s.dtype) if k in self.masks else s) for k, s in spec.items()}

    def decode(self, message: bytes, state: dict[str, Any], args: DecodeArgs = DecodeArgs()) -> Payload:
        """Decode with the inner codec (the sender's server ``state`` and ``args``, with the packed spec) and
        scatter packed entries back to full shape.

        Raises:
            MalformedMessage: a packed entry's length differs from its mask's count of kept entries.
        """
        payload = self.inner.decode(message, state, replace(args, spec=self.packed_spec(args.spec)))
        for k, mask in self.masks.items():
            if k not in payload:
                continue
            v = payload[k]
            n = int(mask.sum())
            if v.ndim != 1 or v.numel() != n:
                raise MalformedMessage(f"packed entry {k!r} has shape {tuple(v.shape)}, expected ({n},) for its mask")
            full = torch.zeros(mask.shape, dtype=v.dtype)
            full[mask] = v
            payload[k] = full
        return payload

    def broadcast(self, server_round: int) -> bytes:
        """The inner codec's broadcast."""
        return self.inner.broadcast(server_round)

    @property
    def reads_accepted(self) -> bool:  # type: ignore[override]
        """The inner codec's: the payloads are packed for it only when it reads them."""
        return self.inner.reads_accepted

    def accept(self, server_round: int, payloads: list[Payload]) -> None:
        """Forward the aggregated replies to the inner codec, packed as it decoded them (the masks must still be
        those the round's replies were decoded with); an inner codec that does not read them gets them as
        they are (possibly released after the fold)."""
        self.inner.accept(server_round, [self.pack(p) for p in payloads] if self.inner.reads_accepted else payloads)

    def state_dict(self) -> dict[str, Any]:
        """The inner codec's state (masks belong to :class:`MagnitudeSparsity`)."""
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the inner codec's state."""
        self.inner.load_state_dict(state)


class MagnitudeSparsity(FedCallback):
    """Gradual unstructured magnitude sparsity with masks; ``lightning.Trainer`` and ``FedLoop``.

    The target ``sparsity`` is reached in equal steps at the epochs (Trainer) / rounds (FedLoop) of ``at``;
    masked weights are kept at zero after every optimizer step. In FedLoop the server computes the masks from
    the global model at the end of a scheduled round and the uplink only carries unmasked weights
    (``pack_uplink``); the masks version is sent in the instruction config (``sparsity_version``; a remote
    client derives the masks as the non-zero entries of the received weights).

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=100,
                       callbacks=[MagnitudeSparsity(sparsity=0.8, at=[20, 30, 40])])

    Args:
        sparsity: final fraction of zeroed weights, in ``[0, 1)``.
        at: 0-based epochs (Trainer) or rounds (FedLoop) at whose end the masks are recomputed.
        scope: ``"layer"`` (each tensor gets ``sparsity``) or ``"global"`` (one threshold for all).
        min_numel: only parameters with at least this many elements (and ``ndim >= 2``: weights, not biases)
            are sparsified.
        pack_uplink: in FedLoop, wrap the uplink codec with :class:`SparseUplink` (through :meth:`wrap_uplink`).
        reset_client_state: per-client state entries reset when the masks changed since the client last trained.
    """

    def __init__(
        self,
        *,
        sparsity: float = 0.5,
        at: int | list[int] = 0,
        scope: str = "layer",
        min_numel: int = 1,
        pack_uplink: bool = True,
        reset_client_state: list[str] | None = None,
    ) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"MagnitudeSparsity: sparsity={sparsity!r} is not allowed; sparsity must be in [0, 1)")
        if scope not in SCOPES:
            raise ValueError(f"MagnitudeSparsity: scope={scope!r} is not allowed; scope must be one of {SCOPES}")
        if min_numel < 1:
            raise ValueError(f"MagnitudeSparsity: min_numel={min_numel!r} is not allowed; min_numel must be >= 1")
        self.sparsity = float(sparsity)
        self.at = parse_schedule("MagnitudeSparsity", "at", at)
        self.scope = scope
        self.min_numel = min_numel
        self.pack_uplink = pack_uplink
        self.reset_client_state = ["optimizer", "codec"] if reset_client_state is None else list(reset_client_state)
        self.masks: dict[str, Tensor] = {}
        self.steps_done = 0
        self._codec: SparseUplink | None = None

    def _targets(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.ndim >= 2 and p.numel() >= self.min_numel}

    @torch.no_grad()
    def apply_masks(self, model: nn.Module) -> None:
        """Zero the masked weights of ``model`` in place."""
        params = dict(model.named_parameters())
        for name, mask in self.masks.items():
            if name in params and params[name].shape == mask.shape:
                params[name].mul_(mask.to(params[name].device, params[name].dtype))

    def step(self, model: nn.Module) -> float:
        """Recompute the masks for the next step of the schedule and apply them; return the new sparsity."""
        self.steps_done += 1
        target = self.sparsity * self.steps_done / len(self.at)
        targets = self._targets(model)
        if not targets:
            warn_once(self, "no_targets", "MagnitudeSparsity: nothing to sparsify in %s: no weight has ndim >= 2 and "
                      "at least min_numel=%d elements; lower min_numel", type(model).__name__, self.min_numel)
        self.masks = {k: v.cpu() for k, v in magnitude_masks(targets, target, self.scope).items()}
        self.apply_masks(model)
        if self._codec is not None:
            self._codec.masks = self.masks
        log.info("sparsity step %d/%d: %.3f of masked weights zero", self.steps_done, len(self.at), target)
        return target

    def density(self) -> float:
        """Fraction of the masked tensors' entries that are kept."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / total if total else 1.0

    # ------------------------------------------------------------------ hooks
    def wrap_uplink(self, codec: Codec) -> Codec:
        """FedLoop set-up: ``codec`` wrapped in :class:`SparseUplink` (masked entries travel packed), whose masks
        this callback keeps in sync; ``codec`` unchanged when ``pack_uplink`` is off. A ``SparseUplink`` given
        as the loop's codec is used as it is (not wrapped twice)."""
        if not self.pack_uplink:
            return codec
        self._codec = codec if isinstance(codec, SparseUplink) else SparseUplink(codec)
        self._codec.masks = self.masks
        return self._codec

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Keep masked weights at zero after each optimizer step."""
        if self.masks:
            self.apply_masks(pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """``lightning.Trainer``: a sparsity step at the scheduled epochs."""
        e = trainer.current_epoch
        if not in_fedloop(trainer) and e in self.at and self.at.index(e) == self.steps_done:
            pl_module.log("sparsity", self.step(pl_module))

    def on_round_start(self, trainer: Any, pl_module: Any, instructions: list[Instruction]) -> None:
        """Server: tell clients the masks version."""
        for instr in instructions:
            instr.config["sparsity_version"] = self.steps_done

    def on_client_start(self, trainer: Any, pl_module: Any, instruction: Instruction) -> None:
        """Client: reset state made under other masks (codec residuals are shaped by the packed vectors). A client
        on its own machine (a Flower node), whose masks are older than the server's, first derives them as the
        non-zero entries of the weights it received (the server's masks zero the global model)."""
        version = int(instruction.config.get("sparsity_version", self.steps_done))
        if version != self.steps_done:
            model = trainer.lightning_module
            self.masks = {k: (p.detach() != 0).cpu() for k, p in self._targets(model).items()} if version else {}
            self.steps_done = version
            if self._codec is not None:
                self._codec.masks = self.masks
        reset_stale_client_state(trainer, "sparsity_version", self.steps_done, self.reset_client_state)

    def on_round_end(self, trainer: Any, pl_module: Any, metrics: dict[str, float]) -> None:
        """Server: recompute the masks from the aggregated model at the scheduled rounds."""
        r = trainer.current_round
        if on_server(trainer) and r in self.at and self.at.index(r) == self.steps_done:
            self.step(pl_module)
            fed_context(trainer).model_changed()  # the strategy re-reads the (now zeroed) global weights
        if self.masks:
            metrics["density"] = self.density()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Masks (bool tensors) and steps done."""
        return {"masks": {k: v.clone() for k, v in self.masks.items()}, "steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (and the codec's masks)."""
        self.masks = {k: v.bool() for k, v in state["masks"].items()}
        self.steps_done = int(state["steps_done"])
        if self._codec is not None:
            self._codec.masks = self.masks


__all__ = ["MagnitudeSparsity", "SparseUplink", "magnitude_masks"]
