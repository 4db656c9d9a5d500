"""Turn named feed-forward blocks of an existing model into :class:`~lightning_fed.moe.layer.MoELayer`s.

Sparse upcycling (Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints", ICLR 2023): every expert starts as a copy of the dense block, so with normalised gates and no
dropped tokens the converted model computes exactly what the dense one did, and training then lets the
experts diverge. The model's code is not edited: the block is replaced in its parent module by name.
"""

from __future__ import annotations

import logging

from torch import nn

from lightning_fed.moe.layer import MoELayer, make_experts

log = logging.getLogger("lightning_fed")


def _in_features(block: nn.Module) -> int | None:
    """The input width of a block: its own or its first submodule's ``in_features``."""
    for m in block.modules():
        n = getattr(m, "in_features", None)
        if isinstance(n, int):
            return n
    return None


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, child


def convert_to_moe(
    model: nn.Module,
    names: list[str],
    *,
    num_experts: int = 4,
    k: int = 1,
    capacity_factor: float | None = 1.25,
    eval_capacity_factor: float | None = None,
    noisy_gating: bool = False,
    normalize_gates: bool = True,
    upcycle: bool = True,
    router_init_std: float = 0.02,
) -> list[str]:
    """Replace each block named in ``names`` by a mixture of ``num_experts`` copies of it, in place.

    Example::

        model = MNIST1DMLP()
        convert_to_moe(model, ["net.2"], num_experts=4, k=1)   # net.2 (a Linear) becomes an MoELayer
        # model.net[2].experts[0] is a copy of the old net.2; the router is model.net[2].router

    Args:
        model: the model to edit (e.g. a LightningModule).
        names: qualified names of the blocks (``named_modules`` names, such as ``"net.2"`` or ``"ffn"``);
            each block maps ``[n, d]`` inputs to ``[n, d_out]`` outputs and has an ``in_features``
            (itself or its first submodule with one, e.g. a ``Linear``).
        num_experts: experts per converted block (>= 2).
        k: experts each token is routed to.
        capacity_factor: training capacity factor (``None`` = dropless); see :class:`MoELayer`.
        eval_capacity_factor: evaluation capacity factor (``None`` = dropless).
        noisy_gating: noisy top-k gating in training.
        normalize_gates: gates sum to 1 over the chosen experts (keeps an upcycled model's outputs).
        upcycle: experts are copies of the block (True) or re-initialised copies (False).
        router_init_std: standard deviation of the router's initial weights.

    Returns:
        The names converted (blocks that already are ``MoELayer``s are skipped and not returned).

    Raises:
        ValueError: an empty or duplicated name list, a name that is not a submodule, a block without
            ``in_features``, or invalid routing settings.
    """
    if not names:
        raise ValueError("convert_to_moe: names=[] is not allowed; give at least one submodule name")
    if len(set(names)) != len(names):
        raise ValueError(f"convert_to_moe: names={names!r} has duplicates; each block may be named once")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 2:
        raise ValueError(f"convert_to_moe: num_experts={num_experts!r} is not allowed; must be an int >= 2")
    modules = dict(model.named_modules())
    blocks: list[tuple[str, nn.Module, int]] = []
    for name in names:
        if not name or name not in modules:
            some = [n for n in modules if n][:8]
            raise ValueError(f"convert_to_moe: names entry {name!r} is not a submodule of {type(model).__name__}; "
                             f"names are named_modules() names such as {some}")
        block = modules[name]
        if isinstance(block, MoELayer):
            continue
        d = _in_features(block)
        if d is None:
            raise ValueError(f"convert_to_moe: block {name!r} ({type(block).__name__}) has no in_features; "
                             "convert feed-forward blocks (a Linear or a block starting with one)")
        blocks.append((name, block, d))
    converted = []
    for name, block, d in blocks:
        layer = MoELayer(
            make_experts(block, num_experts, upcycle=upcycle), d, k=k, capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor, noisy_gating=noisy_gating, normalize_gates=normalize_gates,
            router_init_std=router_init_std,
        )
        ref = next(iter(block.parameters()), None)
        if ref is not None:
            layer.router.to(dtype=ref.dtype)
            if layer.noise is not None:
                layer.noise.to(dtype=ref.dtype)
        layer.train(block.training)
        parent, child = _parent(model, name)
        setattr(parent, child, layer)
        converted.append(name)
        log.info("converted %s (%s) into %d experts, top-%d", name, type(block).__name__, num_experts, k)
    return converted


__all__ = ["convert_to_moe"]
