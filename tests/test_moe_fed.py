"""FedMoE: expert-sparse replies, per-expert aggregation, personal routers; MoERouting + FedMoE in FedLoop."""

import pytest
import torch
from conftest import seeded

from lightning_fed import FedAvg, Instruction, Reply
from lightning_fed.callbacks import MoERouting
from lightning_fed.data import Dirichlet
from lightning_fed.models import MNIST1DFFN
from lightning_fed.moe import convert_to_moe
from lightning_fed.protocol import RejectedReply, validate_reply
from lightning_fed.strategies import FedMoE
from lightning_fed.strategies.fedmoe import SHARE_PREFIX
from lightning_fed.weights import float_state


def _moe_model(experts: int = 3) -> MNIST1DFFN:
    model = seeded(MNIST1DFFN, channels=4, width=8, hidden=8)
    convert_to_moe(model, ["ffn"], num_experts=experts, capacity_factor=None)
    return model


def _random_reply(strategy: FedMoE, cid: int, n: int, shares: list[float], drop: set[int], seed: int) -> Reply:
    g = torch.Generator().manual_seed(seed)
    payload = {}
    for key, spec in strategy.reply_spec(Instruction(cid, {})).items():
        if key.startswith(SHARE_PREFIX):
            payload[key] = torch.tensor(shares)
            continue
        kind, _, e = strategy.group_of(key)
        if kind == "expert" and e in drop:
            continue
        payload[key] = torch.randn(spec.shape, generator=g)
    return Reply(cid, payload, n)


def test_groups_split_dense_router_and_experts():
    s = FedMoE()
    s.setup(_moe_model())
    assert s.group_of("ffn.experts.2.0.weight") == ("expert", "ffn", 2)
    assert s.group_of("ffn.router.weight") == ("router", "ffn", -1)
    assert s.group_of("proj.weight") == ("dense", "", -1)
    assert s.layers == {"ffn": 3}


def test_all_experts_used_with_example_weighting_equals_fedavg():
    model = _moe_model()
    moe, avg = FedMoE(expert_weighting="examples"), FedAvg()
    moe.setup(model)
    avg.setup(model)
    replies = [_random_reply(moe, c, n, [0.5, 0.3, 0.2], set(), seed=c) for c, n in ((0, 10), (1, 30), (2, 5))]
    dense = [Reply(r.client_id, {k: v for k, v in r.payload.items() if not k.startswith(SHARE_PREFIX)}, r.num_examples)
             for r in replies]
    moe.aggregate(0, replies)
    avg.aggregate(0, dense)
    assert torch.allclose(moe.global_flat, avg.global_flat, atol=1e-6)


def test_token_weighting_matches_dense_per_expert_reference():
    model = _moe_model()
    s = FedMoE()  # expert_weighting="tokens"
    s.setup(model)
    before = {k: v.clone() for k, v in s.global_payload().items()}
    shares = {0: [0.6, 0.4, 0.0], 1: [0.1, 0.2, 0.7], 2: [0.5, 0.0, 0.5]}
    drops = {0: {2}, 1: set(), 2: {1}}
    nums = {0: 10, 1: 30, 2: 20}
    replies = [_random_reply(s, c, nums[c], shares[c], drops[c], seed=10 + c) for c in (0, 1, 2)]
    s.aggregate(0, replies)
    after = s.global_payload()
    for key, old in before.items():
        kind, _, e = s.group_of(key)
        senders = [r for r in replies if key in r.payload]
        if kind == "expert":
            w = [r.num_examples * shares[r.client_id][e] for r in senders]
        else:
            w = [r.num_examples for r in senders]
        ref = sum(wi * r.payload[key] for wi, r in zip(w, senders)) / sum(w)
        assert torch.allclose(after[key] - old, ref, atol=1e-5), key


def test_expert_nobody_used_is_unchanged_and_metrics():
    model = _moe_model()
    s = FedMoE()
    s.setup(model)
    before = {k: v.clone() for k, v in s.global_payload().items()}
    replies = [_random_reply(s, c, 10, [1.0, 0.0, 0.0], {1, 2}, seed=c) for c in (0, 1)]
    del replies[1].payload["ffn.experts.0.2.bias"]  # a partial expert is ignored, not a crash
    metrics = s.aggregate(0, replies)
    after = s.global_payload()
    assert torch.equal(after["ffn.experts.1.0.weight"], before["ffn.experts.1.0.weight"])
    assert not torch.equal(after["ffn.experts.0.0.weight"], before["ffn.experts.0.0.weight"])
    assert metrics["moe_experts_sent"] == pytest.approx(1 / 6) and metrics["moe_experts_updated"] == pytest.approx(1 / 3)


def test_client_reply_carries_only_used_experts_and_validates():
    model = _moe_model()
    s = FedMoE()
    s.setup(model)
    instr = s.configure_round(0, [0])[0]
    s.client_receive(model, instr)
    model.ffn.token_counts.copy_(torch.tensor([5, 0, 3]))
    payload = s.client_reply(model, instr)
    assert "ffn.experts.0.0.weight" in payload and "ffn.experts.2.2.bias" in payload
    assert not any(k.startswith("ffn.experts.1.") for k in payload)
    assert torch.allclose(payload[SHARE_PREFIX + "ffn"], torch.tensor([5 / 8, 0.0, 3 / 8]))
    validate_reply(Reply(0, payload, 8), s.reply_spec(instr))
    bad = dict(payload)
    del bad["ffn.router.weight"]
    with pytest.raises(RejectedReply, match="missing"):
        validate_reply(Reply(0, bad, 8), s.reply_spec(instr))
    sparse = FedMoE(min_share=0.5)
    sparse.setup(model)
    assert not any(k.startswith("ffn.experts.2.") for k in sparse.client_reply(model, instr))


def test_fedmoe_config_errors():
    with pytest.raises(ValueError, match="expert_weighting='bytes'"):
        FedMoE(expert_weighting="bytes")
    with pytest.raises(ValueError, match="min_tokens=0"):
        FedMoE(min_tokens=0)
    with pytest.raises(ValueError, match="min_share=1.0"):
        FedMoE(min_share=1.0)


def _cb(**kw) -> MoERouting:
    return MoERouting(convert=["ffn"], num_experts=4, k=1, **kw)


def test_fedloop_fedmoe_shrinks_uplink_and_learns(make_loop, small_dm, tmp_path):
    model = seeded(MNIST1DFFN, lr=0.003, optimizer="adam")
    res = make_loop(rounds=4, local_epochs=2, partition=Dirichlet(0.3), strategy=FedMoE(min_share=0.1),
                    callbacks=[_cb()], output_dir=str(tmp_path / "moe")).fit(model, small_dm)
    dense = seeded(MNIST1DFFN, lr=0.003, optimizer="adam")
    ref = make_loop(rounds=4, local_epochs=2, partition=Dirichlet(0.3), strategy=FedAvg(),
                    callbacks=[_cb()], output_dir=str(tmp_path / "avg")).fit(dense, small_dm)
    assert type(model.ffn).__name__ == "MoELayer" and "training_step" not in model.__dict__
    h, r = res.history[-1], ref.history[-1]
    assert h["bytes_down"] == r["bytes_down"]
    assert h["bytes_up"] < r["bytes_up"]
    assert 0 < h["moe_experts_sent"] < 1
    assert "moe/balance_loss" in h and "moe/ffn/load_0" in h and "moe/dropped" in h
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]  # the MoE model learns
    assert res.final_metrics["test_acc"] > 0.15  # above chance (10 %)


def test_fedloop_personal_router_never_leaves_client(make_loop, small_dm, tmp_path):
    model = seeded(MNIST1DFFN)
    router0 = None

    class Spy(MoERouting):
        def on_aggregate_start(self, trainer, pl_module, replies):
            assert all(not any("router" in k for k in rp.payload) for rp in replies)

    loop = make_loop(rounds=2, strategy=FedMoE(personal_router=True), callbacks=[Spy(convert=["ffn"], num_experts=4)])
    res = loop.fit(model, small_dm)
    assert res.history[-1]["good"] == 2
    router0 = loop.strategy.global_payload()["ffn.router.weight"]
    states = [loop.store.load(c) for c in loop.store.ids()]
    assert states and all("moe_router" in st for st in states)
    assert any(not torch.equal(st["moe_router"]["ffn.router.weight"], router0) for st in states)
    assert torch.equal(model.ffn.router.weight.detach(), router0)  # the server's router never moved


def test_fedloop_resume_after_conversion_matches_uninterrupted(make_loop, small_dm, tmp_path):
    a = seeded(MNIST1DFFN)
    make_loop(rounds=3, strategy=FedMoE(), callbacks=[_cb()], output_dir=str(tmp_path / "a")).fit(a, small_dm)
    b = seeded(MNIST1DFFN)
    make_loop(rounds=2, strategy=FedMoE(), callbacks=[_cb()], checkpoint_every=1,
              output_dir=str(tmp_path / "b")).fit(b, small_dm)
    c = seeded(MNIST1DFFN)
    make_loop(rounds=3, strategy=FedMoE(), callbacks=[_cb()], checkpoint_every=1,
              output_dir=str(tmp_path / "b")).fit(c, small_dm, resume="last")
    wa, wc = float_state(a), float_state(c)
    assert wa.keys() == wc.keys() and all(torch.equal(wa[k], wc[k]) for k in wa)
