"""FoolsGold: Fung, Yoon and Beschastnikh, "The Limitations of Federated Learning in Sybil Settings", RAID 2020.

Clients that share one poisoning objective (sybils, or a colluding group with one backdoor) push the model the
same way round after round, while honest clients on non-IID shards do not. The server keeps, per client, the sum
of the updates it sent (its *history*) on a few *indicative* layers (the paper: the output layer; ``layers``
here, the model's last layer by default), and every round, over the histories of the round's clients:

1. ``cs_ij``: the pairwise cosine similarity of the histories; ``v_i = max(0, max_{j != i} cs_ij)``.
2. **pardoning**: where ``v_j > v_i``, ``cs_ij *= v_i / v_j`` (an honest client that merely resembles a sybil is
   not punished as one).
3. ``a_i = 1 - max(0, max_{j != i} cs_ij)``, rescaled so that the largest is 1 (then capped at 0.99 so the logit
   is finite).
4. the learning-rate weight ``w_i = clip(kappa * (ln(a_i / (1 - a_i)) + 0.5), 0, 1)``: a client with an identical
   twin gets 0, the most distinct ones 1.

The aggregate is FedAvg's example-weighted mean with each share multiplied by ``w_i`` (renormalised): with every
``w_i = 1`` it is FedAvg. A round with fewer than 2 replies has no similarity to measure and takes the plain
example-weighted mean (logged); a round where every weight is 0 (every history has a perfect twin) is refused
(:class:`~lightning_fed.errors.AggregationRefused`), and a refused round leaves the histories unchanged. No clean
data, no knowledge of the trigger.

Memory: the histories hold ``clients seen x indicative entries`` float32 values on the server (MNIST1DCNN's head:
1,260 values, 5 kB a client; 10,000 clients: 50 MB); they are the strategy's state (:meth:`FoolsGold.state_dict`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fed.errors import AggregationRefused
from lightning_fed.protocol import Payload, Reply
from lightning_fed.strategies.aggregate import example_weights, flat_norm
from lightning_fed.strategies.aggregators import Aggregator
from lightning_fed.strategies.fedavg import FedAvg
from lightning_fed.strategies.robust import AggregationReport
from lightning_fed.strategies.server_opt import ServerOptimizer
from lightning_fed.validation import need

log = logging.getLogger("lightning_fed")

CAP = 0.99
"""The rescaled ``a_i`` is capped here before the logit (the paper's implementation does the same)."""
TWIN = 1e-9
"""``a_i`` below this (a cosine within rounding of 1) is taken as 0: the client has a twin."""


def foolsgold_weights(history: Tensor, kappa: float = 1.0) -> Tensor:
    """FoolsGold's learning-rate weight of every row of ``history`` (``[n, k]``, ``n >= 2``), in ``[0, 1]``, float64
    (module docstring, steps 1-4). A zero row has cosine 0 with every other row. All weights are 0 when every row has
    a perfect twin (``1 - cs < TWIN``)."""
    h = history.double()
    unit = h / torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp(min=1e-300)
    cs = (unit @ unit.T).fill_diagonal_(0.0)  # 0 on the diagonal: v_i and the maxima below are >= 0
    v = cs.max(dim=1).values.clamp(min=0.0)
    pardon = v[None, :] > v[:, None]  # [i, j]: v_j > v_i, so v_j > 0
    cs = torch.where(pardon, cs * v[:, None] / v[None, :].clamp(min=1e-300), cs)
    alpha = 1.0 - cs.max(dim=1).values.clamp(min=0.0)
    alpha = torch.where(alpha < TWIN, 0.0, alpha)  # a twin up to rounding is a twin
    top = float(alpha.max())
    if not top > 0:
        return torch.zeros_like(alpha)
    alpha = (alpha / top).clamp(max=CAP)
    with torch.no_grad():
        w = kappa * (torch.log(alpha) - torch.log1p(-alpha) + 0.5)  # alpha 0: -inf, clipped to 0
    return w.clamp(min=0.0, max=1.0)


class FoolsGold(FedAvg):
    """FedAvg whose example shares are multiplied by FoolsGold's per-client weights (module docstring).

    :attr:`last` records the latest aggregation as an :class:`~lightning_fed.strategies.robust.AggregationReport`
    (positions in the round's reply list): ``dropped`` the replies given weight 0, ``clipped`` those given a weight
    strictly between 0 and 1, ``scores`` every weight; :class:`~lightning_fed.callbacks.Detection` reads it. Round
    metrics add ``fg_zeroed`` (replies given weight 0), ``fg_weight`` (mean weight) and ``fg_s`` (seconds).

    Example::

        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=30, strategy=FoolsGold(kappa=1.0))
        FoolsGold(layers=["head"])  # the histories of MNIST1DCNN's output layer (the default: the last layer)

    Args:
        layers: the indicative layers whose updates form the histories: module names of the model (every float
            state entry under them; e.g. ``["head"]``), or ``None``: the module of the model's last float state entry
            (the output layer).
        kappa: the logit's confidence (> 0; the paper's default 1): larger values push the weights towards 0 or 1.
        server_lr: as :class:`~lightning_fed.strategies.FedAvg`.
        aggregator: as :class:`~lightning_fed.strategies.FedAvg`; it receives FoolsGold's weights as the trust weights.
        server_optimizer: as :class:`~lightning_fed.strategies.FedAvg`.
    """

    def __init__(
        self,
        *,
        layers: list[str] | None = None,
        kappa: float = 1.0,
        server_lr: float = 1.0,
        aggregator: Aggregator | None = None,
        server_optimizer: ServerOptimizer | None = None,
    ) -> None:
        need(
            "FoolsGold",
            layers is None
            or (
                len(layers) > 0
                and all(isinstance(x, str) and x for x in layers)
            ),
            "layers",
            layers,
            "a non-empty list of module names (e.g. ['head']) or None (the model's last layer)",
        )
        need(
            "FoolsGold",
            math.isfinite(kappa) and kappa > 0,
            "kappa",
            kappa,
            "a finite number > 0",
        )
        super().__init__(server_lr=server_lr, aggregator=aggregator, server_optimizer=server_optimizer)
        self.layers = list(layers) if layers is not None else None
        self.kappa = float(kappa)
        self.features: list[str] = []
        """The federated entries whose updates form the histories (resolved at :meth:`setup`)."""
        self.history: dict[int, Tensor] = {}
        """Per client id, the sum of its updates of :attr:`features` (flattened, float32)."""
        self.last: AggregationReport | None = None

    def indicative(self, names: list[str]) -> list[str]:
        """The entries of ``names`` under :attr:`layers` (or those of the last entry's module).

        Raises:
            ValueError: a layer names none of the entries (naming ``layers``, the unknown ones and the model's
                layers).
        """
        if self.layers is None:
            module = names[-1].rsplit(".", 1)[0] if "." in names[-1] else names[-1]
            layers = [module]
        else:
            layers = self.layers

        def under(name: str, layer: str) -> bool:
            return name == layer or name.startswith(layer + ".")

        unknown = [x for x in layers if not any(under(n, x) for n in names)]
        modules = sorted({n.rsplit(".", 1)[0] for n in names})
        need(
            "FoolsGold",
            not unknown,
            "layers",
            self.layers,
            f"module names of the model; {unknown} name none (its layers: {modules})",
        )
        return [n for n in names if any(under(n, x) for x in layers)]

    def check_model(self, model: nn.Module) -> None:
        """Every name in ``layers`` must name float state entries of the federated weights of ``model``."""
        self.indicative(list(self.federated_state(model)))

    def setup_state(self, state: Payload) -> None:
        """FedAvg's buffers, then the indicative entries; histories of another size (the layers changed shape, e.g.
        pruning) are dropped."""
        super().setup_state(state)
        self.features = self.indicative(list(state))
        size = sum(state[n].numel() for n in self.features)
        if any(h.numel() != size for h in self.history.values()):
            log.info("FoolsGold: the indicative layers changed size; the client histories start again")
            self.history = {}

    def feature(self, payload: Payload) -> Tensor:
        """One reply's update of the indicative entries, flattened (float32)."""
        return torch.cat([payload[n].detach().reshape(-1).float().cpu() for n in self.features])

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """Add each reply's indicative update to its client's history, weight the replies by FoolsGold, then
        FedAvg's aggregation and server step with those weights (module docstring)."""
        spec, flat = self._require_setup()
        assert self._acc is not None and self._tmp is not None
        t0 = time.perf_counter()
        updated = {}
        for r in replies:
            old = self.history.get(r.client_id)
            step = self.feature(r.payload)
            updated[r.client_id] = step if old is None else old + step
        shares = torch.tensor(example_weights([r.num_examples for r in replies]), dtype=torch.float64)
        if len(replies) < 2:
            log.info(
                "round %d: FoolsGold has %d reply, no similarity to measure: the plain mean",
                server_round + 1,
                len(replies),
            )
            fg = torch.ones(len(replies), dtype=torch.float64)
        else:
            fg = foolsgold_weights(torch.stack([updated[r.client_id] for r in replies]), self.kappa)
        trust = fg * shares
        if not float(trust.sum()) > 0:
            raise AggregationRefused(
                f"{self!r}: every one of the {len(replies)} replies has FoolsGold weight 0 (each client's history "
                "has a perfect twin)"
            )
        trust = trust / trust.sum()
        update = self.aggregator.aggregate_payloads(
            self._acc, spec, (r.payload for r in replies), trust.tolist(), self._tmp
        )
        self.server_optimizer.step(flat, update)
        self.history.update(updated)  # only once the round aggregated: a refused round changes nothing
        weights = fg.tolist()
        self.last = AggregationReport(
            count=len(replies),
            seconds=time.perf_counter() - t0,
            dropped=[i for i, w in enumerate(weights) if w == 0.0],
            clipped=[i for i, w in enumerate(weights) if 0.0 < w < 1.0],
            scores=weights,
        )
        log.info(
            "round %d: FoolsGold weights %s; zeroed clients %s",
            server_round + 1,
            {r.client_id: round(w, 4) for r, w in zip(replies, weights, strict=True)},
            [replies[i].client_id for i in self.last.dropped],
        )
        return {
            "update_norm": flat_norm(update),
            **self.aggregator.report(),
            "fg_zeroed": float(len(self.last.dropped)),
            "fg_weight": float(fg.mean()),
            "fg_s": self.last.seconds,
        }

    def state_dict(self) -> dict[str, Any]:
        """FedAvg's state plus the histories: the client ids (ascending) and one ``[clients, features]`` tensor."""
        ids = sorted(self.history)
        hist = (
            torch.stack([self.history[i] for i in ids])
            if ids
            else torch.zeros(0, self._feature_size(), dtype=torch.float32)
        )
        return {
            **super().state_dict(),
            "foolsgold": {"clients": torch.tensor(ids, dtype=torch.long), "history": hist},
        }

    def _feature_size(self) -> int:
        """The number of indicative values (a history's length)."""
        return sum(v.numel() for k, v in self.global_payload().items() if k in self.features)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore FedAvg's state and the histories (a checkpoint without them starts with none).

        Raises:
            ValueError: the histories do not match the indicative layers' size.
        """
        super().load_state_dict(state)
        saved = state.get("foolsgold")
        if saved is None:
            self.history = {}
            return
        hist = saved["history"]
        if hist.shape[0] and hist.shape[1] != self._feature_size():
            raise ValueError("FoolsGold checkpoint's histories do not match the indicative layers' size")
        self.history = {int(c): hist[i].clone() for i, c in enumerate(saved["clients"].tolist())}

    def __repr__(self) -> str:
        return f"FoolsGold(layers={self.layers}, kappa={self.kappa})"


__all__ = ["FoolsGold", "foolsgold_weights"]
