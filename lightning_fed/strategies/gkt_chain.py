"""Teacher-assistant chains for FedGKT: the server model's knowledge reaches a client tier through smaller
server-side models.

Mirzadeh et al., "Improved Knowledge Distillation via Teacher Assistant", AAAI 2020. In FedGKT (He et al. 2020)
the large server model sends its logits on each client's samples back to the client, which distils them. With a
chain such as ``["server", "mid", "small"]`` a server-side assistant ``mid`` (the server's architecture with fewer
channels) learns each round from the server model's logits (on the same client feature maps, cross-entropy plus
KD), and the clients of tier ``small`` receive ``mid``'s logits instead of the server's. Client tiers never teach:
a FedGKT client shares its samples with the server only, so a chain starts at ``"server"``, continues through
assistants, and ends at the one tier it teaches; the other tiers learn from the server model as without a chain.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fed.callbacks.kd_losses import kd_loss
from lightning_fed.seeding import Stream, generator
from lightning_fed.strategies.assistants import check_chain, num_parameters
from lightning_fed.strategies.tiers import ModelTiers, tier_names

SERVER = "server"
"""The name of FedGKT's server model in a chain."""

FeatureSet = tuple[int, dict[str, Tensor], int]
"""``(client_id, payload with features / logits / labels, tier)``: what a server-side model trains on."""


def fit_on_features(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    train: list[FeatureSet],
    targets: list[Tensor],
    epochs: int,
    batch_size: int,
    alpha: float,
    temperature: float,
    g: torch.Generator,
) -> tuple[float, int]:
    """Train a server-side model on client feature maps: cross-entropy on the labels plus ``alpha`` times KD
    from ``targets[i]`` (logits, one row per sample of ``train[i]``); batches never mix clients, their order is
    drawn from ``g``. Returns the summed loss (weighted by batch size) and the number of samples seen."""
    model.train()
    total, count = 0.0, 0
    with torch.enable_grad():
        for _ in range(epochs):
            batches = []
            for i, (_cid, p, _t) in enumerate(train):
                n = len(p["labels"])
                order = torch.randperm(n, generator=g)
                batches += [(i, order[s : s + batch_size]) for s in range(0, n, batch_size)]
            for j in torch.randperm(len(batches), generator=g).tolist():
                i, b = batches[j]
                _cid, p, t = train[i]
                out = model(p["features"][b], t)
                loss = F.cross_entropy(out, p["labels"][b]) + alpha * kd_loss(out, targets[i][b], temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(b)
                count += len(b)
    model.eval()
    return total, count


class GKTAssistants:
    """A validated FedGKT chain, its server-side assistants and their optimizers.

    Example::

        chain = GKTAssistants(["server", "mid", "small"], {"mid": 16}, ModelTiers(models=[...],
                              names=["small", "large"]), server_width=64)
        chain.build(lambda width: GKTConvServer(..., channels=width, ...), server, tier_modules, lr=1e-3)

    Args:
        chain: ``"server"``, then assistant names, then one tier name (the tier taught).
        assistants: width of each server-side assistant by name: its channels (FedGKT ``split`` set) or its
            hidden width (``split=None``); every assistant is named in ``chain``.
        tiers: FedGKT's tiers (``None``: one tier, ``tier0``).
        server_width: the server model's width in the same unit (``server_channels`` or ``server_hidden``).
        width_unit: the unit's name, for messages.
    """

    def __init__(
        self,
        chain: list[str],
        assistants: dict[str, int] | None,
        tiers: ModelTiers | None,
        server_width: int,
        width_unit: str = "channels",
    ) -> None:
        owner = "FedGKT"
        self.chain = [str(c) for c in chain]
        self.widths = {str(k): int(v) for k, v in (assistants or {}).items()}
        self.tier_names = tier_names(tiers)
        key = f"{owner}: assistant_chain={self.chain}"
        clash = sorted(set(self.widths) & {*self.tier_names, SERVER})
        if clash:
            raise ValueError(
                f"{owner}: assistants={{{clash[0]!r}: ...}} is not allowed; assistant names must differ "
                f"from {SERVER!r} and the tier names {self.tier_names}"
            )
        bad = sorted(n for n, w in self.widths.items() if w < 1)
        if bad:
            raise ValueError(
                f"{owner}: assistants={{{bad[0]!r}: {self.widths[bad[0]]}}} is not allowed; an "
                f"assistant's width ({width_unit}) must be >= 1"
            )
        unused = sorted(set(self.widths) - set(self.chain))
        if unused:
            raise ValueError(
                f"{owner}: assistants={{{unused[0]!r}: ...}} is not allowed; every assistant must be "
                f"named in assistant_chain={self.chain}"
            )
        sizes = (
            {self.tier_names[t]: num_parameters(m) for t, m in enumerate(tiers.models, start=1)}
            if tiers
            else {}
        )
        check_chain(owner, self.chain, self.names, sizes)
        if self.chain[0] != SERVER:
            raise ValueError(
                f"{key} is not allowed; a FedGKT chain starts at {SERVER!r} (the server model), e.g. "
                f"[{SERVER!r}, <assistant>, <tier>]"
            )
        for a, b in itertools.pairwise(self.chain):
            if a in self.tier_names:
                raise ValueError(
                    f"{key} is not allowed; {a!r} is a client tier and cannot teach {b!r}: FedGKT clients "
                    f"share their samples only with the server, so only {SERVER!r} and assistants teach"
                )
        if self.chain[-1] not in self.tier_names:
            raise ValueError(
                f"{key} is not allowed; a FedGKT chain ends at the client tier it teaches, one of "
                f"{self.tier_names}"
            )
        widths = {SERVER: server_width, **self.widths}
        for a, b in itertools.pairwise(self.chain[:-1]):
            if widths[b] >= widths[a]:
                raise ValueError(
                    f"{key} is not allowed; {a!r} ({widths[a]} {width_unit}) cannot teach {b!r} "
                    f"({widths[b]} {width_unit}): a chain goes from larger to smaller models"
                )
        self.student = self.tier_names.index(self.chain[-1])
        """The tier taught through the chain."""
        self.models: dict[str, nn.Module] = {}
        self.opts: dict[str, torch.optim.Optimizer] = {}

    @property
    def names(self) -> list[str]:
        """Every name a chain may use: the tiers', the server's, then the assistants'."""
        return [*self.tier_names, SERVER, *self.widths]

    def build(
        self, make: Callable[[int], nn.Module], server: nn.Module, tier_modules: list[nn.Module], lr: float
    ) -> None:
        """Build every assistant with ``make(width)`` and an Adam optimizer; check the whole chain's parameter
        counts now that the server and tier 0 are known."""
        self.models = {n: make(w) for n, w in self.widths.items()}
        self.opts = {n: torch.optim.Adam(m.parameters(), lr=lr) for n, m in self.models.items()}
        sizes = {n: num_parameters(m) for n, m in self.models.items()}
        sizes[SERVER] = num_parameters(server)
        sizes.update({self.tier_names[t]: num_parameters(m) for t, m in enumerate(tier_modules)})
        check_chain("FedGKT", self.chain, self.names, sizes)

    def teacher_name(self, tier: int) -> str:
        """The name of the model whose logits the clients of ``tier`` receive (``"server"`` off the chain)."""
        return self.chain[-2] if tier == self.student else SERVER

    def train(
        self,
        server_round: int,
        train: list[FeatureSet],
        server: nn.Module,
        seed: int,
        epochs: int,
        batch_size: int,
        alpha: float,
        temperature: float,
    ) -> tuple[dict[str, float], list[tuple[str, str]]]:
        """Each assistant, in chain order, learns from its teacher's logits on the round's feature maps (the
        teacher as it left its own training). Returns metrics and the ``(teacher, student)`` steps taken."""
        metrics: dict[str, float] = {}
        steps = []
        for i, (teacher_name, name) in enumerate(itertools.pairwise(self.chain[:-1]), start=1):
            teacher = server if teacher_name == SERVER else self.models[teacher_name]
            teacher.eval()
            with torch.no_grad():
                targets = [teacher(p["features"], t) for _cid, p, t in train]
            g = generator(seed, Stream.FEDGKT_SERVER, server_round, i)
            total, count = fit_on_features(
                self.models[name], self.opts[name], train, targets, epochs, batch_size, alpha, temperature, g
            )
            metrics[f"assistant/{name}/loss"] = total / max(count, 1)
            steps.append((teacher_name, name))
        return metrics, steps

    def state_dict(self) -> dict[str, Any]:
        """Every assistant's weights and optimizer state."""
        return {
            n: {"model": {k: v.clone() for k, v in m.state_dict().items()}, "opt": self.opts[n].state_dict()}
            for n, m in self.models.items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the assistants must be the same."""
        if set(state) != set(self.models):
            raise ValueError(
                f"FedGKT checkpoint's assistants {sorted(state)} do not match assistants "
                f"{sorted(self.models)}"
            )
        for n, s in state.items():
            self.models[n].load_state_dict(s["model"])
            self.opts[n].load_state_dict(s["opt"])


__all__ = ["SERVER", "GKTAssistants", "fit_on_features"]
