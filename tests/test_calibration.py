"""CCVR (FedLoop(calibration=)): the clients' per-class feature statistics against direct computations, their
pooling against the statistics of the pooled records, the virtual features and the head's training, the settings
refused, and in a run: training unchanged, the calibrated metrics and model, resume and the docs example."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from _tiny_fit import quiet_loop, run_strategies_doc_example
from safetensors.torch import load_file
from torch import nn

from lightning_fed.calibration import CCVR, StatsPool, client_class_stats, fit_head, virtual_features
from lightning_fed.data import Dirichlet, MNIST1DDataModule
from lightning_fed.models import MNIST1DCNN
from lightning_fed.strategies import FedAvg, FedPer


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0] * 15 + [2] * 24 + [3], dtype=torch.int64)
    return x, y


def test_client_stats_are_the_per_class_count_mean_and_unbiased_covariance():
    x, y = _data()
    s = client_class_stats(x, y, num_classes=4)
    assert s.counts.tolist() == [15, 0, 24, 1]
    for c in (0, 2):
        assert torch.allclose(s.means[c], x[y == c].mean(0))
        assert torch.allclose(s.covs[c], torch.cov(x[y == c].T))  # torch.cov: unbiased (n - 1)
    assert torch.equal(s.means[1], torch.zeros(5)) and torch.equal(s.covs[1], torch.zeros(5, 5))
    assert torch.allclose(s.means[3], x[-1]) and torch.equal(s.covs[3], torch.zeros(5, 5))  # one record: no spread


def test_pooled_stats_equal_those_of_all_records():
    """The paper's Eq. 4-5 over three clients (one holds a single record of a class) equal the mean and the
    unbiased covariance of the concatenated records."""
    parts = [_data(s) for s in range(3)]
    parts[1] = (parts[1][0], torch.tensor([1] * 39 + [0]))
    pool = StatsPool(4, 5)
    for x, y in parts:
        pool.add(client_class_stats(x, y, 4))
    got = pool.result()
    x_all = torch.cat([p[0] for p in parts])
    y_all = torch.cat([p[1] for p in parts])
    assert got.counts.tolist() == torch.bincount(y_all, minlength=4).tolist()
    for c in range(4):
        xc = x_all[y_all == c]
        assert torch.allclose(got.means[c], xc.mean(0))
        assert torch.allclose(got.covs[c], torch.cov(xc.T), atol=1e-12)


def test_virtual_features_follow_each_class_gaussian_and_skip_classes_under_two_records():
    x, y = _data()
    s = client_class_stats(x, y, 4)
    vx, vy = virtual_features(s, 20000, 0.0, torch.Generator().manual_seed(0))
    assert vy.unique().tolist() == [0, 2]  # class 1 has no record, class 3 one
    assert vx.shape == (40000, 5) and vx.dtype == torch.float64
    for c in (0, 2):
        assert torch.allclose(vx[vy == c].mean(0), s.means[c], atol=0.05)
        assert torch.allclose(torch.cov(vx[vy == c].T), s.covs[c], atol=0.08)
    again = virtual_features(s, 20000, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(vx, again[0]) and torch.equal(vy, again[1])


def test_a_singular_covariance_is_sampled_with_a_larger_ridge():
    x = torch.randn(3, 6, dtype=torch.float64)  # 3 records, 6 features: rank 2
    s = client_class_stats(x, torch.zeros(3, dtype=torch.int64), 1)
    vx, _ = virtual_features(s, 10, 0.0, torch.Generator().manual_seed(0))
    assert torch.isfinite(vx).all()


def test_non_finite_features_are_refused_with_the_class_named():
    x, y = _data()
    x[3, 1] = float("nan")  # a record of class 0
    with pytest.raises(ValueError, match="the features of class 0 are not all finite"):
        virtual_features(client_class_stats(x, y, 4), 10, 1e-4, torch.Generator().manual_seed(0))


def test_fit_head_learns_separable_virtual_features_and_leaves_the_head_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, 3, generator=g) + 4, torch.randn(200, 3, generator=g) - 4])
    y = torch.tensor([0] * 200 + [1] * 200)
    head = nn.Linear(3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))  # every record wrong
        head.bias.zero_()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    state = fit_head(head, x, y, epochs=3, lr=0.05, momentum=0.9, batch_size=32, g=torch.Generator().manual_seed(1))
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    trained = nn.Linear(3, 2)
    trained.load_state_dict(state)
    assert (trained(x).argmax(1) == y).float().mean() == 1.0
    assert (head(x).argmax(1) == y).float().mean() == 0.0
    again = fit_head(head, x, y, epochs=3, lr=0.05, momentum=0.9, batch_size=32, g=torch.Generator().manual_seed(1))
    assert all(torch.equal(state[k], again[k]) for k in state)


@pytest.mark.parametrize(("kwargs", "key"), [({"lr": 0.0}, "lr"), ({"momentum": 1.0}, "momentum"),
                                              ({"per_class": 0}, "per_class"), ({"epochs": 1.5}, "epochs"),
                                              ({"ridge": -1.0}, "ridge"), ({"head": ""}, "head")])
def test_bad_settings_are_refused(kwargs, key):
    with pytest.raises(ValueError, match=f"CCVR: {key}="):
        CCVR(**kwargs)


def test_a_head_that_is_not_a_linear_layer_is_refused_with_the_linear_layers_named():
    with pytest.raises(ValueError, match=r"head='conv3' is not an nn.Linear of MNIST1DCNN; its nn.Linear modules: "
                                         r"\['head'\]"):
        CCVR(head="conv3").head_module(MNIST1DCNN(channels=4))
    with pytest.raises(ValueError, match="head='nope'"):
        CCVR(head="nope").head_module(MNIST1DCNN(channels=4))


def _fit(tmp_path, calibration, strategy=None, rounds=3, **kwargs):
    L.seed_everything(0)
    model = MNIST1DCNN(channels=4)
    result = quiet_loop(tmp_path, num_clients=4, clients_per_round=2, rounds=rounds, local_epochs=1,
                        partition=Dirichlet(alpha=0.1, min_samples=10), strategy=strategy or FedAvg(), seed=0,
                        test_every=1, calibration=calibration, **kwargs).fit(model, MNIST1DDataModule(num_samples=800))
    return model, result


def test_a_run_trains_as_without_calibration_and_logs_the_calibrated_model(tmp_path):
    plain_model, plain = _fit(tmp_path / "plain", None)
    model, result = _fit(tmp_path / "ccvr", CCVR(per_class=200, epochs=2))
    for k, v in plain_model.state_dict().items():  # training is unchanged, bit for bit
        assert torch.equal(v, model.state_dict()[k]), k
    assert [h["test_acc"] for h in plain.history] == [h["test_acc"] for h in result.history]
    last = result.history[-1]
    assert all("ccvr/test_acc" in h and "ccvr/test_loss" in h for h in result.history)
    assert last["ccvr/classes"] == 10.0
    d = model.head.in_features
    labels = MNIST1DDataModule(num_samples=800)
    labels.setup()
    shards = Dirichlet(alpha=0.1, min_samples=10).split_dataset(labels.train_set, labels.train_set.tensors[1], 4, 0)
    held = sum(len(torch.unique(labels.train_set.tensors[1][s])) for s in shards)  # (client, class) pairs
    assert last["ccvr/bytes_up"] == held * (1 + d + d * (d + 1) // 2) * 4
    # calibrated.safetensors: the final model with the calibrated head, which scores ccvr/test_acc
    final = load_file(str(result.run_dir / "final.safetensors"))
    cal = load_file(str(result.run_dir / "calibrated.safetensors"))
    assert cal.keys() == final.keys()
    assert all(torch.equal(cal[k], final[k]) for k in cal if not k.startswith("head."))
    assert not torch.equal(cal["head.weight"], final["head.weight"])
    check = MNIST1DCNN(channels=4)
    check.load_state_dict(cal)
    dm = MNIST1DDataModule(num_samples=800)
    dm.setup()
    x, y = dm.test_set.tensors
    with torch.no_grad():
        acc = (check.eval()(x).argmax(1) == y).float().mean().item()
    assert math.isclose(acc, last["ccvr/test_acc"], abs_tol=1e-6)
    assert model.head.weight.equal(final["head.weight"])  # the working model keeps the plain head


def test_calibration_is_the_same_after_a_resume(tmp_path):
    """A run stopped after round 1 and resumed to round 3 logs and writes the calibration of a 3-round run."""
    kw = {"checkpoint_every": 1, "keep_checkpoints": 5}
    _, whole = _fit(tmp_path / "whole", CCVR(per_class=100, epochs=1), **kw)
    _, part = _fit(tmp_path / "part", CCVR(per_class=100, epochs=1), rounds=1, **kw)
    L.seed_everything(0)
    resumed = quiet_loop(tmp_path / "part", num_clients=4, clients_per_round=2, rounds=3, local_epochs=1,
                         partition=Dirichlet(alpha=0.1, min_samples=10), strategy=FedAvg(), seed=0, test_every=1,
                         calibration=CCVR(per_class=100, epochs=1), **kw
                         ).fit(MNIST1DCNN(channels=4), MNIST1DDataModule(num_samples=800), resume=str(part.run_dir))
    assert [h["round"] for h in resumed.history] == [1, 2, 3]
    assert [h["ccvr/test_acc"] for h in resumed.history] == [h["ccvr/test_acc"] for h in whole.history]
    assert torch.equal(load_file(str(resumed.run_dir / "calibrated.safetensors"))["head.weight"],
                       load_file(str(whole.run_dir / "calibrated.safetensors"))["head.weight"])


def test_calibration_may_be_added_on_resume(tmp_path):
    """The calibration changes no training, so a run without it resumes with it (identity: may change)."""
    kw = {"checkpoint_every": 1, "keep_checkpoints": 5}
    _, whole = _fit(tmp_path / "whole", CCVR(per_class=100, epochs=1), **kw)
    _, part = _fit(tmp_path / "part", None, rounds=1, **kw)
    L.seed_everything(0)
    resumed = quiet_loop(tmp_path / "part", num_clients=4, clients_per_round=2, rounds=3, local_epochs=1,
                         partition=Dirichlet(alpha=0.1, min_samples=10), strategy=FedAvg(), seed=0, test_every=1,
                         calibration=CCVR(per_class=100, epochs=1), **kw
                         ).fit(MNIST1DCNN(channels=4), MNIST1DDataModule(num_samples=800), resume=str(part.run_dir))
    assert "ccvr/test_acc" not in resumed.history[0]
    assert [h["ccvr/test_acc"] for h in resumed.history[1:]] == [h["ccvr/test_acc"] for h in whole.history[1:]]


def test_a_strategy_without_a_global_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="calibration=.* None with FedPer, which keeps no global model"):
        _fit(tmp_path, CCVR(), strategy=FedPer(personal_layers=["head"]))


def test_a_calibration_of_another_kind_is_refused():
    from lightning_fed import FedLoop

    with pytest.raises(ValueError, match="FedLoop: calibration='ccvr' is not allowed; calibration must be a CCVR or None$"):
        FedLoop(num_clients=2, clients_per_round=1, calibration="ccvr")


def test_a_bad_head_name_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="head='classifier' is not an nn.Linear"):
        _fit(tmp_path, CCVR(head="classifier"))
    assert not list(tmp_path.rglob("*.safetensors"))


def test_the_recipe_parses_and_calibrates(tmp_path):
    from lightning_fed.cli import run

    res = run(["fit", "--config", "recipes/mnist1d/fedntd_ccvr.yaml", "--loop.rounds", "1", "--loop.local_epochs", "1",
               "--loop.num_clients", "4", "--loop.clients_per_round", "2", "--data.init_args.num_samples", "600",
               "--loop.calibration.init_args.per_class", "50", "--loop.verbose", "false", "--loop.plot", "false",
               "--loop.output_dir", str(tmp_path)])
    assert "ccvr/test_acc" in res.history[-1]
    assert json.loads((res.run_dir / "history.json").read_text())[-1]["ccvr/classes"] >= 2


def test_the_docs_example_runs(tmp_path):
    scope = run_strategies_doc_example("calibration=CCVR(", "runs/docs-ccvr", tmp_path)
    assert "ccvr/test_acc" in scope["result"].history[-1]
