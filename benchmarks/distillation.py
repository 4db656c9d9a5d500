"""Distillation benchmark: heterogeneous clients on MNIST-1D.

Three client architectures (MNIST1DCNN with 8 / 16 / 32 channels, tiers 0 / 1 / 2, client ``i`` gets tier
``i % 3``), 20 clients, Dirichlet(alpha=0.5) label split, 10 clients per round. For every method it reports
the final accuracy of each tier (the tier's global model for FedDF / FedAvg / FedGen; the mean over all the
tier's clients' own models for FedMD, FedMD-NFDP, FedGKT, decentralized distillation and isolated
training), the server model's accuracy where there is one, and the mean bytes exchanged per round (up + down,
as counted by FedLoop). With ``--personal`` every client is also judged on its own data (``PersonalEval``: 100
test examples with its label proportions): the personal models' mean and 10th-percentile accuracy (the clients' own
models of FedMD, FedMD-NFDP, FedGKT, decentralized distillation, isolated training) and the global model's on the
same splits (FedAvg, FedGen).

    python benchmarks/distillation.py --rounds 30 --local-epochs 2
    python benchmarks/distillation.py --rounds 30 --local-epochs 2 --personal --methods isolated fedavg_small fedmd
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time

import lightning as L
import torch

from lightning_fed import FedLoop, PersonalEval
from lightning_fed.data import Dirichlet, MNIST1DDataModule, PublicData
from lightning_fed.models import MNIST1DCNN
from lightning_fed.strategies import (
    DecentralizedDistillation,
    FedAvg,
    FedDF,
    FedGen,
    FedGKT,
    FedMD,
    FedMDNFDP,
    ModelTiers,
)

WIDTHS = (8, 16, 32)
NUM_CLIENTS = 20
METHODS = ("isolated", "fedavg_small", "fedmd", "fedmd_nfdp", "feddf", "fedgkt", "ddist", "fedgen_small")
# FedMD's transfer-learning phase (labelled public data) and the isolated baselines each variant is fair against
EXTRA = ("isolated_k100", "isolated_transfer", "fedmd_transfer", "fedmd_nfdp_transfer", "fedgkt_flat")
TRANSFER_EPOCHS, TRANSFER_LR = 30, 3e-3


def cnn(channels: int) -> MNIST1DCNN:
    """The benchmark's client model: SGD lr 0.05, momentum 0.9."""
    return MNIST1DCNN(channels=channels, lr=0.05, optimizer="sgd", momentum=0.9)


def build(method: str, public: PublicData, seed: int) -> tuple[object, bool]:
    """The strategy of ``method`` and whether it uses the three tiers."""
    tiers = ModelTiers(models=[cnn(w) for w in WIDTHS[1:]])
    n = NUM_CLIENTS
    if method == "isolated":  # FedMD without digest: every client trains alone (logits are sent but unused)
        return FedMD(public=public, tiers=tiers, digest_epochs=0, public_per_round=10, eval_clients=n), True
    if method == "isolated_k100":  # the isolated baseline of FedMD-NFDP: each client alone on its k=100 records
        return FedMDNFDP(public=public, tiers=tiers, records_per_party=100, digest_epochs=0, public_per_round=10,
                         eval_clients=n), True
    if method == "isolated_transfer":  # transfer learning on the labelled public set, then each client alone
        return FedMD(public=public, tiers=tiers, digest_epochs=0, public_per_round=10, eval_clients=n,
                     transfer_epochs=TRANSFER_EPOCHS, transfer_lr=TRANSFER_LR), True
    if method == "fedmd_transfer":
        return FedMD(public=public, tiers=tiers, public_per_round=500, digest_epochs=2, eval_clients=n,
                     transfer_epochs=TRANSFER_EPOCHS, transfer_lr=TRANSFER_LR), True
    if method == "fedmd_nfdp_transfer":
        return FedMDNFDP(public=public, tiers=tiers, records_per_party=100, public_per_round=500, digest_epochs=2,
                         eval_clients=n, transfer_epochs=TRANSFER_EPOCHS, transfer_lr=TRANSFER_LR), True
    if method == "fedavg_small":
        return FedAvg(), False
    if method == "fedmd":
        return FedMD(public=public, tiers=tiers, public_per_round=500, digest_epochs=2, eval_clients=n), True
    if method == "fedmd_nfdp":
        return FedMDNFDP(public=public, tiers=tiers, records_per_party=100, public_per_round=500,
                         digest_epochs=2, eval_clients=n), True
    if method == "feddf":
        return FedDF(public=public, tiers=tiers, proxy_size=1000, distill_steps=100, distill_lr=1e-3), True
    if method == "fedgkt":  # the paper's split: clients send the feature map after their first convolution
        return FedGKT(tiers=tiers, split=1, server_channels=64, server_hidden=256, server_epochs=2, alpha=1.0,
                      temperature=3.0, eval_clients=n), True
    if method == "fedgkt_flat":  # split before the linear head; the server is an MLP on the flat features
        return FedGKT(tiers=tiers, split=None, server_hidden=256, server_epochs=2, alpha=1.0, temperature=3.0,
                      eval_clients=n), True
    if method == "ddist":
        return DecentralizedDistillation(num_clients=n, graph="random_regular", degree=4, public=public,
                                         reference_size=500, temperature=2.0, digest_epochs=2, tiers=tiers,
                                         eval_clients=n), True
    if method == "fedgen_small":
        return FedGen(gen_steps=50, alpha=1.0, beta=1.0), False
    raise ValueError(method)


def run(method: str, rounds: int, local_epochs: int, seed: int, personal: bool = False) -> dict[str, float]:
    """One method end to end; returns its final metrics (and the personalized ones with ``personal``)."""
    L.seed_everything(seed, verbose=False)
    public = PublicData(num_samples=1000, seed=7, labeled="transfer" in method)
    strategy, tiered = build(method, public, seed)
    model = cnn(WIDTHS[0])
    with tempfile.TemporaryDirectory() as out:
        loop = FedLoop(num_clients=NUM_CLIENTS, clients_per_round=10, rounds=rounds, local_epochs=local_epochs,
                       partition=Dirichlet(alpha=0.5, min_samples=10), strategy=strategy, eval_every=rounds,
                       checkpoint_every=0, output_dir=out, seed=seed, verbose=False, plot=False, loggers=[],
                       personal_eval=PersonalEval(holdout="test", size=100) if personal else None)
        t = time.perf_counter()
        res = loop.fit(model, MNIST1DDataModule(batch_size=32))
        secs = time.perf_counter() - t
    last = res.history[-1]
    row = {"method": method, "seconds": secs,
           "bytes_per_round": sum(h["bytes_up"] + h["bytes_down"] for h in res.history) / len(res.history)}
    if tiered:
        for t in range(3):
            row[f"tier{t}"] = last.get(f"tier{t}/test_acc", float("nan"))
            if f"tier{t}/server_test_acc" in last:  # FedGKT: the tier's extractors followed by the server model
                row[f"tier{t}_server"] = last[f"tier{t}/server_test_acc"]
    else:
        row["tier0"] = last["test_acc"]
    row["server"] = last.get("server/test_acc", float("nan"))
    for key in ("acc_mean", "acc_p10", "global_acc_mean", "global_acc_p10"):
        if f"personal/{key}" in last:
            row[f"personal_{key}"] = last[f"personal/{key}"]
    if method.startswith("fedmd_nfdp"):
        row["epsilon"], row["delta"] = last["nfdp/epsilon"], last["nfdp/delta"]
    return row


def main() -> None:
    """Run the chosen methods and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + EXTRA)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--personal", action="store_true", help="also judge every client on its own data (PersonalEval)")
    args = p.parse_args()
    logging.getLogger("lightning_fed").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    rows = []
    for m in args.methods:
        rows.append(run(m, args.rounds, args.local_epochs, args.seed, args.personal))
        r = rows[-1]
        print(f"done {m}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
              flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)

    def fmt(v: float | None) -> str:
        return "n/a" if v is None or math.isnan(v) else f"{100 * v:.1f} %"

    print("\n| method | tier 0 (8 ch) | tier 1 (16 ch) | tier 2 (32 ch) | server | KB / round | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {fmt(r.get('tier0'))} | {fmt(r.get('tier1'))} | {fmt(r.get('tier2'))} | "
              f"{fmt(r.get('server'))} | {r['bytes_per_round'] / 1024:.1f} | {r['seconds']:.0f} |")
        if "tier0_server" in r:  # FedGKT's deployed model: each client's extractor, then the server model
            print(f"| {r['method']} (client extractor + server model) | {fmt(r['tier0_server'])} | "
                  f"{fmt(r['tier1_server'])} | {fmt(r['tier2_server'])} | | | |")
    if args.personal:
        print("\n| method | personal mean / p10 | global on clients mean / p10 |")
        print("|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {fmt(r.get('personal_acc_mean'))} / {fmt(r.get('personal_acc_p10'))} | "
                  f"{fmt(r.get('personal_global_acc_mean'))} / {fmt(r.get('personal_global_acc_p10'))} |")


if __name__ == "__main__":
    main()
