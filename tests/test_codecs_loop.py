"""Codecs inside FedLoop: real byte accounting, downlink compression, state through checkpoints, CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import seeded

from lightning_fed.cli import build_parser
from lightning_fed.codecs import QSGD, Blockwise8bit, Cast, EncodeArgs, TopK
from lightning_fed.errors import RoundsFailed
from lightning_fed.models import MNIST1DCNN
from lightning_fed.weights import float_state


class Recording(TopK):
    """TopK that records the length of every message it produces."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.lengths: list[int] = []

    def encode(self, payload, state, args=EncodeArgs()):
        msg = super().encode(payload, state, args)
        self.lengths.append(len(msg))
        return msg


def _weights(model):
    return torch.cat([v.flatten() for v in float_state(model).values()])


def test_bytes_counted_are_the_message_lengths(make_loop, small_dm):
    codec = Recording(0.02, values=QSGD(7, norm="max"))
    model = seeded(MNIST1DCNN)
    raw = sum(v.numel() * 4 for v in float_state(model).values())
    loop = make_loop(rounds=2, codec=codec, downlink_codec=Cast("fp16"))
    res = loop.fit(model, small_dm)
    assert sum(h["bytes_up"] for h in res.history) == sum(codec.lengths)
    for h in res.history:
        assert h["raw_bytes_up"] == 2 * raw and h["rejected"] == 0
        assert h["compression_ratio"] == h["raw_bytes_up"] / h["bytes_up"] > 100
        assert h["raw_bytes_down"] == 2 * raw
        assert abs(h["compression_ratio_down"] - 2.0) < 0.01  # fp16 downlink, 8-byte frame header
        assert h["encode_s"] > 0 and h["decode_s"] > 0
    stored = torch.load(next((res.run_dir / "clients").glob("client-*.pt")), weights_only=True)
    assert stored["codec"]["residual"].numel() == raw // 4  # error feedback lives in the client store


def test_oversized_messages_are_rejected(make_loop, small_dm):
    loop = make_loop(rounds=1, codec=Blockwise8bit(), max_message_bytes=1000)
    with pytest.raises(RoundsFailed, match="exceeds the limit of 1000"):
        loop.fit(seeded(MNIST1DCNN), small_dm)
    assert loop.history[0]["rejected"] == 2 and loop.history[0]["skipped"] == 1


def test_codec_state_resumes_identically(make_loop, small_dm, tmp_path):
    def codec():
        return TopK(0.05, values=QSGD(3, norm="max"), momentum=0.5, warmup_rounds=3)

    ref = seeded(MNIST1DCNN)
    make_loop(rounds=4, codec=codec(), output_dir=str(tmp_path / "ref")).fit(ref, small_dm)
    a = seeded(MNIST1DCNN)
    res = make_loop(rounds=2, codec=codec(), checkpoint_every=2, output_dir=str(tmp_path / "a")).fit(
        a, small_dm
    )
    b = seeded(MNIST1DCNN)
    make_loop(rounds=4, codec=codec(), checkpoint_every=2, output_dir=str(tmp_path / "a")).fit(
        b, small_dm, resume=res.run_dir
    )
    assert torch.equal(_weights(ref), _weights(b))


def test_cli_picks_codecs_by_short_name():
    parser = build_parser()
    args = [
        "fit",
        "--config",
        "recipes/mnist1d/fedavg.yaml",
        "--loop.codec",
        "TopK",
        "--loop.codec.ratio",
        "0.02",
        "--loop.codec.values",
        "QSGD",
        "--loop.codec.values.levels",
        "3",
        "--loop.downlink_codec",
        "Cast",
        "--loop.downlink_codec.dtype",
        "bf16",
    ]
    init = parser.instantiate_classes(parser.parse_args(args))["fit"]
    assert isinstance(init.loop.codec, TopK) and init.loop.codec.ratio == 0.02
    assert isinstance(init.loop.codec.values, QSGD) and init.loop.codec.values.levels == 3
    assert isinstance(init.loop.downlink_codec, Cast) and init.loop.downlink_codec.dtype == "bf16"
    full = [
        "fit",
        "--config",
        "recipes/mnist1d/fedavg.yaml",
        "--loop.codec",
        "lightning_fed.codecs.Blockwise4bit",
        "--loop.codec.quant_type",
        "fp4",
    ]
    init = parser.instantiate_classes(parser.parse_args(full))["fit"]
    assert init.loop.codec.quant_type == "fp4"


def test_summary_reports_run_ratios_and_codec_seconds():
    from rich.console import Console

    from lightning_fed.report import summary_table

    history = [
        {
            "round": 1,
            "bytes_up": 100,
            "raw_bytes_up": 10_000,
            "bytes_down": 50,
            "raw_bytes_down": 100,
            "encode_s": 0.5,
            "decode_s": 0.25,
        },
        {
            "round": 2,
            "bytes_up": 300,
            "raw_bytes_up": 10_000,
            "bytes_down": 50,
            "raw_bytes_down": 100,
            "encode_s": 0.5,
            "decode_s": 0.25,
        },
    ]
    console = Console(record=True, width=120)
    console.print(summary_table(history))
    text = console.export_text()
    assert (
        "uplink compression ratio" in text and "50.0x" in text
    )  # 20,000 / 400, not the mean of 100x and 33x
    assert "downlink compression ratio" in text and "2.0x" in text
    assert "1.00 s / 0.50 s" in text
