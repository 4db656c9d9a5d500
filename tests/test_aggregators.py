"""Aggregation plug points: aggregators, server optimizers, and the strategies that average weights."""

import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import seeded
from jsonargparse import ArgumentParser
from torch import Tensor, nn

from lightning_fed.cli import build_parser, run
from lightning_fed.models import MNIST1DFFN
from lightning_fed.moe import convert_to_moe
from lightning_fed.protocol import Instruction, Reply
from lightning_fed.strategies import (
    Aggregator,
    FedAvg,
    FedDF,
    FedGen,
    FedMoE,
    ServerOptimizer,
    ServerSGD,
    Strategy,
    WeightedMean,
)
from lightning_fed.strategies.aggregate import apply_update_, example_weights, weighted_sum_
from lightning_fed.strategies.fedmoe import SHARE_PREFIX
from lightning_fed.strategies.tiers import TierAverage, tier_optimizers

RECIPE = Path(__file__).parents[1] / "recipes" / "mnist1d" / "fedavg.yaml"


class CoordinateMedian(Aggregator):
    """Unweighted coordinate-wise median; needs every vector at once. Counts its calls."""

    streaming = False

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, out: Tensor, flats, weights) -> Tensor:
        assert isinstance(flats, list)
        self.calls += 1
        return out.copy_(torch.stack(flats).median(dim=0).values)


class PlainMean(Aggregator):
    """A streaming weighted mean that is not a WeightedMean (takes the generic per-group path of FedMoE)."""

    def __call__(self, out: Tensor, flats, weights) -> Tensor:
        out.zero_()
        for f, w in zip(flats, weights, strict=True):
            out.add_(f, alpha=w)
        return out


class Momentum(ServerOptimizer):
    """Heavy-ball server step with state, to test checkpoints."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.5) -> None:
        self.lr, self.momentum = lr, momentum
        self.buf: Tensor | None = None

    def setup(self, global_flat: Tensor) -> None:
        self.buf = torch.zeros_like(global_flat)

    def step(self, global_flat: Tensor, update: Tensor) -> None:
        assert self.buf is not None
        global_flat.add_(self.buf.mul_(self.momentum).add_(update), alpha=self.lr)

    def state_dict(self) -> dict:
        assert self.buf is not None
        return {"buf": self.buf.clone()}

    def load_state_dict(self, state: dict) -> None:
        assert self.buf is not None
        self.buf.copy_(state["buf"])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def _replies(strategy: FedAvg, nums: list[int], seed: int) -> list[Reply]:
    g = torch.Generator().manual_seed(seed)
    spec = strategy.reply_spec(Instruction(0, {}))
    return [Reply(c, {k: torch.randn(s.shape, generator=g) for k, s in spec.items()}, n) for c, n in enumerate(nums)]


# ---------------------------------------------------------------------------------------------- the math
def test_weighted_mean_by_hand_streams_one_reused_buffer():
    vectors = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([5.0, 6.0])]
    scratch = torch.empty(2)

    def stream():
        for v in vectors:
            yield scratch.copy_(v)  # the same buffer every time, as FedAvg streams decoded replies

    out = torch.full((2,), float("nan"))
    res = WeightedMean()(out, stream(), [0.5, 0.25, 0.25])
    assert res is out
    assert torch.equal(out, torch.tensor([2.5, 3.5]))  # 0.5*1 + 0.25*3 + 0.25*5, 0.5*2 + 0.25*4 + 0.25*6
    assert WeightedMean.streaming and not CoordinateMedian.streaming
    with pytest.raises(ValueError, match="got 2 buffers for 3 weights"):
        WeightedMean()(out, vectors[:2], [0.5, 0.25, 0.25])


def test_server_sgd_step_by_hand():
    flat = torch.tensor([1.0, 2.0])
    ServerSGD(lr=0.5).step(flat, torch.tensor([2.0, -4.0]))
    assert torch.equal(flat, torch.tensor([2.0, 0.0]))
    opt = ServerSGD()
    assert opt.lr == 1.0 and opt.state_dict() == {}


def test_tier_average_default_matches_the_old_formula_bitwise():
    model = _model()
    avg, ref = TierAverage(model), TierAverage(model)
    g = torch.Generator().manual_seed(3)
    deltas = [{k: torch.randn(v.shape, generator=g) for k, v in avg.payload().items()} for _ in range(3)]
    avg.average(deltas, [7, 3, 11])
    update = weighted_sum_(ref._acc, (ref.spec.as_flat(d, out=ref._tmp) for d in deltas), example_weights([7, 3, 11]))
    ref.flat.add_(update)
    assert torch.equal(avg.flat, ref.flat)


def test_tier_optimizers_are_independent_copies():
    proto = Momentum()
    opts = tier_optimizers(proto, 2)
    assert len(opts) == 2 and opts[0] is not opts[1] and proto not in opts
    assert tier_optimizers(None, 3) == [None, None, None]


# ---------------------------------------------------------------------------------------------- FedAvg
@pytest.mark.parametrize("lr", [1.0, 0.5])
def test_explicit_plug_points_are_bit_identical_to_defaults(lr):
    default = FedAvg(server_lr=lr)
    explicit = FedAvg(aggregator=WeightedMean(), server_optimizer=ServerSGD(lr=lr))
    ref = FedAvg(server_lr=lr)
    for s in (default, explicit, ref):
        s.setup(_model())
    for r in range(3):
        replies = _replies(default, [30, 10, 17], seed=r)
        default.aggregate(r, replies)
        explicit.aggregate(r, replies)
        # the pre-plug-point FedAvg, spelled out: same operations in the same order
        assert ref.global_flat is not None and ref._acc is not None and ref._tmp is not None
        update = weighted_sum_(ref._acc, (ref.spec.as_flat(x.payload, out=ref._tmp) for x in replies),
                               example_weights([x.num_examples for x in replies]))
        apply_update_(ref.global_flat, update, lr)
    assert torch.equal(default.global_flat, explicit.global_flat)
    assert torch.equal(default.global_flat, ref.global_flat)


def test_fedavg_calls_a_custom_aggregator_with_every_vector():
    median = CoordinateMedian()
    s = FedAvg(aggregator=median)
    s.setup(_model())
    g0 = s.global_flat.clone()
    spec = s.reply_spec(Instruction(0, {}))
    replies = [Reply(c, {k: torch.full(v.shape, d) for k, v in spec.items()}, n)
               for c, (d, n) in enumerate([(1.0, 1), (2.0, 1), (100.0, 1000)])]
    metrics = s.aggregate(0, replies)
    assert median.calls == 1
    assert torch.equal(s.global_flat, g0 + 2.0)  # the median ignores the outlier and its weight
    assert metrics["update_norm"] == pytest.approx(2.0 * g0.numel() ** 0.5)


def test_server_optimizer_state_roundtrips_through_a_checkpoint(tmp_path):
    def make():
        s = FedAvg(server_optimizer=Momentum(lr=0.5, momentum=0.9))
        s.setup(_model())
        return s

    a = make()
    for r in range(2):
        a.aggregate(r, _replies(a, [5, 9], seed=r))
    torch.save(a.state_dict(), tmp_path / "state.pt")
    b = make()
    b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))  # as lightning_fed.checkpoint loads
    assert torch.equal(b.server_optimizer.buf, a.server_optimizer.buf)
    assert torch.count_nonzero(b.server_optimizer.buf) > 0
    nxt = _replies(a, [4, 4], seed=9)
    a.aggregate(2, nxt)
    b.aggregate(2, nxt)
    assert torch.equal(a.global_flat, b.global_flat)  # resumed == never interrupted


def test_model_change_sets_the_server_optimizer_up_again():
    s = FedAvg(server_optimizer=Momentum())
    s.setup(_model())
    s.model_changed(nn.Linear(4, 1))
    assert s.server_optimizer.buf.numel() == s.global_flat.numel() == 5


# ---------------------------------------------------------------------------------------------- FedMoE
def _moe() -> MNIST1DFFN:
    model = seeded(MNIST1DFFN, channels=4, width=8, hidden=8)
    convert_to_moe(model, ["ffn"], num_experts=3, capacity_factor=None)
    return model


def _moe_replies(s: FedMoE) -> list[Reply]:
    shares = {0: [0.6, 0.4, 0.0], 1: [0.1, 0.2, 0.7], 2: [0.5, 0.0, 0.5]}
    drops = {0: {2}, 1: set(), 2: {1}}
    out = []
    for c, n in ((0, 10), (1, 30), (2, 20)):
        g = torch.Generator().manual_seed(c)
        payload = {}
        for key, spec in s.reply_spec(Instruction(c, {})).items():
            if key.startswith(SHARE_PREFIX):
                payload[key] = torch.tensor(shares[c])
            elif not (s.group_of(key)[0] == "expert" and s.group_of(key)[2] in drops[c]):
                payload[key] = torch.randn(spec.shape, generator=g)
        out.append(Reply(c, payload, n))
    return out


def test_fedmoe_generic_path_matches_its_one_pass_mean():
    model = _moe()
    fused, generic = FedMoE(), FedMoE(aggregator=PlainMean())
    fused.setup(model)
    generic.setup(model)
    replies = _moe_replies(fused)
    m1, m2 = fused.aggregate(0, replies), generic.aggregate(0, replies)
    assert torch.allclose(fused.global_flat, generic.global_flat, atol=1e-6)
    assert m1["moe_experts_sent"] == m2["moe_experts_sent"] and m1["moe_experts_updated"] == m2["moe_experts_updated"]


def test_fedmoe_calls_a_custom_aggregator_per_group_over_its_senders():
    median = CoordinateMedian()
    s = FedMoE(aggregator=median)
    s.setup(_moe())
    before = {k: v.clone() for k, v in s.global_payload().items()}
    replies = _moe_replies(s)
    s.aggregate(0, replies)
    assert median.calls >= len(s.groups)
    for key, old in before.items():
        senders = [r.payload[key] for r in replies if key in r.payload]
        ref = torch.stack(senders).median(dim=0).values  # expert 2 only from clients 1, 2; expert 1 from 0, 1
        assert torch.allclose(s.global_payload()[key] - old, ref, atol=1e-6), key


def test_fedmoe_server_optimizer_state_is_checkpointed():
    s = FedMoE(server_optimizer=Momentum())
    s.setup(_moe())
    s.aggregate(0, _moe_replies(s))
    assert torch.equal(s.state_dict()["server_optimizer"]["buf"], s.server_optimizer.buf)


# ---------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("cls", [FedAvg, FedMoE, FedDF, FedGen])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"aggregator": "median"}, r"aggregator='median' is not allowed; aggregator must be an Aggregator or None$"),
        ({"aggregator": ServerSGD()}, r"aggregator=ServerSGD\(lr=1.0\) is not allowed"),
        ({"server_optimizer": WeightedMean()}, r"server_optimizer=WeightedMean\(\) is not allowed"),
    ],
)
def test_bad_plug_points_name_the_key(cls, kwargs, message):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {message}"):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [FedAvg, FedMoE])
def test_server_lr_and_server_optimizer_together_is_an_error(cls):
    with pytest.raises(ValueError, match=r"server_lr=0.5 together with server_optimizer=ServerSGD\(lr=0.5\)"):
        cls(server_lr=0.5, server_optimizer=ServerSGD(lr=0.5))
    cls(server_lr=1.0, server_optimizer=ServerSGD(lr=0.5))  # the default server_lr is no conflict


@pytest.mark.parametrize("lr", [0, -1.0, float("nan"), True])
def test_bad_learning_rates(lr):
    with pytest.raises(ValueError, match=rf"ServerSGD: lr={lr!r} is not allowed; lr must be a number( > 0)?$"):
        ServerSGD(lr=lr)
    with pytest.raises(ValueError, match=rf"FedAvg: server_lr={lr!r} is not allowed; server_lr must be (> 0|a number)$"):
        FedAvg(server_lr=lr)


STRATEGY_YAML = """
strategy:
  class_path: lightning_fed.strategies.FedAvg
  init_args:
    aggregator:
      class_path: lightning_fed.strategies.WeightedMean
    server_optimizer:
      class_path: lightning_fed.strategies.ServerSGD
      init_args:
        lr: 0.5
"""


def test_jsonargparse_parses_plug_points_by_class_path():
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    cfg = parser.parse_string(STRATEGY_YAML)
    s = parser.instantiate_classes(cfg).strategy
    assert isinstance(s, FedAvg) and isinstance(s.aggregator, WeightedMean)
    assert isinstance(s.server_optimizer, ServerSGD) and s.server_optimizer.lr == 0.5

    direct = ArgumentParser()
    direct.add_class_arguments(FedMoE, "strategy")
    cfg = direct.parse_args(["--strategy.aggregator", "lightning_fed.strategies.WeightedMean",
                             "--strategy.server_optimizer", "lightning_fed.strategies.ServerSGD",
                             "--strategy.server_optimizer.lr", "0.25"])
    moe = direct.instantiate_classes(cfg).strategy
    assert isinstance(moe.aggregator, WeightedMean) and moe.server_optimizer.lr == 0.25


def _recipe_with_strategy(tmp_path: Path, strategy: dict) -> str:
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["loop"]["strategy"] = strategy
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_recipe_with_plug_points_parses_and_bad_ones_fail_before_training(tmp_path, capsys):
    good = {"class_path": "lightning_fed.strategies.FedAvg",
            "init_args": {"aggregator": {"class_path": "lightning_fed.strategies.WeightedMean"},
                          "server_optimizer": {"class_path": "lightning_fed.strategies.ServerSGD",
                                               "init_args": {"lr": 0.5}}}}
    parser = build_parser()
    cfg = parser.parse_args(["fit", "--config", _recipe_with_strategy(tmp_path, good)])
    strategy = parser.instantiate_classes(cfg)["fit"]["loop"].strategy
    assert isinstance(strategy.server_optimizer, ServerSGD) and strategy.server_optimizer.lr == 0.5

    bad = {"class_path": "lightning_fed.strategies.FedAvg",
           "init_args": {"server_lr": 0.5, "server_optimizer": {"class_path": "lightning_fed.strategies.ServerSGD"}}}
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        run(["fit", "--config", _recipe_with_strategy(tmp_path, bad), "--loop.output_dir", str(out)])
    assert e.value.code == 2
    assert "server_lr=0.5 together with server_optimizer" in capsys.readouterr().err
    assert not out.exists()  # nothing written


# ---------------------------------------------------------------------------------------------- docs
DOC = (Path(__file__).parents[1] / "docs" / "strategies.md").read_text()


def test_doc_python_example_runs(tmp_path):
    code = re.findall(r"```python\n(.*?)```", DOC, flags=re.DOTALL)[0]
    code = code.replace('output_dir="runs/median-momentum"', f'output_dir="{tmp_path}"')
    scope: dict = {}
    exec(compile(code, "docs/strategies.md", "exec"), scope)  # noqa: S102 (the repository's own doc)
    assert 0 <= scope["result"].final_metrics["test_acc"] <= 1
    assert scope["strategy"].server_optimizer.buf.abs().sum() > 0


def test_doc_yaml_example_builds(tmp_path):
    block = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", DOC, flags=re.DOTALL)[0])
    parser = build_parser()
    cfg = parser.parse_args(["fit", "--config", _recipe_with_strategy(tmp_path, block["loop"]["strategy"])])
    strategy = parser.instantiate_classes(cfg)["fit"]["loop"].strategy
    assert isinstance(strategy.aggregator, WeightedMean) and strategy.server_optimizer.lr == 1.0
