"""Model-compression benchmark: structured pruning, QAT, pruning + QAT and magnitude sparsity against the
unpruned FedAvg baseline, all on the FedAvg MNIST-1D recipe and measured side by side in this one process.

Recipe (recipes/mnist1d/fedavg.yaml): MNIST1DCNN (25 channels), 20 clients, Dirichlet(0.5), 10 per round, 5 local
epochs, SGD lr 0.05 momentum 0.9, batch 32, ``--rounds`` rounds, seed 0. Compression settings are those of the
recipes fedavg_pruning.yaml / fedavg_qat.yaml / fedavg_pruning_qat.yaml. Latency: median of ``--repeats`` forward
passes on one CPU thread, batch 1 and batch 256, of each final float model (and of the int8 export).

    python benchmarks/compression.py                  # the whole table (5 runs of 100 rounds)
    python benchmarks/compression.py --rounds 20 --runs baseline pruning
    python benchmarks/compression.py --optim8bit-rounds 3   # also: optimizer-state bytes of 8-bit Adam
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from typing import Any

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

from lightning_fed import FedAvg, FedLoop
from lightning_fed.callbacks import EightBitOptimizer, MagnitudeSparsity, QuantizationAware, StructuredPruning
from lightning_fed.callbacks.footprint import cpu_latency_ms, float_copy, measure_footprint
from lightning_fed.callbacks.qat import convert_qat, prepare_qat
from lightning_fed.data import Dirichlet, MNIST1DDataModule
from lightning_fed.models import MNIST1DCNN

RUNS = ("baseline", "pruning", "qat", "qat_channel", "pruning_qat", "sparsity")


def callbacks_for(name: str, rounds: int) -> list[Any]:
    """The compression callbacks of a run, scaled to ``rounds`` (the recipes use 100)."""
    s = rounds / 100

    def at(*rs: int) -> list[int]:
        return sorted({max(0, int(r * s)) for r in rs})

    prune = StructuredPruning(ratio=0.36, at=at(20, 30, 40), importance="magnitude")
    if name == "baseline":
        return []
    if name == "pruning":
        return [prune]
    if name == "qat":
        return [QuantizationAware(scheme="int8_tensor", start=int(60 * s))]
    if name == "qat_channel":
        return [QuantizationAware(scheme="int8", start=int(60 * s))]
    if name == "pruning_qat":
        return [prune, QuantizationAware(scheme="int8_tensor", start=int(60 * s))]
    if name == "sparsity":
        return [MagnitudeSparsity(sparsity=0.7, at=at(30, 40, 50))]
    raise ValueError(name)


def fit(name: str, rounds: int, out: str, callbacks: list[Any] | None = None, **model_kw: Any) -> tuple[Any, Any, list[Any]]:
    """One federated run of the recipe with ``name``'s callbacks."""
    L.seed_everything(0, verbose=False)
    cbs = callbacks if callbacks is not None else callbacks_for(name, rounds)
    loop = FedLoop(num_clients=20, clients_per_round=10, rounds=rounds, local_epochs=5,
                   partition=Dirichlet(alpha=0.5, min_samples=10), strategy=FedAvg(), callbacks=cbs,
                   eval_every=10, test_every=10, checkpoint_every=0, output_dir=out, seed=0, verbose=False, plot=False, loggers=[])
    model = MNIST1DCNN(channels=25, lr=0.05, optimizer="sgd", momentum=0.9, **model_kw)
    res = loop.fit(model, MNIST1DDataModule(batch_size=32))
    return res, model, cbs


def main() -> None:
    """Run the compression variants and print one table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=RUNS)
    ap.add_argument("--repeats", type=int, default=100, help="timed runs per block (batch 1; batch 256: a fifth)")
    ap.add_argument("--blocks", type=int, default=9, help="interleaved latency blocks; the median is reported")
    ap.add_argument("--optim8bit-rounds", type=int, default=0, help="also run 8-bit Adam for this many rounds")
    ap.add_argument("--json", default=None, help="write the raw numbers here (after every run)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for training")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # a tiny model: more threads only add contention on a shared CPU
    logging.getLogger("lightning_fed").setLevel(logging.WARNING)
    console = Console(width=220)
    x1, x256 = torch.zeros(1, 40), torch.randn(256, 40, generator=torch.Generator().manual_seed(0))
    rows: dict[str, dict[str, float]] = {}
    models: dict[str, torch.nn.Module] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            t = time.perf_counter()
            res, model, cbs = fit(name, args.rounds, f"{tmp}/{name}")
            fp = measure_footprint(model, x1, repeats=10)
            models[name] = float_copy(model)
            evals = [h["test_acc"] for h in res.history if "test_acc" in h]
            row = {"acc": res.final_metrics["test_acc"], "acc_last3": sum(evals[-3:]) / len(evals[-3:]),
                   "params": fp["params"], "macs": fp["macs"], "bytes": fp["bytes"],
                   "uplink_MB": sum(h["bytes_up"] for h in res.history) / 1e6,
                   "last_round_bytes_up": res.history[-1]["bytes_up"], "wall_s": time.perf_counter() - t}
            for cb in cbs:
                if isinstance(cb, QuantizationAware):
                    row.update({f"qat_{k}": v for k, v in cb.report.items()})
                    models[f"{name}_int8"] = cb.exported
            if name == "baseline":  # post-training int4 export of the baseline (no QAT), for reference
                q = convert_qat(_prepared(model, "int4_weight"), "int4_weight", 32)
                row["ptq_int4_bytes"] = float(sum(v.numel() * v.element_size() for v in q.state_dict().values()))
            rows[name] = row
            console.print(f"{name}: {json.dumps({k: round(v, 5) for k, v in row.items()})}")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
        # latency: every final model measured in interleaved blocks, so that load changes hit all alike
        lat: dict[str, dict[str, list[float]]] = {m: {"1": [], "256": []} for m in models}
        for _ in range(args.blocks):
            for m, net in models.items():
                lat[m]["1"].append(cpu_latency_ms(net, x1, repeats=args.repeats))
                lat[m]["256"].append(cpu_latency_ms(net, x256, repeats=max(args.repeats // 5, 10)))
        for m, d in lat.items():
            run, suffix = (m[:-5], "int8_") if m.endswith("_int8") else (m, "")
            rows[run][f"{suffix}lat1_ms"] = statistics.median(d["1"])
            rows[run][f"{suffix}lat256_ms"] = statistics.median(d["256"])
        console.print({m: {k: round(v, 4) for k, v in r.items() if "lat" in k} for m, r in rows.items()})
        if args.optim8bit_rounds:
            cb = EightBitOptimizer(optimizer="adam8bit", lr=5e-3, min_8bit_size=256)
            res, _, _ = fit("optim8bit", args.optim8bit_rounds, f"{tmp}/optim8bit", callbacks=[cb])
            rows["optim8bit"] = {"acc": res.final_metrics["test_acc"],
                                 "optim_state_bytes": res.history[-1]["optim_state_bytes"],
                                 "optim_state_bytes_fp32": res.history[-1]["optim_state_bytes_fp32"]}
            console.print(f"optim8bit: {rows['optim8bit']}")
    base = rows.get("baseline")
    table = Table(title=f"Model compression, FedAvg MNIST-1D recipe, {args.rounds} rounds (2-core CPU)")
    for col in ("run", "test acc", "Δ acc (pt)", "acc last 3", "Δ last 3", "params", "MACs", "MAC red.", "float bytes", "lat b=1 ms",
                "lat b=256 ms", "speedup b=256", "int8 bytes", "weights red.", "int8 acc", "uplink MB"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        if name == "optim8bit":
            continue
        d = (r["acc"] - base["acc"]) * 100 if base else float("nan")
        table.add_row(
            name, f"{r['acc']:.4f}", f"{d:+.1f}", f"{r['acc_last3']:.4f}",
            f"{(r['acc_last3'] - base['acc_last3']) * 100:+.1f}" if base else "-", f"{r['params']:,.0f}", f"{r['macs']:,.0f}",
            f"{base['macs'] / r['macs']:.2f}x" if base else "-", f"{r['bytes']:,.0f}", f"{r['lat1_ms']:.3f}",
            f"{r['lat256_ms']:.3f}", f"{base['lat256_ms'] / r['lat256_ms']:.2f}x" if base else "-",
            f"{r['qat_quant_bytes']:,.0f}" if "qat_quant_bytes" in r else "-",
            f"{r['qat_float_weight_bytes'] / r['qat_quant_weight_bytes']:.2f}x" if "qat_quant_bytes" in r else "-",
            f"{r['qat_quant_acc']:.4f}" if "qat_quant_acc" in r else "-", f"{r['uplink_MB']:.2f}",
        )
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def _prepared(model: torch.nn.Module, scheme: str) -> torch.nn.Module:
    m = float_copy(model)
    prepare_qat(m, scheme, 32)
    return m


if __name__ == "__main__":
    main()
