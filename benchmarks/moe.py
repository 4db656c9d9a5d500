"""Mixture of experts on MNIST-1D, federated: MoE (E experts, top-1) versus the dense model with the same
active parameters and the dense model with the same total parameters, and FedMoE's expert-sparse uplink
versus FedAvg's dense uplink for the same MoE model.

    python benchmarks/moe.py                      # defaults: 8 experts, 50 rounds (a few minutes on 2 cores)
    python benchmarks/moe.py --rounds 5 --experts 4

Every run: 20 clients, Dirichlet(0.5) label split, 10 clients per round, SGD (lr 0.05, momentum 0.9),
batch 32, the same seeds. MACs per sample are counted on a real forward of the test set in eval mode
(:func:`lightning_fed.moe.count_macs`: an expert only sees the samples routed to it); for the dense models
torch-pruning's counter is shown beside it as a cross-check.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import dataclass

import lightning as L
import torch

from lightning_fed import FedLoop
from lightning_fed.callbacks import MoERouting
from lightning_fed.data import Dirichlet, MNIST1DDataModule
from lightning_fed.models import MNIST1DFFN
from lightning_fed.moe import count_macs, moe_layers
from lightning_fed.strategies import FedAvg, FedMoE


@dataclass
class Row:
    name: str
    total_params: int
    active_params: int
    macs: float
    macs_tp: float | None
    acc: float
    best_acc: float
    up_per_round: float
    down_per_round: float
    experts_sent: float | None
    seconds: float
    dropped: float | None


def active_params(model: torch.nn.Module) -> int:
    """Parameters one sample uses: all, minus (E - k) experts of each MoE layer."""
    total = sum(p.numel() for p in model.parameters())
    for m in moe_layers(model).values():
        per_expert = sum(p.numel() for p in m.experts[0].parameters())
        total -= (m.num_experts - m.k) * per_expert
    return total


def run(name: str, hidden: int, experts: int, strategy: str, args: argparse.Namespace) -> Row:
    L.seed_everything(args.seed, verbose=False)
    model = MNIST1DFFN(hidden=hidden, lr=0.05, optimizer="sgd", momentum=0.9)
    callbacks = []
    if experts:
        callbacks.append(MoERouting(convert=["ffn"], num_experts=experts, k=1, capacity_factor=args.capacity,
                                    balance_weight=args.balance_weight, log_load=False))
    strat = {"fedavg": FedAvg(), "fedmoe": FedMoE(), "fedmoe-personal": FedMoE(personal_router=True),
             "fedmoe-share": FedMoE(min_share=args.min_share)}[strategy]
    dm = MNIST1DDataModule(batch_size=32)
    with tempfile.TemporaryDirectory() as tmp:
        loop = FedLoop(num_clients=20, clients_per_round=10, rounds=args.rounds, local_epochs=args.local_epochs,
                       partition=Dirichlet(alpha=0.5, min_samples=10), strategy=strat, callbacks=callbacks,
                       eval_every=args.eval_every, test_every=args.eval_every, checkpoint_every=0, output_dir=tmp, seed=args.seed,
                       verbose=False, plot=False, loggers=[])
        t0 = time.perf_counter()
        res = loop.fit(model, dm)
        seconds = time.perf_counter() - t0
    dm.setup("test")
    x = dm.test_set.tensors[0]
    model.eval()
    macs = count_macs(model, x)
    macs_tp = None
    if not experts:
        import torch_pruning as tp

        macs_tp, _ = tp.utils.count_ops_and_params(model, x[:1])
    drops = [h["moe/dropped"] for h in res.history if "moe/dropped" in h]
    accs = [h["test_acc"] for h in res.history if "test_acc" in h]
    hist = res.history
    sent = [h["moe_experts_sent"] for h in hist if "moe_experts_sent" in h]
    return Row(
        name=name, total_params=sum(p.numel() for p in model.parameters()), active_params=active_params(model),
        macs=macs, macs_tp=macs_tp, acc=accs[-1], best_acc=max(accs),
        up_per_round=sum(h["bytes_up"] for h in hist) / len(hist),
        down_per_round=sum(h["bytes_down"] for h in hist) / len(hist),
        experts_sent=sum(sent) / len(sent) if sent else None, seconds=seconds,
        dropped=sum(drops) / len(drops) if drops else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of one expert / the dense FFN")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--capacity", type=lambda v: None if v.lower() == "none" else float(v), default=1.25,
                        help="training capacity factor, or 'none' for dropless")
    parser.add_argument("--balance-weight", type=float, default=0.01)
    parser.add_argument("--min-share", type=float, default=0.1, help="FedMoE min_share of the last run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", type=str, default=None, help="comma-separated subset of run names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning_fed").setLevel(logging.WARNING)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    e, h = args.experts, args.hidden
    runs = [
        (f"dense FFN {h} (same active)", h, 0, "fedavg"),
        (f"dense FFN {h * e} (same total)", h * e, 0, "fedavg"),
        (f"MoE {e}x{h} top-1, FedAvg", h, e, "fedavg"),
        (f"MoE {e}x{h} top-1, FedMoE", h, e, "fedmoe"),
        (f"MoE {e}x{h} top-1, FedMoE personal router", h, e, "fedmoe-personal"),
        (f"MoE {e}x{h} top-1, FedMoE min_share {args.min_share}", h, e, "fedmoe-share"),
    ]
    if args.only:
        keep = set(args.only.split(","))
        runs = [r for i, r in enumerate(runs) if str(i) in keep]
    print(f"MNIST-1D, 20 clients Dir(0.5), 10/round, {args.rounds} rounds x {args.local_epochs} local epochs, "
          f"capacity {args.capacity}, balance weight {args.balance_weight}, seed {args.seed}", flush=True)
    header = ("| model | params total | params active | MACs/sample | MACs (tp) | final acc | best acc | "
              "uplink/round | downlink/round | experts sent | dropped | seconds |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, hidden, experts, strategy in runs:
        r = run(name, hidden, experts, strategy, args)
        tp_col = f"{r.macs_tp:,.0f}" if r.macs_tp is not None else "-"
        sent = f"{100 * r.experts_sent:.0f} %" if r.experts_sent is not None else "-"
        dropped = f"{100 * r.dropped:.0f} %" if r.dropped is not None else "-"
        print(f"| {r.name} | {r.total_params:,} | {r.active_params:,} | {r.macs:,.0f} | {tp_col} | "
              f"{100 * r.acc:.1f} % | {100 * r.best_acc:.1f} % | {r.up_per_round / 1e6:.2f} MB | "
              f"{r.down_per_round / 1e6:.2f} MB | {sent} | {dropped} | {r.seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
