"""Cheap post-training backdoor defences probed on saved backdoored models: activation clipping, CLP, FST.

For saved final models of ``benchmarks/robustness.py --models DIR`` (``20-0.2-ATTACK-SEED.pt``), every candidate
uses only the server's clean records (``PublicData`` generator seed 7, 500 records: the defences' data) and no
trigger knowledge; its setting is chosen on the 200 selection records (generator seed 8) as the strongest within
``--budget`` of the unrepaired model's selection accuracy. The test set is read only to report each row:

* ``clip``: per-channel upper bounds of conv1-3's pre-ReLU outputs, the ``q`` quantile of the clean records'
  outputs over records and positions, applied as a clamp (Wang et al. 2023, "Improved activation clipping for
  universal backdoor mitigation"); ``clip-pos``: one bound per channel and position (quantile over records);
  ``+in``: the input first clipped to the clean records' per-position ``[1 - q, q]`` quantiles; ``+head``: the
  logits clipped too;
* ``clp``: channel Lipschitzness pruning (Zheng et al., ECCV 2022): per conv channel the spectral norm of its
  kernel, channels above the layer's mean + u * std zeroed, data-free;
* ``fst``: the head re-initialised, then fine-tuned with cross-entropy plus ``alpha`` times the inner product of
  the head's weights with the original head's (Min et al., NeurIPS 2023), the head's norm kept at most the
  original's.

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/clip_probe.py --models runs/models20 --seeds 0
    OMP_NUM_THREADS=1 python benchmarks/clip_probe.py --models runs/models20 --only clip --trigger-start 18 \
        --trigger-pattern constant    # models trained with robustness.py's same trigger options
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import robustness as rb

from lightning_fed.callbacks._defence import accuracy
from lightning_fed.data import MNIST1DDataModule, PublicData

LAYERS = ("conv1", "conv2", "conv3")
CLIP_Q = (1.0, 0.9999, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8)
CLP_U = (5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0)
FST_ALPHA = (0.05, 0.1, 0.2, 0.5)


@torch.no_grad()
def outputs(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The submodule ``name``'s output on ``x`` (eval mode)."""
    got: list[torch.Tensor] = []
    h = model.get_submodule(name).register_forward_hook(lambda _m, _i, o: got.append(o.detach()))
    model.eval()
    model(x)
    h.remove()
    return got[0]


def clipped(
    model: nn.Module, x: torch.Tensor, q: float, per_position: bool, inputs: bool, head: bool
) -> nn.Module:
    """A copy of ``model`` whose conv1-3 outputs (and logits with ``head``) are clamped at the clean records'
    ``q`` quantiles, layer by layer (each layer's bounds measured with the earlier layers already clipped)."""
    m = copy.deepcopy(model).eval()
    if inputs:
        lo = torch.quantile(x, 1 - q, dim=0) if q < 1 else x.min(0).values
        hi = torch.quantile(x, q, dim=0) if q < 1 else x.max(0).values
        m.conv1.register_forward_pre_hook(lambda _m, a, lo=lo, hi=hi: (torch.clamp(a[0], lo, hi),))
    for name in (*LAYERS, "head") if head else LAYERS:
        out = outputs(m, name, x)
        if out.ndim == 3 and not per_position:
            flat = out.transpose(0, 1).reshape(out.shape[1], -1)
            bound = torch.quantile(flat, q, dim=1)[:, None]
        else:
            bound = torch.quantile(out, q, dim=0)
        m.get_submodule(name).register_forward_hook(lambda _m, _i, o, b=bound: torch.minimum(o, b))
    return m


def clp(model: nn.Module, u: float) -> tuple[nn.Module, int]:
    """A copy of ``model`` with CLP's channels zeroed, and how many."""
    m = copy.deepcopy(model)
    n = 0
    with torch.no_grad():
        for name in LAYERS:
            conv = m.get_submodule(name)
            w = conv.weight
            norms = torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)
            bad = norms > norms.mean() + u * norms.std()
            w[bad] = 0
            conv.bias[bad] = 0
            n += int(bad.sum())
    return m, n


def clp_noted(model: nn.Module, u: float) -> tuple[nn.Module, str]:
    """:func:`clp`, the count as a note for the table."""
    m, n = clp(model, u)
    return m, f" ({n} ch)"


def fst(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: float, lr: float, epochs: int, seed: int
) -> nn.Module:
    """A copy of ``model`` repaired by FST (module docstring)."""
    m = copy.deepcopy(model).train()
    w0 = model.head.weight.detach().clone()
    norm0 = float(w0.norm())
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m.head.reset_parameters()
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(32):
            opt.zero_grad()
            loss = F.cross_entropy(m(x[idx]), y[idx]) + alpha * (m.head.weight * w0).sum()
            loss.backward()
            opt.step()
            with torch.no_grad():
                m.head.weight.mul_(min(1.0, norm0 / float(m.head.weight.norm())))
    return m.eval()


def main(argv: list[str] | None = None) -> None:
    """Print the probe table of the requested seeds' saved models."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models", type=Path, required=True, help="the --models folder of benchmarks/robustness.py"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--attack", default="backdoor", choices=rb.BACKDOORS)
    p.add_argument("--budget", type=float, default=0.02, help="selection-accuracy budget")
    p.add_argument("--only", nargs="+", default=["clip", "clp", "fst"])
    p.add_argument("--trigger-start", type=int, help="the models' trigger (robustness.py's option)")
    p.add_argument("--trigger-pattern", default="alternating", choices=rb.PATTERNS)
    a = p.parse_args(argv)
    trigger = (a.trigger_start, a.trigger_pattern)
    torch.set_num_threads(1)
    clean = PublicData(num_samples=500, seed=7, labeled=True)
    select = PublicData(num_samples=200, seed=8, labeled=True)
    dm = MNIST1DDataModule(batch_size=16, num_samples=5000)
    dm.prepare_data()
    dm.setup("test")
    xt, yt = rb.test_tensors(dm)
    console = Console(width=200)
    table = Table(
        title="Post-training candidates: test accuracy % / attack success % (chosen: * on selection)"
    )
    for h in ("seed", "candidate", "setting", "select acc", "test acc", "ASR"):
        table.add_column(h, justify="right")
    for seed in a.seeds:
        model = rb.load_saved(a.models, a.attack, seed, trigger)
        base = accuracy(model, select.x, select.y)
        r = rb.measure(model, xt, yt, trigger)
        table.add_row(
            str(seed), "none", "", f"{100 * base:.1f}", f"{100 * r['acc']:.1f}", f"{100 * r['asr']:.1f}"
        )

        def row(label: str, setting: str, m: nn.Module, seed: int = seed) -> tuple[list[str], float]:
            sel = accuracy(m, select.x, select.y)
            r = rb.measure(m, xt, yt, trigger)
            return [
                str(seed),
                label,
                setting,
                f"{100 * sel:.1f}",
                f"{100 * r['acc']:.1f}",
                f"{100 * r['asr']:.1f}",
            ], sel

        runs: list[tuple[str, tuple[float, ...], Callable[[float], tuple[nn.Module, str]]]] = []
        if "clip" in a.only:
            for pos in (False, True):
                for inputs, head in ((False, False), (True, False), (False, True), (True, True)):
                    label = (
                        ("clip-pos" if pos else "clip")
                        + ("+in" if inputs else "")
                        + ("+head" if head else "")
                    )
                    runs.append(
                        (
                            label,
                            CLIP_Q,
                            lambda q, m=model, p=pos, i=inputs, h=head: (clipped(m, clean.x, q, p, i, h), ""),
                        )
                    )
        if "clp" in a.only:
            runs.append(("clp", CLP_U, lambda u, m=model: clp_noted(m, u)))
        if "fst" in a.only:
            for lr in (0.01, 0.02):
                runs.append(
                    (
                        f"fst lr {lr}",
                        FST_ALPHA,
                        lambda al, m=model, lr=lr, s=seed: (fst(m, clean.x, clean.y, al, lr, 10, s), ""),
                    )
                )
        for label, grid, build in runs:  # each grid from the weakest setting to the strongest
            rows, chosen = [], None
            for s in grid:
                m, note = build(s)
                cells, sel = row(label, f"{s}{note}", m)
                rows.append(cells)
                if sel >= base - a.budget:
                    chosen = len(rows) - 1
            for i, cells in enumerate(rows):
                if i == chosen:
                    cells[2] += " *"
                table.add_row(*cells)
    console.print(table)


if __name__ == "__main__":
    main()
