"""Teacher-assistant chains: FedDF routes knowledge in the named order, invalid chains are refused, assistants'
weights are checkpointed."""

from __future__ import annotations

import itertools

import pytest
import torch
from _distill_common import cnn, tiny_public

from lightning_fed.protocol import Reply
from lightning_fed.seeding import Stream, generator
from lightning_fed.strategies import FedDF, ModelTiers
from lightning_fed.strategies.tiers import predict_logits
from lightning_fed.weights import load_into


def _tiers() -> ModelTiers:
    return ModelTiers(models=[cnn(16), cnn(32)], names=["small", "medium", "large"])


def _replies(s: FedDF, tiers: ModelTiers, n: int = 6) -> list[Reply]:
    torch.manual_seed(1)
    return [
        Reply(c, {k: 0.3 * torch.randn_like(v) for k, v in s.avg[tiers.tier_of(c)].payload().items()}, 10)
        for c in range(n)
    ]


@pytest.mark.parametrize(
    ("chain", "assistants"),
    [
        (["large", "medium", "small"], None),
        (["large", "mid", "small"], {"mid": cnn(8)}),
        (["big", "large", "small"], {"big": cnn(48)}),
    ],
)
def test_chain_passes_knowledge_in_the_named_order(chain, assistants):
    """Every distillation's teacher is recorded: the chain's head learns from the ensemble (the mean client
    logits), and every later member learns from the logits of its predecessor as that one left its distillation."""
    tiers = _tiers()
    s = FedDF(
        public=tiny_public(80),
        tiers=tiers,
        proxy_size=80,
        distill_steps=5,
        distill_lr=1e-2,
        assistant_chain=chain,
        assistants=assistants,
    )
    s.setup(cnn(4))
    calls: list[
        tuple[torch.nn.Module, torch.Tensor, torch.Tensor]
    ] = []  # (student, teacher logits, its output)
    distill = s._distill

    def spy(module, x, teacher, g):
        loss = distill(module, x, teacher, g)
        calls.append((module, teacher.clone(), predict_logits(module, x)))
        return loss

    s._distill = spy
    replies = _replies(s, tiers)
    ensemble = torch.zeros(80, 10)
    x = s.public.x[s.public.sample_indices(80, generator(0, Stream.FEDDF_PROXY, 3))]
    for r in replies:
        t = tiers.tier_of(r.client_id)
        m = tiers.module(t, s._default)
        base = s.avg[t].payload()
        load_into(m, {k: base[k] + r.payload[k] for k in base})
        ensemble += predict_logits(m, x)
    ensemble /= len(replies)
    s.aggregate(3, replies)

    outside = [n for n in tiers.names if n not in chain]
    assert s.last_routes == [("ensemble", n) for n in tiers.names if n not in chain[1:]] + (
        [("ensemble", chain[0])] if chain[0] not in tiers.names else []
    ) + list(itertools.pairwise(chain))
    assert len(calls) == len(outside) + len(chain)
    by_student = {}
    for (teacher, student), (module, logits, out) in zip(s.last_routes, calls):
        if teacher == "ensemble":
            assert torch.allclose(logits, ensemble, atol=1e-5), f"{student} did not learn from the ensemble"
        else:
            assert torch.equal(logits, by_student[teacher]), f"{student} did not learn from {teacher}"
            assert not torch.allclose(logits, ensemble, atol=1e-3)
        by_student[student] = out
    # the distilled weights were kept: the small tier's global model is what its distillation produced
    small = tiers.module(0, s._default)
    load_into(small, s.avg[0].payload())
    assert torch.equal(predict_logits(small, x), by_student["small"])


def test_tiers_outside_the_chain_learn_from_the_ensemble_as_without_a_chain():
    out = []
    for chain in (None, ["large", "small"]):
        torch.manual_seed(0)  # the same initial weights for both
        tiers = _tiers()
        s = FedDF(public=tiny_public(80), tiers=tiers, proxy_size=80, distill_steps=3, assistant_chain=chain)
        s.setup(cnn(4))
        s.aggregate(1, _replies(s, tiers))
        out.append([a.flat.clone() for a in s.avg])
    assert torch.equal(out[0][1], out[1][1])  # medium: not in the chain
    assert torch.equal(out[0][2], out[1][2])  # large: the chain's head, taught by the ensemble
    assert not torch.equal(out[0][0], out[1][0])  # small: taught by large instead of the ensemble


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"assistant_chain": ["large", "medium", "large"]},
            r"assistant_chain=.*'large' appears twice \(a loop\)",
        ),
        ({"assistant_chain": ["large", "tiny"]}, r"assistant_chain=.*'tiny' is not a tier or assistant"),
        (
            {"assistant_chain": ["medium", "large"]},
            r"assistant_chain=.*'medium' \(\d+ parameters\) cannot teach 'large'",
        ),
        (
            {"assistant_chain": ["large", "mid", "medium"], "assistants": {"mid": cnn(12)}},
            r"assistant_chain=.*'mid' \(\d+ parameters\) cannot teach 'medium'",
        ),
        (
            {"assistant_chain": ["large"]},
            r"assistant_chain=\['large'\] is not allowed; a chain names at least two",
        ),
        (
            {"assistant_chain": ["large", "small"], "assistants": {"mid": cnn(8)}},
            r"assistants=\{'mid'.*assistant_chain",
        ),
        ({"assistants": {"mid": cnn(8)}}, r"assistants=\['mid'\] is not allowed without assistant_chain"),
        (
            {"assistant_chain": ["large", "medium", "small"], "assistants": {"medium": cnn(8)}},
            r"assistants=\{'medium'.*differ from the tier names",
        ),
        ({"assistant_chain": ["large", "small"], "distill_steps": 0}, r"assistant_chain=.*distill_steps=0"),
    ],
)
def test_invalid_chains_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FedDF(public=tiny_public(), tiers=_tiers(), **kwargs)


def test_tier0_larger_than_its_teacher_is_refused_at_setup():
    s = FedDF(public=tiny_public(), tiers=_tiers(), assistant_chain=["medium", "small"])
    with pytest.raises(
        ValueError, match=r"assistant_chain=.*'medium' \(\d+ parameters\) cannot teach 'small'"
    ):
        s.setup(cnn(24))  # tier 0, the loop's model, is known only here


def test_tier_names_are_checked():
    with pytest.raises(ValueError, match=r"ModelTiers: names=\['a'\] is not allowed; give 2 distinct names"):
        ModelTiers(models=[cnn(8)], names=["a"])
    with pytest.raises(ValueError, match=r"names=\['a', 'a'\]"):
        ModelTiers(models=[cnn(8)], names=["a", "a"])
    assert ModelTiers(models=[cnn(8)]).names == ["tier0", "tier1"]


def test_assistant_weights_are_checkpointed():
    tiers = _tiers()
    mk = lambda: FedDF(
        public=tiny_public(80),
        tiers=tiers,
        proxy_size=80,
        distill_steps=3,
        assistant_chain=["large", "mid", "small"],
        assistants={"mid": cnn(8)},
    )
    a, b = mk(), mk()
    default = cnn(4)
    a.setup(default)
    a.aggregate(1, _replies(a, tiers))
    state = a.state_dict()
    b.setup(default)
    assert not torch.equal(b.assistant_avg["mid"].flat, state["assistants"]["mid"])  # a's assistant learned
    b.load_state_dict(state)
    assert torch.equal(b.assistant_avg["mid"].flat, a.assistant_avg["mid"].flat)
    c = FedDF(public=tiny_public(80), tiers=tiers, proxy_size=80, distill_steps=3)
    c.setup(default)
    with pytest.raises(ValueError, match=r"assistants \['mid'\] do not match assistants \[\]"):
        c.load_state_dict(state)
