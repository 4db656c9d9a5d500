"""Teacher-assistant chains: route distillation through intermediate-size models.

Mirzadeh et al., "Improved Knowledge Distillation via Teacher Assistant", AAAI 2020: a student learns badly
from a teacher far larger than itself (the capacity gap); distilling large -> medium -> small through an
intermediate "assistant" narrows each step. A chain names the models in teaching order, by tier name
(:attr:`ModelTiers.names`, ``tier<t>`` by default) or by the name of a server-side assistant whose
architecture is given. A chain must not repeat a name (a loop), must name only known models, and must go
from larger to smaller models (parameter counts strictly decreasing).
"""

from __future__ import annotations

import itertools

from torch import nn

from lightning_fed.strategies.tiers import ModelTiers, num_tiers, tier_names


def num_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module`` (the size a chain is ordered by)."""
    return sum(p.numel() for p in module.parameters())


def check_chain(owner: str, chain: list[str], names: list[str], sizes: dict[str, int]) -> None:
    """Raise ``ValueError`` naming ``assistant_chain`` if ``chain`` is not a valid teaching order.

    Args:
        owner: the class named in the message.
        chain: model names, teacher first.
        names: every name the chain may use (tiers, then assistants).
        sizes: parameter counts of the names whose size is known now (a chain step between two of them must
            go from more to fewer parameters).
    """
    key = f"{owner}: assistant_chain={list(chain)}"
    if len(chain) < 2:
        raise ValueError(f"{key} is not allowed; a chain names at least two models, teacher first")
    unknown = [c for c in chain if c not in names]
    if unknown:
        raise ValueError(
            f"{key} is not allowed; {unknown[0]!r} is not a tier or assistant; known names: {names}"
        )
    repeated = sorted({c for c in chain if chain.count(c) > 1})
    if repeated:
        raise ValueError(
            f"{key} is not allowed; {repeated[0]!r} appears twice (a loop); each model teaches once"
        )
    for a, b in itertools.pairwise(chain):
        if a in sizes and b in sizes and sizes[b] >= sizes[a]:
            raise ValueError(
                f"{key} is not allowed; {a!r} ({sizes[a]} parameters) cannot teach {b!r} "
                f"({sizes[b]} parameters): a chain goes from larger to smaller models"
            )


class AssistantChain:
    """A validated teaching order over a strategy's tiers and server-side assistants.

    Example::

        chain = AssistantChain("FedDF", ["large", "medium", "small"], tiers=ModelTiers(models=[...],
                               names=["small", "large"]), assistants={"medium": MNIST1DCNN(channels=16)})
        chain.check_sizes(default_model)   # once tier 0 (the loop's model) is known
        chain.steps()                      # [("large", "medium"), ("medium", "small")]

    Args:
        owner: the strategy's name, for messages.
        chain: model names, teacher first.
        tiers: the strategy's tiers (``None``: one tier, ``tier0``).
        assistants: server-side models by name; names must differ from the tier names.
    """

    def __init__(
        self,
        owner: str,
        chain: list[str],
        tiers: ModelTiers | None,
        assistants: dict[str, nn.Module] | None = None,
    ) -> None:
        self.owner = owner
        self.chain = [str(c) for c in chain]
        self.tiers = tiers
        self.assistants = dict(assistants or {})
        self.tier_names = tier_names(tiers)
        clash = sorted(set(self.assistants) & set(self.tier_names))
        if clash:
            raise ValueError(
                f"{owner}: assistants={{{clash[0]!r}: ...}} is not allowed; assistant names must "
                f"differ from the tier names {self.tier_names}"
            )
        bad = [n for n, m in self.assistants.items() if not isinstance(m, nn.Module)]
        if bad:
            raise ValueError(f"{owner}: assistants[{bad[0]!r}] is not allowed; it must be an nn.Module")
        unused = sorted(set(self.assistants) - set(self.chain))
        if unused:
            raise ValueError(
                f"{owner}: assistants={{{unused[0]!r}: ...}} is not allowed; every assistant must be "
                f"named in assistant_chain={self.chain}"
            )
        sizes = {n: num_parameters(m) for n, m in self.assistants.items()}
        if tiers is not None:
            sizes.update({self.tier_names[t]: num_parameters(m) for t, m in enumerate(tiers.models, start=1)})
        check_chain(owner, self.chain, self.names, sizes)

    @property
    def names(self) -> list[str]:
        """Every name a chain may use: the tiers', then the assistants'."""
        return self.tier_names + list(self.assistants)

    def check_sizes(self, default: nn.Module) -> None:
        """Check the whole chain's order once tier 0 (the loop's model, ``default``) is known."""
        sizes = {n: num_parameters(m) for n, m in self.assistants.items()}
        for t in range(num_tiers(self.tiers)):
            m = default if t == 0 or self.tiers is None else self.tiers.models[t - 1]
            sizes[self.tier_names[t]] = num_parameters(m)
        check_chain(self.owner, self.chain, self.names, sizes)

    def tier_index(self, name: str) -> int | None:
        """The tier number of ``name``, or ``None`` for a server-side assistant."""
        return self.tier_names.index(name) if name in self.tier_names else None

    def steps(self) -> list[tuple[str, str]]:
        """``(teacher, student)`` pairs in teaching order."""
        return list(itertools.pairwise(self.chain))


__all__ = ["AssistantChain", "check_chain", "num_parameters"]
