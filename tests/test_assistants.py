"""Teacher-assistant chains: FedDF routes knowledge in the named order, invalid chains are refused, assistants'
weights are checkpointed."""

from __future__ import annotations

import copy
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


# ---------------------------------------------------------------- the callback: teacher -> assistants -> student


def _dm():
    from _distill_common import tiny_dm

    return tiny_dm()


def _fit(cb, student, batches: int, dm=None) -> None:
    """One epoch of a quiet CPU Lightning Trainer with ``cb``."""
    import lightning as L

    L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=batches,
        limit_val_batches=0,
        callbacks=[cb],
    ).fit(student, dm if dm is not None else _dm())


def test_callback_trains_the_chain_in_order_then_distils_the_last_assistant():
    from lightning_fed.callbacks import AssistantDistillation

    torch.manual_seed(0)
    teacher, a0, a1, student = cnn(32), cnn(16), cnn(8), cnn(4)
    cb = AssistantDistillation(teacher=teacher, assistants=[a0, a1], assistant_epochs=1, assistant_lr=1e-2)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (a0, a1)]
    taught: list[tuple[torch.nn.Module, torch.nn.Module]] = []
    train = cb._train_assistant

    def spy(assistant, t, loader):
        taught.append((t, assistant))
        train(assistant, t, loader)

    cb._train_assistant = spy
    _fit(cb, student, 3)
    assert [(t is teacher, a is a0) for t, a in taught[:1]] == [(True, True)]
    assert taught[1][0] is a0 and taught[1][1] is a1  # the first assistant, trained, teaches the second
    assert cb.teacher is a1  # the student learns from the last assistant
    assert cb.routes == [
        ("teacher", "assistants[0]"),
        ("assistants[0]", "assistants[1]"),
        ("assistants[1]", "student"),
    ]
    for m, b in zip((a0, a1), before, strict=True):
        assert any(not torch.equal(v, b[k]) for k, v in m.state_dict().items())  # each assistant was trained


def test_callback_assistant_moves_toward_its_teacher():
    """One epoch of pure distillation (alpha=0) brings the assistant's predictions closer to the teacher's."""
    from lightning_fed.callbacks import AssistantDistillation
    from lightning_fed.callbacks.kd_losses import kd_loss

    torch.manual_seed(0)
    teacher, a0 = cnn(32), cnn(16)
    dm = _dm()
    dm.setup("fit")
    x = dm.train_dataloader().dataset.tensors[0][:200]
    gap = lambda: float(kd_loss(predict_logits(a0, x), predict_logits(teacher, x), 4.0))
    start = gap()
    cb = AssistantDistillation(
        teacher=teacher, assistants=[a0], assistant_epochs=3, assistant_lr=1e-2, alpha=0.0
    )
    _fit(cb, cnn(4), 1, dm)
    assert gap() < 0.5 * start


def test_callback_state_restores_trained_assistants_without_training_again():
    from lightning_fed.callbacks import AssistantDistillation

    torch.manual_seed(0)
    a = AssistantDistillation(teacher=cnn(32), assistants=[cnn(16)])
    _fit(a, cnn(4), 2)
    state = a.state_dict()
    torch.manual_seed(1)
    b = AssistantDistillation(teacher=cnn(32), assistants=[cnn(16)])
    b.load_state_dict(state)
    b._train_assistant = lambda *args: pytest.fail("a restored, trained assistant was trained again")
    _fit(b, cnn(4), 2)
    for k, v in a.assistants[0].state_dict().items():
        assert torch.equal(v, b.assistants[0].state_dict()[k])
    assert b.teacher is b.assistants[0]
    with pytest.raises(ValueError, match="checkpoint has 1 assistants, this callback 2"):
        AssistantDistillation(teacher=cnn(32), assistants=[cnn(16), cnn(8)]).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"assistants": []}, r"assistants=\[\] is not allowed"),
        ({"assistants": [cnn(48)]}, r"teacher \(\d+ parameters\) cannot teach assistants\[0\]"),
        (
            {"assistants": [cnn(8), cnn(16)]},
            r"assistants\[0\] \(\d+ parameters\) cannot teach assistants\[1\]",
        ),
        ({"assistants": [cnn(16)], "assistant_epochs": 0}, r"assistant_epochs=0 is not allowed; .* >= 1"),
        ({"assistants": [cnn(16)], "assistant_lr": 0.0}, r"assistant_lr=0.0 is not allowed"),
    ],
)
def test_callback_invalid_chains_are_refused_at_construction(kwargs, match):
    from lightning_fed.callbacks import AssistantDistillation

    with pytest.raises(ValueError, match=match):
        AssistantDistillation(teacher=cnn(32), **kwargs)


def test_callback_student_not_smaller_than_its_assistant_is_refused_at_setup():
    from lightning_fed.callbacks import AssistantDistillation

    cb = AssistantDistillation(teacher=cnn(32), assistants=[cnn(8)])
    with pytest.raises(ValueError, match=r"assistants\[0\] \(\d+ parameters\) cannot teach student"):
        _fit(cb, cnn(16), 1)


def test_callback_is_refused_inside_fedloop(tmp_path):
    from _distill_common import tiny_loop

    from lightning_fed.callbacks import AssistantDistillation
    from lightning_fed.strategies import FedAvg

    cb = AssistantDistillation(teacher=cnn(32), assistants=[cnn(16)])
    with pytest.raises(ValueError, match="AssistantDistillation is not allowed inside FedLoop"):
        tiny_loop(tmp_path, FedAvg(), rounds=1, callbacks=[cb]).fit(cnn(4), _dm())


def test_docs_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "distillation.md").read_text()
    code = next(
        b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL) if "AssistantDistillation(" in b
    )
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace("\nprint(", "\n_ = ("), "docs/distillation.md", "exec"), scope)  # noqa: S102
    assert scope["cb"].routes == [("teacher", "assistants[0]"), ("assistants[0]", "student")]


# ---------------------------------------------------------------- FedMD: digest targets routed along the chain


def test_fedmd_chain_sends_each_tier_its_teacher_tiers_logits():
    from lightning_fed.strategies import FedMD

    tiers = _tiers()
    s = FedMD(
        public=tiny_public(80), tiers=tiers, public_per_round=20, assistant_chain=["large", "medium", "small"]
    )
    s.setup(cnn(4))
    clients = list(range(6))  # round robin: tiers 0, 1, 2, 0, 1, 2
    first = s.configure_round(1, clients)
    assert all("consensus" not in i.payload for i in first)  # nothing to digest in the first round
    # constructed logits: every party of tier t sends the constant t + 1, so the tier means are 1, 2, 3
    replies = [Reply(c, {"logits": torch.full((20, 10), float(tiers.tier_of(c) + 1))}, 10) for c in clients]
    s.aggregate(1, replies)
    out = {i.client_id: i.payload for i in s.configure_round(2, clients)}
    consensus = torch.full((20, 10), 2.0)
    for c in clients:
        target = out[c]["consensus"]
        expected = {2: consensus, 1: torch.full((20, 10), 3.0), 0: torch.full((20, 10), 2.0)}[
            tiers.tier_of(c)
        ]
        assert torch.equal(target, expected), f"client {c} of tier {tiers.tier_of(c)}"
    assert s.last_routes == {2: "consensus", 1: "large", 0: "medium"}
    # a teacher tier that sent nothing: its students fall back to the consensus
    s.aggregate(2, [r for r in replies if tiers.tier_of(r.client_id) != 1])
    out = {i.client_id: i.payload for i in s.configure_round(3, clients)}
    assert s.last_routes == {2: "consensus", 1: "large", 0: "consensus"}
    assert torch.equal(out[0]["consensus"], torch.full((20, 10), 2.0))
    # the per-tier means are checkpointed
    state = s.state_dict()
    t = FedMD(
        public=tiny_public(80), tiers=tiers, public_per_round=20, assistant_chain=["large", "medium", "small"]
    )
    t.setup(cnn(4))
    t.load_state_dict(state)
    assert {k: v.tolist() for k, v in t.tier_consensus.items()} == {
        k: v.tolist() for k, v in s.tier_consensus.items()
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"assistant_chain": ["small", "large"]}, r"FedMD: assistant_chain=.*cannot teach 'large'"),
        ({"assistant_chain": ["large", "large"]}, r"FedMD: assistant_chain=.*appears twice"),
        ({"assistant_chain": ["large", "nope"]}, r"FedMD: assistant_chain=.*'nope' is not a tier"),
        (
            {"assistant_chain": ["large", "small"], "digest_epochs": 0},
            r"FedMD: assistant_chain=.*digest_epochs=0",
        ),
    ],
)
def test_fedmd_invalid_chains_are_refused(kwargs, match):
    from lightning_fed.strategies import FedMD

    with pytest.raises(ValueError, match=match):
        s = FedMD(public=tiny_public(), tiers=_tiers(), **kwargs)
        s.setup(cnn(4))  # "small" (tier 0) is sized only here


def test_callback_assistants_do_not_change_the_students_batches():
    """With alpha=1 the student ignores its teacher: training the assistants first must leave the student exactly
    as plain training leaves it (same shuffles, same weights)."""
    import lightning as L

    from lightning_fed.callbacks import AssistantDistillation

    L.seed_everything(3, verbose=False)
    alone = cnn(4)
    _fit(L.Callback(), alone, 4)
    cb = AssistantDistillation(teacher=cnn(32), assistants=[cnn(16)], alpha=1.0)  # built before the seed
    L.seed_everything(3, verbose=False)
    student = cnn(4)
    _fit(cb, student, 4)
    assert cb.trained
    for k, v in alone.state_dict().items():
        assert torch.equal(v, student.state_dict()[k]), k


# ---------------------------------------------------------------- FedMD-NFDP: FedMD's chain, with its record subsets


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"assistant_chain": ["small", "large"]}, r"FedMDNFDP: assistant_chain=.*cannot teach 'large'"),
        ({"assistant_chain": ["large", "medium", "large"]}, r"FedMDNFDP: assistant_chain=.*appears twice"),
        ({"assistant_chain": ["large", "nope"]}, r"FedMDNFDP: assistant_chain=.*'nope' is not a tier"),
        (
            {"assistant_chain": ["large", "small"], "digest_epochs": 0},
            r"FedMDNFDP: assistant_chain=.*digest_epochs=0",
        ),
    ],
)
def test_fedmd_nfdp_invalid_chains_are_refused(kwargs, match):
    from lightning_fed.strategies import FedMDNFDP

    with pytest.raises(ValueError, match=match):
        s = FedMDNFDP(public=tiny_public(), tiers=_tiers(), records_per_party=10, **kwargs)
        s.setup(cnn(4))


def test_fedmd_nfdp_chain_sends_each_tier_its_teacher_tiers_logits():
    from lightning_fed.strategies import FedMDNFDP

    tiers = _tiers()
    s = FedMDNFDP(
        public=tiny_public(80),
        tiers=tiers,
        records_per_party=10,
        public_per_round=20,
        assistant_chain=["large", "medium", "small"],
    )
    s.setup(cnn(4))
    clients = list(range(6))
    s.configure_round(1, clients)
    replies = [Reply(c, {"logits": torch.full((20, 10), float(tiers.tier_of(c) + 1))}, 50) for c in clients]
    metrics = s.aggregate(1, replies)
    assert metrics["nfdp/delta"] == pytest.approx(10 / 50)  # the NFDP accounting still runs
    out = {i.client_id: i.payload["consensus"] for i in s.configure_round(2, clients)}
    assert s.last_routes == {2: "consensus", 1: "large", 0: "medium"}
    expected = {0: 2.0, 1: 3.0, 2: 2.0}  # small <- medium's mean, medium <- large's, large <- the consensus
    for c in clients:
        assert torch.equal(out[c], torch.full((20, 10), expected[tiers.tier_of(c)])), c
    assert any(isinstance(cb, type(s.subset)) for cb in s.client_callbacks())


# ---------------------------------------------------------------- decentralized distillation: along the tiers


def _ddist(chain=("large", "medium", "small"), **kw):
    from lightning_fed.strategies import DecentralizedDistillation

    s = DecentralizedDistillation(
        num_clients=12,
        graph="ring",
        degree=2,
        public=tiny_public(40),
        reference_size=40,
        tiers=_tiers(),
        assistant_chain=None if chain is None else list(chain),
        **kw,
    )
    s.setup(cnn(4))
    return s


def _tier_soft(s, clients) -> list[Reply]:
    """Every client of tier t sends the same probability vector, peaked on class t."""
    out = []
    for c in clients:
        p = torch.full((40, 10), 0.05)
        p[:, s.tiers.tier_of(c)] = 0.55
        out.append(Reply(c, {"soft": p}, 10))
    return out


def test_ddist_chain_passes_soft_labels_from_the_teaching_tiers_neighbours():
    """On a ring with round-robin tiers (client i: tier i % 3), client i's neighbours are i - 1 and i + 1: a small
    client (tier 0) has a large and a medium neighbour, a medium client a small and a large one."""
    s = _ddist()
    clients = list(range(12))
    s.aggregate(1, _tier_soft(s, clients))
    out = {i.client_id: i.payload["neighbor_soft"] for i in s.configure_round(2, clients)}
    peak = lambda t: _tier_soft(s, [t])[0].payload["soft"]
    for c in clients:
        t = s.tiers.tier_of(c)
        if t == 0:  # small <- its medium neighbour only
            assert torch.equal(out[c], peak(1)), c
            assert s.last_routes[c] == "medium"
        elif t == 1:  # medium <- its large neighbour only
            assert torch.equal(out[c], peak(2)), c
            assert s.last_routes[c] == "large"
        else:  # large, the chain's head: all its neighbours (a medium and a small one), as without a chain
            assert torch.allclose(out[c], (peak(0) + peak(1)) / 2), c
            assert s.last_routes[c] == "neighbors"
    plain = _ddist(chain=None)
    plain.aggregate(1, _tier_soft(plain, clients))
    same = {i.client_id: i.payload["neighbor_soft"] for i in plain.configure_round(2, clients)}
    assert all(torch.equal(same[c], out[c]) for c in clients if c % 3 == 2)
    assert not any(torch.equal(same[c], out[c]) for c in clients if c % 3 != 2)


def test_ddist_chain_falls_back_to_all_neighbours_when_the_teaching_tier_is_silent():
    s = _ddist()
    s.aggregate(1, _tier_soft(s, [c for c in range(12) if c % 3 != 1]))  # no medium client has sent
    out = {i.client_id: i for i in s.configure_round(2, [0, 3])}
    assert s.last_routes == {0: "neighbors", 3: "neighbors"}
    assert out[0].config["neighbors"] == 1  # client 0's neighbours: 11 (large, sent) and 1 (medium, silent)


DD = "DecentralizedDistillation: assistant_chain="


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chain": ["large", "medium", "large"]}, DD + r".*appears twice"),
        ({"chain": ["large", "tiny"]}, DD + r".*'tiny' is not a tier"),
        ({"chain": ["medium", "large"]}, DD + r".*'medium' \(\d+ parameters\) cannot teach 'large'"),
        (
            {"chain": ["small", "medium"]},
            DD + r".*'small' \(\d+ parameters\) cannot teach 'medium'",
        ),  # at setup
        ({"chain": ["large", "small"], "digest_epochs": 0}, DD + r".*digest_epochs=0"),
    ],
)
def test_ddist_invalid_chains_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _ddist(**kwargs)


# ---------------------------------------------------------------- FedGKT: server -> assistants -> one tier


def _gkt(chain=("server", "mid", "small"), assistants=None, **kw):
    from lightning_fed.strategies import FedGKT

    kw = {
        "split": 1,
        "server_channels": 16,
        "server_hidden": 32,
        "server_layers": 1,
        "server_epochs": 1,
        **kw,
    }
    return FedGKT(
        tiers=ModelTiers(models=[cnn(32)], names=["small", "large"]),
        assistant_chain=None if chain is None else list(chain),
        assistants={"mid": 8} if assistants is None and chain is not None else assistants,
        **kw,
    )


def _gkt_replies(s) -> list[Reply]:
    g = torch.Generator().manual_seed(5)
    out = []
    for c in range(4):  # clients 0, 2: small (4 channels); 1, 3: large (32 channels)
        shape = s.feature_shapes[s.tiers.tier_of(c)]
        out.append(
            Reply(
                c,
                {
                    "features": torch.randn(12, *shape, generator=g),
                    "logits": torch.randn(12, 10, generator=g),
                    "labels": torch.randint(10, (12,), generator=g),
                },
                12,
            )
        )
    return out


def test_fedgkt_chain_passes_the_servers_knowledge_through_the_assistant(monkeypatch):
    """The server learns from the client logits, the assistant from the server's logits as the server left its
    training, and the small tier's clients receive the assistant's logits; the large tier's the server's."""
    from lightning_fed.strategies import fedgkt, gkt_chain

    torch.manual_seed(0)
    s = _gkt()
    s.setup(cnn(4))
    calls = []
    fit = gkt_chain.fit_on_features

    def spy(model, opt, train, targets, *args):
        out = fit(model, opt, train, targets, *args)
        with torch.no_grad():
            calls.append(
                (model, [t.clone() for t in targets], [model(p["features"], t) for _c, p, t in train])
            )
        return out

    monkeypatch.setattr(fedgkt, "fit_on_features", spy)
    monkeypatch.setattr(gkt_chain, "fit_on_features", spy)
    replies = _gkt_replies(s)
    s.aggregate(0, replies)
    (server, server_targets, server_out), (mid, mid_targets, mid_out) = calls
    assert server is s.server and mid is s.chain.models["mid"]
    assert all(
        torch.equal(t, r.payload["logits"]) for t, r in zip(server_targets, replies)
    )  # clients -> server
    assert all(torch.equal(t, o) for t, o in zip(mid_targets, server_out))  # server -> mid
    for i, r in enumerate(replies):  # mid -> small; server -> large
        expected = mid_out[i] if s.tiers.tier_of(r.client_id) == 0 else server_out[i]
        assert torch.equal(s.server_logits[r.client_id], expected), r.client_id
        assert not torch.equal(mid_out[i], server_out[i])
    assert s.last_routes == [("server", "mid"), ("mid", "small"), ("server", "large")]
    assert "assistant/mid/loss" in s.aggregate(1, replies)


def test_fedgkt_tiers_outside_the_chain_receive_what_they_would_without_it():
    logits = []
    for chain in (None, ("server", "mid", "small")):
        torch.manual_seed(0)
        s = _gkt(chain=chain)
        s.setup(cnn(4))
        replies = _gkt_replies(s)
        s.aggregate(0, replies)
        logits.append(s.server_logits)
    assert torch.equal(logits[0][1], logits[1][1]) and torch.equal(logits[0][3], logits[1][3])  # large
    assert not torch.equal(logits[0][0], logits[1][0])  # small: from the assistant instead


def test_fedgkt_assistants_and_their_optimizers_are_checkpointed():
    torch.manual_seed(0)
    a, b = _gkt(), _gkt()
    a.setup(cnn(4))
    b.setup(cnn(4))
    replies = _gkt_replies(a)
    a.aggregate(0, replies)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as through a checkpoint file: no tensor shared with a
    for k, v in a.chain.models["mid"].state_dict().items():
        assert torch.equal(v, b.chain.models["mid"].state_dict()[k])
    a.aggregate(1, replies)  # the same next round from the restored state: Adam's moments were restored too
    b.aggregate(1, replies)
    assert all(torch.equal(a.server_logits[c], b.server_logits[c]) for c in range(4))
    plain = _gkt(chain=None)
    plain.setup(cnn(4))
    with pytest.raises(ValueError, match=r"assistants \['mid'\] do not match assistants \[\]"):
        plain.load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"chain": ["server", "mid", "server"]},
            r"FedGKT: assistant_chain=.*'server' appears twice \(a loop\)",
        ),
        (
            {"chain": ["server", "tiny", "small"], "assistants": {}},
            r"FedGKT: assistant_chain=.*'tiny' is not a tier or assistant",
        ),
        (
            {"chain": ["server", "large", "small"], "assistants": {}},
            r"FedGKT: assistant_chain=.*'large' is a client tier and cannot teach 'small'",
        ),
        ({"chain": ["mid", "small"]}, r"FedGKT: assistant_chain=.*starts at 'server'"),
        ({"chain": ["server", "mid"]}, r"FedGKT: assistant_chain=.*ends at the client tier"),
        (
            {"chain": ["server", "mid", "small"], "assistants": {"mid": 16}},
            r"FedGKT: assistant_chain=.*'server' \(16 channels\) cannot teach 'mid' \(16 channels\)",
        ),
        (
            {"chain": ["server", "a", "b", "small"], "assistants": {"a": 4, "b": 8}},
            r"FedGKT: assistant_chain=.*'a' \(4 channels\) cannot teach 'b'",
        ),
        (
            {"chain": ["server"], "assistants": {}},
            r"FedGKT: assistant_chain=\['server'\] is not allowed; a chain names",
        ),
        (
            {"chain": ["server", "small"], "assistants": {"mid": 8}},
            r"FedGKT: assistants=\{'mid'.*assistant_chain",
        ),
        ({"chain": None, "assistants": {"mid": 8}}, r"FedGKT: assistants=\['mid'\] is not allowed without"),
        (
            {"chain": ["server", "large"], "assistants": {"large": 8}},
            r"assistants=\{'large'.*differ from 'server'",
        ),
        ({"chain": ["server", "mid", "small"], "assistants": {"mid": 0}}, r"assistants=\{'mid': 0\}.*>= 1"),
    ],
)
def test_fedgkt_invalid_chains_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _gkt(**kwargs)


def test_fedgkt_assistant_smaller_than_its_student_is_refused_at_setup():
    s = _gkt(
        chain=("server", "mid", "large"), assistants={"mid": 1}
    )  # the server's architecture at 1 channel
    with pytest.raises(
        ValueError, match=r"FedGKT: assistant_chain=.*'mid' \(\d+ parameters\) cannot teach 'large'"
    ):
        s.setup(cnn(4))


@pytest.mark.parametrize(
    ("marker", "routes"),
    [
        ("FedMDNFDP(", "{0: 'medium', 1: 'large', 2: 'consensus'}"),
        (
            "DecentralizedDistillation(",
            "{0: 'medium', 1: 'large', 2: 'neighbors', 3: 'medium', 4: 'large', 5: 'neighbors'}",
        ),
        ("FedGKT(", "[('server', 'mid'), ('mid', 'small'), ('server', 'large')]"),
    ],
)
def test_docs_strategy_chain_examples_run(marker, routes, tmp_path, monkeypatch):
    """The docs' runnable examples of the strategies' chains run and print the routes they state."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "distillation.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL) if marker in b)
    assert routes in code
    monkeypatch.chdir(tmp_path)
    printed: list = []
    scope: dict = {"print": lambda *a: printed.append(a)}
    exec(compile(code, "docs/distillation.md", "exec"), scope)  # noqa: S102
    assert str(printed[-1][0]) == routes


def test_fedgkt_chain_with_flat_features_uses_hidden_widths():
    """``split=None``: an assistant is the server's MLP with the given hidden width; the order is in hidden units."""
    torch.manual_seed(0)
    s = _gkt(split=None, assistants={"mid": 8})
    s.setup(cnn(4))
    assert s.chain.models["mid"].adapters[0].out_features == 8
    s.aggregate(0, _gkt_replies(s))
    assert s.last_routes == [("server", "mid"), ("mid", "small"), ("server", "large")]
    with pytest.raises(
        ValueError, match=r"'server' \(32 hidden units\) cannot teach 'mid' \(64 hidden units\)"
    ):
        _gkt(split=None, assistants={"mid": 64})
