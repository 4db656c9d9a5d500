"""Secure aggregation (SecAgg+ against the original SecAgg and plain FedAvg): exactness and cost.

Two tables, each through the code a run uses (``SecAggFedAvg`` and its masked uplink, the protocol of
``lightning_fed.privacy.secagg``), on random updates of a linear model with ``--length`` float entries:

1. Exactness: the unmasked integer sum against the plain sum of the same fixed-point integers (must be equal),
   and the secure FedAvg step against plain FedAvg on the same updates (must be within the stated quantization
   bound ``2**-(frac_bits+1) * weight_cap * clients / total weight``), with 0 %, 10 % and 30 % of the clients
   dropping out after sharing their keys, for the sparse (SecAgg+) and the complete (SecAgg) graph.
2. Cost as the clients per round grow (10, 100, 1,000): bytes each client sends and receives over the four
   protocol rounds, and seconds per client (its key agreement, shares, masking, unmasking answer) and for the
   server (relaying, summing, reconstructing and removing the masks), against plain FedAvg (Identity codec: one
   float32 update up; server: the weighted mean). The SecAgg+ degree is the default one, which keeps unmasking
   possible with 30 % dropouts except with probability 1e-6 (``tolerant_degree``), next to the fixed rule
   ``2 * ceil(1.5 log2 n)``; the complete graph's is ``n - 1``. The complete graph at 1,000 clients is measured on ``--complete-sample``
   clients' client-side work only (Shamir-sharing with 999 neighbours costs about a second per client here);
   its server seconds are not measured (marked n/a).

Run from the repository root::

    python benchmarks/secagg.py                 # length 10,000 (1,000 for 1,000 clients)
    python benchmarks/secagg.py --quick         # smaller, a smoke check
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from lightning_fed.codecs import Identity
from lightning_fed.codecs.base import EncodeArgs
from lightning_fed.errors import AggregationRefused, ClientError
from lightning_fed.privacy import secagg as sa
from lightning_fed.protocol import Reply
from lightning_fed.strategies import FedAvg, SecAggFedAvg

FRAC, CAP, CLIP = 16, 100, 4.0
GRAPHS = (("sparse", None), ("sparse", 1.5), ("complete", None))
"""(graph, degree_factor): the default SecAgg+ degree, the fixed rule 2 * ceil(1.5 log2 n), the complete graph."""


def _name(graph: str, factor: float | None) -> str:
    if graph == "complete":
        return graph
    return "sparse (default, 30 % tolerance)" if factor is None else f"sparse (degree_factor={factor:g})"


def _model(length: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(length, 1, bias=False)


def _updates(n: int, length: int, seed: int = 0) -> tuple[dict[int, dict], dict[int, int]]:
    g = torch.Generator().manual_seed(seed)
    deltas = {c: {"weight": torch.randn(1, length, generator=g) * 0.05} for c in range(n)}
    counts = {c: int(torch.randint(10, CAP + 1, (1,), generator=g)) for c in range(n)}
    return deltas, counts


def secure_round(
    n: int, length: int, graph: str, dropout: float, factor: float | None = None
) -> dict[str, float]:
    """One SecAggFedAvg round by hand (setup, each client's masked encoding, aggregation), timed per side."""
    model = _model(length)
    deltas, counts = _updates(n, length)
    s = SecAggFedAvg(
        frac_bits=FRAC, weight_cap=CAP, clip=CLIP, graph=graph, dropout=dropout, degree_factor=factor
    )
    s.setup(model)
    before = s.global_flat.clone()
    uplink = s.client_callbacks()[0].wrap_uplink(Identity())
    t = time.perf_counter()
    instructions = s.configure_round(0, list(range(n)))
    setup_s = time.perf_counter() - t
    replies, encode_s = [], 0.0
    for ins in instructions:
        c = ins.client_id
        t = time.perf_counter()
        try:
            msg = uplink.encode(
                deltas[c], {}, EncodeArgs(client_id=c, num_examples=counts[c], config=ins.config)
            )
        except ClientError:
            continue
        encode_s += time.perf_counter() - t
        replies.append(Reply(c, uplink.decode(msg, {}), counts[c]))
    m = s.aggregate(0, replies)
    secure_step = s.global_flat - before
    plain = FedAvg()
    plain.setup(model)
    p0 = plain.global_flat.clone()
    plain.aggregate(0, [Reply(r.client_id, deltas[r.client_id], counts[r.client_id]) for r in replies])
    err = float((secure_step - (plain.global_flat - p0)).abs().max())
    total = sum(counts[r.client_id] for r in replies)
    return {
        **m,
        "setup_s": setup_s,
        "encode_s": encode_s,
        "survivors": len(replies),
        "err": err,
        "bound": 0.5 * 2.0**-FRAC * CAP * len(replies) / total,
    }


def integer_sum_exact(n: int, length: int, graph: str, dropout: float, factor: float | None = None) -> bool:
    """The protocol alone on random fixed-point integers: the unmasked sum equals the plain sum exactly."""
    clients = list(range(n))
    k = sa.degree_for(n, graph, factor)
    p = sa.Params(round=0, bits=32, length=length, threshold=sa.threshold_for(k, 0.5))
    server = sa.SecAggServer(p, sa.harary_graph(clients, k, 1))
    sec = {c: sa.ClientSecrets.derive(b"bench" * 7, 0, c) for c in clients}
    rosters = server.receive_adverts({c: sa.advertise(sec[c], 0, c) for c in clients})
    inboxes = server.route_shares({c: sa.share_keys(sec[c], p, c, rosters[c]) for c in clients})
    g = torch.Generator().manual_seed(2)
    xs = {c: torch.randint(-(2**20), 2**20, (length,), generator=g) for c in clients}
    drop = set(random.Random(3).sample(clients, round(dropout * n)))
    for c in clients:
        if c not in drop:
            server.receive_masked(c, sa.masked_input(sec[c], p, c, rosters[c], inboxes[c], xs[c]))
    req = server.unmask_requests()
    got = server.unmask(
        {c: sa.unmask_response(sec[c], p, c, rosters[c], inboxes[c], r) for c, r in req.items()}
    )
    return bool(torch.equal(got, sum(xs[c] for c in clients if c not in drop)))


def plain_cost(n: int, length: int) -> tuple[float, float, float]:
    """Plain FedAvg: bytes up per client (Identity message), client encode seconds, server aggregate seconds."""
    model = _model(length)
    deltas, counts = _updates(n, length)
    codec = Identity()
    t = time.perf_counter()
    msgs = [codec.encode(deltas[c], {}) for c in range(n)]
    enc = (time.perf_counter() - t) / n
    s = FedAvg()
    s.setup(model)
    t = time.perf_counter()
    s.aggregate(
        0,
        [
            Reply(
                c,
                codec.decode(
                    msgs[c],
                    {},
                ),
                counts[c],
            )
            for c in range(n)
        ],
    )
    return float(len(msgs[0])), enc, time.perf_counter() - t


def complete_client_sample(n: int, length: int, sample: int) -> tuple[float, float]:
    """Complete graph at ``n`` clients, client side only for ``sample`` clients: bytes and seconds per client."""
    clients = list(range(n))
    p = sa.Params(round=0, bits=32, length=length + 1, threshold=sa.threshold_for(n - 1, 0.5))
    server = sa.SecAggServer(p, sa.harary_graph(clients, n - 1, 0))
    sec = {c: sa.ClientSecrets.derive(b"bench" * 7, 0, c) for c in clients}
    rosters = server.receive_adverts({c: sa.advertise(sec[c], 0, c) for c in clients})
    x = torch.zeros(length + 1, dtype=torch.int64)
    total_b, total_s = 0.0, 0.0
    for c in clients[:sample]:
        t = time.perf_counter()
        out = sa.share_keys(sec[c], p, c, rosters[c])
        masked = sa.masked_input(sec[c], p, c, rosters[c], dict.fromkeys(out, b""), x)
        total_s += time.perf_counter() - t
        # up: advert, shares, masked input, one b-share answer per neighbour; down: roster, shares, request
        answer = 9 + (n - 1) * (5 + 66)
        request = 9 + 5 * (n - 1)
        total_b += (
            73
            + sum(map(len, out.values()))
            + len(masked)
            + answer
            + len(rosters[c])
            + sum(map(len, out.values()))
            + request
        )
    return total_b / sample, total_s / sample


def main() -> None:
    """Print the exactness table and the cost table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--length", type=int, default=10_000, help="update entries for 10 and 100 clients")
    ap.add_argument("--length-1000", type=int, default=1_000, help="update entries for 1,000 clients")
    ap.add_argument("--complete-sample", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    console = Console(width=150)
    torch.set_num_threads(1)
    exact_n = 30 if args.quick else 100
    exact_len = 500 if args.quick else 1_000
    table = Table(
        title=f"Secure aggregation exactness ({exact_n} clients, {exact_len} entries, 32-bit field, "
        f"{FRAC} fraction bits)"
    )
    for col in (
        "graph",
        "degree",
        "dropout",
        "survivors",
        "integer sum == plain",
        "max |secure - plain| step",
        "bound",
        "ok",
    ):
        table.add_column(col)
    for graph, factor in GRAPHS:
        for dropout in (0.0, 0.1, 0.3):
            name = _name(graph, factor)
            try:
                r = secure_round(exact_n, exact_len, graph, dropout, factor)
                same = integer_sum_exact(exact_n, exact_len, graph, dropout, factor)
            except AggregationRefused as err:
                table.add_row(
                    name,
                    str(sa.degree_for(exact_n, graph, factor)),
                    f"{dropout:.0%}",
                    "-",
                    "-",
                    "-",
                    "-",
                    f"refused: {str(err)[:60]}",
                )
                continue
            table.add_row(
                name,
                str(sa.degree_for(exact_n, graph, factor)),
                f"{dropout:.0%}",
                str(r["survivors"]),
                str(same),
                f"{r['err']:.2e}",
                f"{r['bound']:.2e}",
                "yes" if same and r["err"] <= r["bound"] else "NO",
            )
    console.print(table)

    sizes = (10, 100) if args.quick else (10, 100, 1000)
    cost = Table(
        title="Secure aggregation cost per round (bytes per client beyond the model download: plain = its "
        "update up; secure = up + down over the four protocol rounds)"
    )
    for col in ("clients", "entries", "method", "degree", "KB / client", "x plain", "client s", "server s"):
        cost.add_column(col, justify="right")
    for n in sizes:
        length = args.length_1000 if n >= 1000 else (2_000 if args.quick else args.length)
        up, enc, agg = plain_cost(n, length)
        cost.add_row(
            str(n), f"{length:,}", "FedAvg (plain)", "-", f"{up / 1e3:.1f}", "1.0", f"{enc:.5f}", f"{agg:.4f}"
        )
        for graph, factor in GRAPHS:
            k = sa.degree_for(n, graph, factor)
            if graph == "complete" and n >= 1000:
                per_b, per_s = complete_client_sample(n, length, args.complete_sample)
                cost.add_row(
                    str(n),
                    f"{length:,}",
                    "SecAgg (complete)",
                    str(k),
                    f"{per_b / 1e3:.1f}",
                    f"{per_b / up:.1f}",
                    f"{per_s:.4f}",
                    "n/a",
                )
                continue
            r = secure_round(n, length, graph, 0.0, factor)
            per_b = r["secagg_bytes_per_client"]
            per_s = r["secagg_client_s"] + r["encode_s"] / r["survivors"]
            name = "SecAgg+ " + _name(graph, factor) if graph == "sparse" else "SecAgg (complete)"
            cost.add_row(
                str(n),
                f"{length:,}",
                name,
                str(k),
                f"{per_b / 1e3:.1f}",
                f"{per_b / up:.1f}",
                f"{per_s:.4f}",
                f"{r['secagg_server_s']:.3f}",
            )
    console.print(cost)


if __name__ == "__main__":
    main()
