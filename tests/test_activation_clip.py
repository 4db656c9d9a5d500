"""Activation clipping: hand-computed bounds and clamps on a constructed model, eval mode only, a deployed copy,
FedLoop metrics and a resumed run that clips exactly as the uninterrupted one, nothing under lightning.Trainer,
bad settings named."""

from __future__ import annotations

import warnings

import pytest
import torch
from _defence_common import mnist_clean, run_and_resume_models, trainer_fit
from safetensors.torch import load_file
from torch import nn

from lightning_fed.callbacks import ActivationClip
from lightning_fed.callbacks.activation_clip import (
    BOUNDS_FILE,
    ClipHook,
    clip_bounds,
    install_clips,
    remove_clips,
)
from lightning_fed.callbacks.backdoor import apply_trigger
from lightning_fed.data import PublicData
from lightning_fed.models import MNIST1DCNN

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def summing_model() -> nn.Sequential:
    """``0``: the identity on 2 inputs, ReLU, ``2``: the sum of both (one logit)."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
        model[2].weight.fill_(1.0)
        model[2].bias.zero_()
    return model


def clean_of(x: list[list[float]]) -> PublicData:
    return PublicData.from_tensors(torch.tensor(x), torch.zeros(len(x), dtype=torch.long))


def test_bounds_by_hand():
    out = torch.tensor(
        [[[1.0, 5.0], [0.0, -1.0]], [[3.0, 2.0], [4.0, -2.0]], [[2.0, 0.0], [1.0, -3.0]]]
    )  # [3, 2, 2]
    assert torch.equal(clip_bounds(out, 1.0, True), torch.tensor([[3.0, 5.0], [4.0, -1.0]]))
    assert torch.equal(clip_bounds(out, 1.0, False), torch.tensor([[5.0], [4.0]]))
    # the median over 3 records per position; over 6 values per channel (linear interpolation: (2 + 2) / 2, (0 - 1) / 2)
    assert torch.equal(clip_bounds(out, 0.5, True), torch.tensor([[2.0, 2.0], [1.0, -2.0]]))
    assert torch.equal(clip_bounds(out, 0.5, False), torch.tensor([[2.0], [-0.5]]))


def test_a_constructed_model_is_clipped_by_hand():
    # clean outputs of layer 0 reach (2, 2): its bounds; layer 2 then sees at most 2 + 2 = 4 on clean records
    clip = ActivationClip(clean=clean_of([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]]), layers=["0", "2"], holdout=0)
    model = summing_model()
    model.train()
    record = clip.defend(None, model, 0)
    assert torch.equal(clip.bounds["0"], torch.tensor([2.0, 2.0]))
    assert torch.equal(clip.bounds["2"], torch.tensor([4.0]))
    assert record["acc_before"] == record["acc_after"] == 1.0 and model.training
    x = torch.tensor([[5.0, -1.0], [10.0, 10.0], [1.0, 0.5]])
    assert torch.equal(model(x), torch.tensor([[5.0], [20.0], [1.5]]))  # train mode: untouched
    model.eval()
    # (5, -1) -> (2, -1) -> relu (2, 0) -> 2; (10, 10) -> (2, 2) -> 4; (1, 0.5) is within the bounds
    assert torch.equal(model(x), torch.tensor([[2.0], [4.0], [1.5]]))
    assert torch.equal(model[0].weight, torch.eye(2))  # the weights are not changed
    other = summing_model().eval()
    clip.install(other)
    assert torch.equal(other(x), model(x))
    remove_clips(other)
    assert torch.equal(other(x), torch.tensor([[5.0], [20.0], [1.5]]))


def test_a_second_step_replaces_the_first_bounds():
    clip = ActivationClip(clean=clean_of([[1.0, 1.0], [0.0, 3.0]]), layers=["0"], quantile=1.0, holdout=0)
    model = summing_model()
    clip.defend(None, model, 0)
    clip.defend(None, model, 1)  # measured without the first step's clamps: the same bounds, installed once
    assert torch.equal(clip.bounds["0"], torch.tensor([1.0, 3.0]))
    assert sum(isinstance(h, ClipHook) for h in model[0]._forward_hooks.values()) == 1


def test_in_fedloop_logs_and_a_resumed_run_clips_identically(tmp_path):
    def cb():
        return ActivationClip(clean=mnist_clean(), layers=["conv1", "conv2", "conv3"], at=[1], quantile=0.99)

    res, first, again, full, resumed = run_and_resume_models(tmp_path, cb)
    assert {"clip_acc_before", "clip_acc_after"} <= res.history[
        1
    ].keys() and "clip_acc_after" not in res.history[0]
    assert again.done == [1] and set(again.bounds) == {"conv1", "conv2", "conv3"}
    for k, v in first.bounds.items():
        assert torch.equal(again.bounds[k], v), k
    x = apply_trigger(mnist_clean().x[:50])
    full.eval()
    resumed.eval()
    assert torch.equal(full(x), resumed(x))  # the resumed model carries the clips
    remove_clips(resumed)
    assert not torch.equal(full(x), resumed(x))  # and they change its outputs
    # the run folder holds what a deployment needs: the final weights and the bounds
    deployed = MNIST1DCNN().eval()
    deployed.load_state_dict(load_file(res.run_dir / "final.safetensors"))
    install_clips(deployed, load_file(res.run_dir / BOUNDS_FILE))
    assert torch.equal(deployed(x), full(x))


def test_does_nothing_under_lightning_trainer(tmp_path):
    cb = ActivationClip(clean=mnist_clean(), layers=["conv1"], at=0)
    model = trainer_fit(tmp_path, [cb])
    assert cb.done == [] and cb.bounds == {} and not model.conv1._forward_hooks


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"layers": []}, r"layers=\[\] .* non-empty list"),
        ({"layers": "conv1"}, r"layers='conv1' is not allowed; layers must be a list of strings"),
        ({"layers": ["conv1", "conv1"]}, r"layers=.* without repeated names"),
        ({"quantile": 0}, r"quantile=0 .* in \(0, 1\]"),
        ({"quantile": 1.5}, r"quantile=1\.5 .* in \(0, 1\]"),
        ({"per_position": 1}, r"per_position=1 .* True or False"),
        ({"holdout": 1.0}, r"holdout=1\.0"),
        ({"clean": PublicData(num_samples=10)}, r"clean=.* labelled PublicData"),
    ],
)
def test_invalid_settings_name_the_key(kw, match):
    kw = {"clean": mnist_clean(), "layers": ["conv1"], **kw}
    with pytest.raises(ValueError, match=match):
        ActivationClip(**kw)


def test_an_unknown_layer_is_named_against_the_model():
    clip = ActivationClip(clean=mnist_clean(), layers=["conv1", "conv9"])
    with pytest.raises(ValueError, match=r"layers=\['conv1', 'conv9'\] .*\['conv9'\] are not.*'conv3'"):
        clip.install(MNIST1DCNN())
