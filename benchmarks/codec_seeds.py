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


def summary(runs: dict[str, dict[int, dict]], codecs: list[str] | None = None) -> list[dict]:
    """Per codec: the seeds it shares with identity, its differences, their mean and standard error."""
    ref = runs.get("identity", {})
    out = []
    for name in codecs or sorted(k for k in runs if k != "identity"):
        seeds = sorted(set(runs.get(name, {})) & set(ref))
        if not seeds:
            continue
        deltas = [100 * (runs[name][s]["acc"] - ref[s]["acc"]) for s in seeds]
        n = len(deltas)
        mean = sum(deltas) / n if n else float("nan")
        se = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (n - 1) / n) if n > 1 else float("nan")
        ratio = runs[name][seeds[0]]["ratio"]
        out.append({"codec": name, "seeds": seeds, "deltas": deltas, "mean": mean, "se": se, "ratio": ratio,
                    "within_1pt": sum(d >= -1.0 for d in deltas)})
    return out


def main() -> None:
    """Print the markdown summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", type=Path)
    p.add_argument("--codecs", nargs="+", default=None)
    args = p.parse_args()
    runs = load(args.directory)
    if "identity" not in runs:
        raise SystemExit(f"no identity_s<seed>.json in {args.directory}: the differences need the baseline")
    print("| codec | ratio vs float32 | seeds | Δ per seed (pt) | mean Δ (pt) | standard error | seeds within 1 pt |")
    print("|---|---|---|---|---|---|---|")
    for r in summary(runs, args.codecs):
        per = " ".join(f"{d:+.1f}" for d in r["deltas"])
        print(f"| {r['codec']} | {r['ratio']:.1f}x | {len(r['seeds'])} | {per} | {r['mean']:+.2f} | {r['se']:.2f} | "
              f"{r['within_1pt']} / {len(r['seeds'])} |")


if __name__ == "__main__":
    main()
