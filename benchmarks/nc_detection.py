"""Per-model table of trigger unlearning's cells (``benchmarks/robustness.py --defences nc --json FILE``): what the
inversion flagged and unlearnt on each saved model, against the attack's true target (class 0, known to the
benchmark only), next to the model's clean accuracy and attack success before and after.

Run from the repository root::

    python benchmarks/nc_detection.py runs/nc9/nc20.json runs/nc9/mid20.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import robustness as rb


def trigger_name(row: dict[str, Any]) -> str:
    """The trigger of a cell as ``start/pattern`` (``end/alternating``: the benchmark's default)."""
    start, pattern = row.get("trigger", list(rb.DEFAULT_TRIGGER))[:2]
    return f"{'end' if start is None else start}/{pattern}"


def rows_of(paths: list[Path]) -> list[list[str]]:
    """One line per trigger-unlearning cell of the JSON files ``paths``, with its undefended cell's numbers."""
    out = []
    for path in paths:
        cells = json.loads(path.read_text())
        for r in cells:
            if r["defence"] != "nc":
                continue
            (base,) = [
                b
                for b in cells
                if b["defence"] == "none" and (b["attack"], b["seed"]) == (r["attack"], r["seed"])
            ]
            det = r["nc"]
            norms = det["norms"]
            others = min(n for c, n in enumerate(norms) if c != rb.TARGET)
            out.append(
                [
                    trigger_name(r),
                    r["attack"],
                    str(r["seed"]),
                    f"{100 * (base['acc'] - r['acc']):.1f}",
                    f"{100 * base['asr']:.1f} -> {100 * r['asr']:.1f}",
                    f"{r['defence_lr']:g}",
                    str(det["flagged_classes"]),
                    str(det["unlearned_classes"]),
                    "; ".join(f"{c}: {p}" for c, p in det["positions"].items()),
                    f"{norms[rb.TARGET]:.2f} / {others:.2f}",
                    f"{det['max_anomaly']:.2f}",
                ]
            )
    return out


def main(argv: list[str] | None = None) -> None:
    """Print the per-model table as Markdown."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", type=Path, nargs="+", help="robustness.py --json outputs with nc cells")
    args = p.parse_args(argv)
    header = [
        "trigger",
        "attack",
        "seed",
        "clean lost (points)",
        "attack success % (none -> nc)",
        "lr",
        "flagged",
        "unlearnt",
        "unlearnt mask > 0.5 at",
        "mask L1: class 0 / smallest other",
        "max anomaly index",
    ]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for line in rows_of(args.json):
        print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    main()
