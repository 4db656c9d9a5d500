"""Client profiles: each client's compute speed, uplink and downlink bandwidth and dropout probability.

A profile is what the simulated clock (:mod:`lightning_fed.systems.clock`) needs to turn a client's round into
simulated seconds. Profiles come from a named preset, drawn per client with a seeded log-normal spread around
each device class's median, or from a CSV a user supplies (``client_id, flops_per_s, up_bps, down_bps, dropout``).

The presets' medians are approximations of published measurements, not measurements of ours (sources and
reasoning in docs/systems.md):

* compute: effective FP32 training throughput of a phone CPU is a small fraction of its peak; AI-Benchmark
  (Ignatov et al., ICCVW 2019) and MLPerf Mobile results put low-end and flagship SoCs more than an order of
  magnitude apart, and FedScale (Lai et al., ICML 2022) builds its device traces from AI-Benchmark for that reason;
* network: Ookla's Speedtest Global Index (2024) puts the global median mobile connection near 50 Mbit/s down and
  10 Mbit/s up and fixed broadband near 90 / 40 Mbit/s, with the low end of mobile (3G, weak LTE) at a few Mbit/s;
* dropout: Bonawitz et al. (MLSys 2019, "Towards Federated Learning at Scale") report 6-10 % of selected phones
  dropping out of a round.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_fed.seeding import Stream, generator
from lightning_fed.validation import CheckedArguments, need

OWNER = "ClientProfiles"
CSV_COLUMNS = ("client_id", "flops_per_s", "up_bps", "down_bps", "dropout")


@dataclass(frozen=True)
class DeviceClass:
    """The median device of a class and how much its members spread.

    Attributes:
        name: the class's name (written in the clock's CSV).
        flops_per_s: median effective training throughput (FLOP/s).
        up_bps: median uplink bandwidth (bit/s).
        down_bps: median downlink bandwidth (bit/s).
        dropout: probability that a sampled client of this class drops out of a round.
        spread: standard deviation of the log-normal spread of speeds and bandwidths around the medians.
    """

    name: str
    flops_per_s: float
    up_bps: float
    down_bps: float
    dropout: float
    spread: float = 0.3


LOW_END = DeviceClass("low_end", flops_per_s=1.5e9, up_bps=2e6, down_bps=8e6, dropout=0.10)
MID_RANGE = DeviceClass("mid_range", flops_per_s=6e9, up_bps=8e6, down_bps=30e6, dropout=0.06)
FLAGSHIP = DeviceClass("flagship", flops_per_s=20e9, up_bps=15e6, down_bps=80e6, dropout=0.03)
EDGE_BOX = DeviceClass("edge_box", flops_per_s=100e9, up_bps=40e6, down_bps=90e6, dropout=0.01)

PRESETS: dict[str, list[tuple[DeviceClass, float]]] = {
    "low_end": [(LOW_END, 1.0)],
    "mid_range": [(MID_RANGE, 1.0)],
    "flagship": [(FLAGSHIP, 1.0)],
    "edge_box": [(EDGE_BOX, 1.0)],
    # a fleet: the slowest class computes ~65x and uploads ~20x slower than the fastest
    "heterogeneous": [(LOW_END, 0.3), (MID_RANGE, 0.4), (FLAGSHIP, 0.2), (EDGE_BOX, 0.1)],
}
"""Named presets: device classes and the fraction of clients in each."""


@dataclass(frozen=True)
class Profile:
    """One client's device and network.

    Attributes:
        client_id: the client.
        flops_per_s: effective training throughput (FLOP/s).
        up_bps: uplink bandwidth (bit/s).
        down_bps: downlink bandwidth (bit/s).
        dropout: probability of dropping out of a round the client was sampled for, in [0, 1).
        device: the device class's name (a CSV's optional ``device`` column, else ``"csv"``).
    """

    client_id: int
    flops_per_s: float
    up_bps: float
    down_bps: float
    dropout: float
    device: str = "csv"


def _check(where: str, key: str, value: float, dropout: bool = False) -> None:
    if dropout:
        need(OWNER, math.isfinite(value) and 0 <= value < 1, f"{where}{key}", value, "in [0, 1)")
    else:
        need(OWNER, math.isfinite(value) and value > 0, f"{where}{key}", value, "a finite number > 0")


def read_profiles_csv(path: str | Path) -> list[Profile]:
    """Read and validate a profile CSV with the header ``client_id,flops_per_s,up_bps,down_bps,dropout``.

    Raises:
        ValueError: the file or a column is missing, a value is not a number, a speed is not > 0, a dropout is
            outside [0, 1), or a client id repeats; the message names the row and the key.
    """
    p = Path(path)
    need(OWNER, p.is_file(), "csv", str(path), "an existing CSV file")
    with p.open(newline="") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        header = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in CSV_COLUMNS if c not in header]
        need(
            OWNER, not missing, "csv", str(path), f"a CSV with the columns {CSV_COLUMNS} (missing: {missing})"
        )
        out: dict[int, Profile] = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            where = f"csv row {line}: "
            try:
                cid = int(row["client_id"])
            except ValueError:
                cid = None
            need(
                OWNER, cid is not None and cid >= 0, f"{where}client_id", row["client_id"], "an integer >= 0"
            )
            need(OWNER, cid not in out, f"{where}client_id", cid, "unique (it appears in an earlier row)")
            values = {}
            for key in CSV_COLUMNS[1:]:
                try:
                    values[key] = float(row[key])
                except ValueError:
                    need(OWNER, False, f"{where}{key}", row[key], "a number")
                _check(where, key, values[key], dropout=key == "dropout")
            out[cid] = Profile(cid, **values, device=row.get("device") or "csv")
    need(OWNER, bool(out), "csv", str(path), "a CSV with at least one client row")
    return [out[c] for c in sorted(out)]


class ClientProfiles(CheckedArguments):
    """Every client's compute speed, bandwidths and dropout probability, from a preset or a CSV.

    Example::

        profiles = ClientProfiles(preset="heterogeneous").resolve(num_clients=20, seed=0)
        profiles[3].flops_per_s, profiles[3].up_bps

    Args:
        preset: one of :data:`PRESETS` (``"low_end"``, ``"mid_range"``, ``"flagship"``, ``"edge_box"``,
            ``"heterogeneous"``); each client draws its class (by the preset's fractions, seeded) and its speeds
            around the class's medians. Ignored when ``csv`` is given.
        csv: a CSV file with one row per client: ``client_id, flops_per_s, up_bps, down_bps, dropout``.
        dropout_scale: multiplies every client's dropout probability (``0`` turns dropouts off).
    """

    def __init__(
        self, *, preset: str = "heterogeneous", csv: str | None = None, dropout_scale: float = 1.0
    ) -> None:
        need(OWNER, preset in PRESETS, "preset", preset, f"one of {tuple(PRESETS)}")
        need(
            OWNER, math.isfinite(dropout_scale) and dropout_scale >= 0, "dropout_scale", dropout_scale, ">= 0"
        )
        self.preset = preset
        self.csv = csv
        self.dropout_scale = dropout_scale
        self._rows = read_profiles_csv(csv) if csv is not None else None  # a bad file fails at construction

    def resolve(self, num_clients: int, seed: int) -> list[Profile]:
        """The profiles of clients ``0 .. num_clients - 1`` (the same for the same seed).

        Raises:
            ValueError: the CSV lacks a client or names one ``>= num_clients``; a scaled dropout reaches 1.
        """
        if self._rows is not None:
            ids = [p.client_id for p in self._rows]
            absent = sorted(set(range(num_clients)) - set(ids))
            extra = [c for c in ids if c >= num_clients]
            need(
                OWNER,
                not absent,
                "csv",
                self.csv,
                f"a row for every client 0..{num_clients - 1} (missing client_id "
                f"{absent[:10]}{'...' if len(absent) > 10 else ''})",
            )
            need(
                OWNER,
                not extra,
                "csv",
                self.csv,
                f"client ids below num_clients={num_clients} (found {extra[:10]})",
            )
            rows = list(self._rows)
        else:
            rows = self._draw(num_clients, seed)
        out = []
        for p in rows:
            dropout = p.dropout * self.dropout_scale
            need(
                OWNER,
                dropout < 1,
                "dropout_scale",
                self.dropout_scale,
                f"small enough that client {p.client_id}'s dropout {p.dropout} stays below 1",
            )
            out.append(Profile(p.client_id, p.flops_per_s, p.up_bps, p.down_bps, dropout, p.device))
        return out

    def _draw(self, num_clients: int, seed: int) -> list[Profile]:
        classes = PRESETS[self.preset]
        g = generator(seed, Stream.SYSTEMS_PROFILES, num_clients)
        weights = torch.tensor([w for _, w in classes], dtype=torch.float64)
        # class counts by largest remainder (the fractions hold exactly up to rounding), then a seeded shuffle
        exact = weights / weights.sum() * num_clients
        counts = exact.floor().long()
        for i in torch.argsort(-(exact - counts), stable=True)[: num_clients - int(counts.sum())].tolist():
            counts[i] += 1
        kinds = torch.repeat_interleave(torch.arange(len(classes)), counts)[
            torch.randperm(num_clients, generator=g)
        ]
        noise = torch.randn(num_clients, 3, generator=g, dtype=torch.float64)
        out = []
        for cid in range(num_clients):
            dc = classes[int(kinds[cid])][0]
            f, u, d = (math.exp(dc.spread * float(z)) for z in noise[cid])
            out.append(Profile(cid, dc.flops_per_s * f, dc.up_bps * u, dc.down_bps * d, dc.dropout, dc.name))
        return out


def write_profiles_csv(profiles: list[Profile], path: str | Path) -> None:
    """Write ``profiles`` as a CSV that :class:`ClientProfiles` reads back (``csv=``), with a ``device`` column."""
    lines = [",".join((*CSV_COLUMNS, "device"))]
    lines += [
        f"{p.client_id},{p.flops_per_s!r},{p.up_bps!r},{p.down_bps!r},{p.dropout!r},{p.device}"
        for p in profiles
    ]
    Path(path).write_text("\n".join(lines) + "\n")


__all__ = ["PRESETS", "ClientProfiles", "DeviceClass", "Profile", "read_profiles_csv", "write_profiles_csv"]
