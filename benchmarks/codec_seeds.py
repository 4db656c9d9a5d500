"""Summarise multi-seed codec runs: per-seed accuracy, difference to identity, mean and standard error.

Single runs of the FedAvg MNIST-1D recipe move by about ±1.5 points between seeds, more than most codecs
cost, so the issue-3 target is judged on the mean difference over many seeds. Run ``codecs.py`` once per
codec and seed with ``--out DIR/<codec>_s<seed>.json`` (processes can run side by side), then::

    python benchmarks/codec_seeds.py DIR                 # every codec found, against identity on the same seeds
    python benchmarks/codec_seeds.py DIR --codecs topk32-sign32h-warm

Example (two processes at a time on a 2-core machine)::

    for s in $(seq 0 15); do for c in identity topk32-sign32h-warm; do echo "$c $s"; done; done | \\
      xargs -P 2 -L 1 sh -c 'OMP_NUM_THREADS=1 python benchmarks/codecs.py --rounds 100 --no-throughput \\
        --seed $1 --codecs $0 --out runs/codec-seeds/$0_s$1.json'
    python benchmarks/codec_seeds.py runs/codec-seeds
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path


def load(directory: Path) -> dict[str, dict[int, dict]]:
    """``{codec: {seed: row}}`` from the ``<codec>_s<seed>.json`` files of ``codecs.py --out``."""
    runs: dict[str, dict[int, dict]] = {}
    for f in sorted(directory.glob("*_s*.json")):
        m = re.fullmatch(r"(.+)_s(\d+)\.json", f.name)
        if not m:
            continue
        rows = json.loads(f.read_text())
        for row in rows:
            if row.get("name") == m.group(1):
                runs.setdefault(m.group(1), {})[int(m.group(2))] = row
    return runs


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (``nan`` where undefined)."""
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    se = math.sqrt(sum((d - mean) ** 2 for d in values) / (n - 1) / n) if n > 1 else float("nan")
    return mean, se


def parse_seeds(tokens: list[str] | None) -> set[int] | None:
    """``["0-15", "32-47", "50"]`` -> the set of those seeds; ``None`` = all."""
    if not tokens:
        return None
    out: set[int] = set()
    for t in tokens:
        lo, _, hi = t.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def summary(runs: dict[str, dict[int, dict]], codecs: list[str] | None = None,
            seeds: set[int] | None = None) -> list[dict]:
    """Per codec: the seeds it shares with identity (within ``seeds``), its differences, their mean and standard
    error, and the range of its compression ratios."""
    ref = runs.get("identity", {})
    out = []
    for name in codecs or sorted(k for k in runs if k != "identity"):
        common = sorted(set(runs.get(name, {})) & set(ref) & (seeds if seeds is not None else set(ref)))
        if not common:
            continue
        deltas = [100 * (runs[name][s]["acc"] - ref[s]["acc"]) for s in common]
        mean, se = mean_se(deltas)
        ratios = [runs[name][s]["ratio"] for s in common]
        out.append({"codec": name, "seeds": common, "deltas": deltas, "mean": mean, "se": se,
                    "ratio": (min(ratios), max(ratios)), "within_1pt": sum(d >= -1.0 for d in deltas)})
    return out


def paired(runs: dict[str, dict[int, dict]], a: str, b: str, seeds: set[int] | None = None) -> dict:
    """Accuracy of ``a`` minus ``b`` (points) on the seeds both ran: per seed, mean and standard error."""
    common = sorted(set(runs.get(a, {})) & set(runs.get(b, {})) & (seeds if seeds is not None else set(runs[a])))
    diffs = [100 * (runs[a][s]["acc"] - runs[b][s]["acc"]) for s in common]
    mean, se = mean_se(diffs)
    return {"seeds": common, "diffs": diffs, "mean": mean, "se": se}


def main() -> None:
    """Print the markdown summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", type=Path)
    p.add_argument("--codecs", nargs="+", default=None)
    p.add_argument("--seeds", nargs="+", default=None, help="only these seeds: 0-15 32-47 50 …")
    p.add_argument("--versus", default=None, help="also print each codec's paired difference to this codec")
    args = p.parse_args()
    runs = load(args.directory)
    seeds = parse_seeds(args.seeds)
    if "identity" not in runs:
        raise SystemExit(f"no identity_s<seed>.json in {args.directory}: the differences need the baseline")
    print("| codec | ratio vs float32 | seeds | Δ per seed (pt) | mean Δ (pt) | standard error | seeds within 1 pt |")
    print("|---|---|---|---|---|---|---|")
    rows = summary(runs, args.codecs, seeds)
    for r in rows:
        per = " ".join(f"{d:+.1f}" for d in r["deltas"])
        lo, hi = r["ratio"]
        ratio = f"{lo:.1f}x" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}-{hi:.1f}x"
        print(f"| {r['codec']} | {ratio} | {len(r['seeds'])} | {per} | {r['mean']:+.2f} | {r['se']:.2f} | "
              f"{r['within_1pt']} / {len(r['seeds'])} |")
    if args.versus:
        print()
        for r in rows:
            if r["codec"] == args.versus:
                continue
            d = paired(runs, r["codec"], args.versus, seeds)
            if d["seeds"]:
                print(f"{r['codec']} minus {args.versus}, paired on {len(d['seeds'])} seeds: {d['mean']:+.2f} points "
                      f"(standard error {d['se']:.2f})")


if __name__ == "__main__":
    main()
