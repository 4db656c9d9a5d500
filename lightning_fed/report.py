"""End-of-run outputs: the partition table, the summary table and the accuracy plot."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

WALL_CLOCK = ("seconds", "encode_s", "decode_s", "agg_s", "latency_ms", "busy_s", "wait_s", "fg_s", "loss_s", "rep_s",
              "secagg_server_s", "secagg_client_s")
"""Endings of the round metrics (``history.json``) that are measured wall-clock time; simulated times
(``sim_time_s``, ``arrive_s``, ...) are results."""


def without_wall_clock(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """The round metrics less the measured wall-clock times (:data:`WALL_CLOCK`): what two runs that must agree
    bit for bit (one process and several, a resumed run and an uninterrupted one) are compared on."""
    return [{k: v for k, v in row.items() if not k.endswith(WALL_CLOCK)} for row in history]


def partition_table(rows: list[tuple[int, int, list[int] | None]], max_rows: int = 30) -> Table:
    """A rich table of client id, sample count and label histogram (first ``max_rows`` clients); the histogram
    reads "n/a" where it is ``None`` (the dataset's labels are not known)."""
    table = Table(title=f"client partition ({len(rows)} clients)", show_lines=False)
    table.add_column("client", justify="right")
    table.add_column("samples", justify="right")
    table.add_column("label histogram")
    for cid, n, hist in rows[:max_rows]:
        table.add_row(str(cid), str(n), "n/a" if hist is None else " ".join(f"{h:>4d}" for h in hist))
    if len(rows) > max_rows:
        sizes = [n for _, n, _ in rows]
        table.add_row("…", f"min {min(sizes)} / max {max(sizes)}", f"{len(rows) - max_rows} more clients")
    return table


def write_partition_csv(rows: list[tuple[int, int, list[int] | None]], path: Path) -> None:
    """The full partition summary as CSV: client, samples, label_0..label_{C-1}; without label histograms
    (labels not known): client, samples, labels with "n/a"."""
    if rows and rows[0][2] is None:
        lines = ["client,samples,labels"] + [f"{cid},{n},n/a" for cid, n, _ in rows]
    else:
        num_classes = len(rows[0][2] or []) if rows else 0
        lines = ["client,samples," + ",".join(f"label_{c}" for c in range(num_classes))]
        lines += [f"{cid},{n}," + ",".join(map(str, hist or [])) for cid, n, hist in rows]
    Path(path).write_text("\n".join(lines) + "\n")


def summary_table(history: list[dict[str, float]]) -> Table:
    """Final summary: rounds, final test accuracy (``test_acc``), last and best validation accuracy (``val_acc``),
    the other final ``test_*`` and last ``val_*`` metrics the module's own steps logged (a regression model's
    ``test_mse``…), bytes and time (and the simulated time, with a clock). A row whose metric the run never logged
    reads ``n/a``."""
    table = Table(title="federated training summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    tests = [(h["round"], h["test_acc"]) for h in history if "test_acc" in h]
    vals = [(h["round"], h["val_acc"]) for h in history if "val_acc" in h]
    best = max(vals, key=lambda a: a[1]) if vals else None
    up = sum(h.get("bytes_up", 0) for h in history)
    down = sum(h.get("bytes_down", 0) for h in history)
    rows = [
        ("rounds", f"{len(history)}"),
        ("final test accuracy", f"{tests[-1][1]:.2%} (round {int(tests[-1][0])})" if tests else "n/a"),
        ("final validation accuracy", f"{vals[-1][1]:.2%}" if vals else "n/a"),
        ("best validation accuracy", f"{best[1]:.2%} (round {int(best[0])})" if best else "n/a"),
        ("uplink", f"{up / 1e6:.3f} MB"),
        ("downlink", f"{down / 1e6:.3f} MB"),
        ("rejected / failed replies", f"{sum(h.get('rejected', 0) for h in history):.0f} / {sum(h.get('failed', 0) for h in history):.0f}"),
        ("skipped rounds", f"{sum(h.get('skipped', 0) for h in history):.0f}"),
        ("wall time", f"{sum(h.get('seconds', 0) for h in history):.1f} s"),
    ]
    rows[4:4] = _module_rows(history)
    rows[len(rows) - 4:len(rows) - 4] = _compression_rows(history)
    if history and "sim_time_s" in history[-1]:  # a simulated clock ran (docs/systems.md)
        rows.append(("simulated time", f"{history[-1]['sim_time_s']:.4g} s"))
    for k, v in rows:
        table.add_row(k, v)
    return table


def _module_rows(history: list[dict[str, float]]) -> list[tuple[str, str]]:
    """The final ``test_*`` and the last ``val_*`` values of every other metric the evaluation reported."""
    rows = []
    for stage, label in (("test", "final test"), ("val", "final validation")):
        last = next((h for h in reversed(history) if f"{stage}_acc" in h or any(k.startswith(f"{stage}_") for k in h)),
                    None)
        for k in sorted(last or {}):
            if k.startswith(f"{stage}_") and k != f"{stage}_acc":
                rows.append((f"{label} {k[len(stage) + 1:]}", f"{last[k]:.4g}"))
    return rows


def _compression_rows(history: list[dict[str, float]]) -> list[tuple[str, str]]:
    """Compression ratios over the whole run (total raw bytes / total message bytes) and codec seconds."""
    rows = []
    for key, raw_key, label in (("bytes_up", "raw_bytes_up", "uplink"), ("bytes_down", "raw_bytes_down", "downlink")):
        sent = sum(h.get(key, 0) for h in history)
        raw = sum(h.get(raw_key, 0) for h in history)
        if sent and raw:
            rows.append((f"{label} compression ratio", f"{raw / sent:.1f}x"))
        elif label == "uplink":  # histories written before raw byte counts were logged
            ratio = [h["compression_ratio"] for h in history if "compression_ratio" in h]
            if ratio:
                rows.append(("uplink compression ratio", f"{sum(ratio) / len(ratio):.1f}x"))
    enc, dec = sum(h.get("encode_s", 0) for h in history), sum(h.get("decode_s", 0) for h in history)
    if enc or dec:
        rows.append(("encode / decode time", f"{enc:.2f} s / {dec:.2f} s"))
    return rows


def write_history(history: list[dict[str, float]], path: Path) -> None:
    """Per-round metrics as JSON."""
    Path(path).write_text(json.dumps(history, indent=1))


def plot_history(history: list[dict[str, float]], path: Path, title: str = "") -> Path | None:
    """PNG of accuracy against rounds, against cumulative uplink+downlink megabytes and, when a simulated clock ran
    (``sim_time_s`` in the history), against simulated seconds: validation accuracy (``val_acc``) as a line, test
    accuracy (``test_acc``: the final test, and every ``test_every`` rounds) as markers."""
    series = [(name, [(h["round"], h[key]) for h in history if key in h])
              for name, key in (("validation", "val_acc"), ("test", "test_acc"))]
    series = [(name, pts) for name, pts in series if pts]
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cum, mb = 0.0, {}
    for h in history:
        cum += (h.get("bytes_up", 0) + h.get("bytes_down", 0)) / 1e6
        mb[h["round"]] = cum
    sim = {h["round"]: h["sim_time_s"] for h in history if "sim_time_s" in h}
    fig, axes = plt.subplots(1, 3 if sim else 2, figsize=(15 if sim else 10, 3.6))
    a, b = axes[0], axes[1]
    for name, pts in series:
        rounds, acc = zip(*pts)
        style = {"marker": "."} if name == "validation" else {"marker": "*", "markersize": 10, "linestyle": ":"}
        a.plot(rounds, [100 * x for x in acc], label=name, **style)
        b.plot([mb[r] for r in rounds], [100 * x for x in acc], label=name, **style)
        if sim:
            axes[2].plot([sim.get(r, float("nan")) for r in rounds], [100 * x for x in acc], label=name, **style)
    if sim:
        axes[2].set_xlabel("simulated time (s)")
        axes[2].grid(alpha=0.3)
    a.set_xlabel("round")
    a.set_ylabel("accuracy (%)")
    a.grid(alpha=0.3)
    a.legend()
    b.set_xlabel("cumulative communication (MB, up + down)")
    b.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
