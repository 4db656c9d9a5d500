"""Poisoned clients on MNIST-1D: every attack against every defence, clean accuracy and attack success rate.

Setting ``20`` is fedavg.yaml's (MNIST1DCNN with 25 channels, SGD lr 0.05 momentum 0.9, batch 16, 20 clients on a
Dirichlet(0.5) label split, 10 per round, cosine client-LR decay to 10 %); setting ``100`` is the same with 100
clients (40 records each), 10 per round. ``--rounds`` and ``--local-epochs`` are the benchmark's (fewer than the
recipe's 100 x 5: ``--curve`` measures clean FedAvg's test accuracy against the rounds to choose them). A fixed,
seeded set of ``fraction`` of the clients is malicious (``mode="fixed"``); the attack's seed is the run's seed, or
the run's seed plus ``--attack-seed-offset K`` (the training, the client sampling and the data keep the run's seed):
``K`` != 0 draws another malicious set for the same training runs. Each attack row records its ``attack_seed``;
saved models of ``K`` != 0 are named apart (``-attackseed+K``), and each saved model has the list of the malicious
clients it was trained against beside it (``*.malicious.json``): a model whose list is missing or differs is not
reused.

Rows are attacks, columns defences:

* aggregation columns (every attack): the weighted mean (no defence), ``CoordinateMedian``, ``TrimmedMean``,
  multi-``Krum``, ``NormBound`` (the round's median norm), ``WeakDP``, ``FLAME``, ``RobustLR`` (theta one more
  than the expected attackers per round; ``rlr``: the disputed coordinates' rate negated, ``rlr_zero``: zeroed), ``FLTrust`` (the server's update on 100 clean root records, the clients'
  optimizer settings), ``ReferenceFilter`` (``refilter``: the round's median as reference; ``refilter_krum``: the
  multi-Krum mean), ``reputation`` (the ``ReputationFilter`` strategy: ``refilter_krum``'s test, its norm bound
  from the smaller of the round's median norm and the last kept replies' median norm, and a reply kept only if its
  client's beta reputation, from the share of its past and present replies that passed, is above 1/2;
  ``reputation_roundnorm``: the same with the round's median norm only), ``lossfilter`` (the ``LossFilter`` strategy:
  a reply dropped when its step, at its share of the round's mean, raises the cross-entropy on 200 clean records the
  server holds (``PublicData``, generator seed 7; ``--loss-clean`` sets how many, recorded as ``loss_clean``) and
  its client's mean score over its rounds is not positive either; ``lossfilter_round``: every reply judged on its
  own round), ``foolsgold`` (the ``FoolsGold`` strategy: FedAvg weighted by the similarity of the clients'
  histories of the output layer, kappa 1, or ``--fg-layers`` / ``--fg-kappa``; the replies it gives weight 0 are
  its detection), and the benchmark-only ``oracle`` (drops exactly the malicious replies: a ceiling, never a
  defence); each is its own training run; with ``--clean-rules`` the clean row is trained with each
  requested rule (``none`` only when requested; sized for the largest ``--fractions`` share): what the rule costs
  without an attack;
* post-training columns (backdoor rows only): ``FinePruning``, ``NAD``, ``MCR``, fine-pruning then NAD, ``IBAU``
  (radius chosen with ``--ibau-eps``), ``ANP`` (bound and threshold chosen with ``--anp-eps``) and
  ``ActivationClip`` (``clip``: conv1-3 clamped at per channel and position quantiles of the clean outputs, the
  quantile chosen from ``--clip-q``: :func:`choose_clip_quantile`), ``TriggerUnlearn`` (``nc``: Neural Cleanse's
  trigger inversion for every class, then unlearning of the flagged class's reversed trigger, or of the
  smallest-mask class's when none is flagged (``--nc-fallback``); its learning rate chosen from ``--defence-lr``:
  :func:`repair_nc`), ``FreshDistill`` (``fresh``: the model distilled
  into a freshly initialised copy of its architecture on FedDF's 1,000 unlabelled proxy records and the clean
  training records, their labels weighted ``--fresh-alpha``, the temperature chosen from ``--fresh-t``:
  :func:`choose_fresh_temperature`), ``freshpatch`` (the same, every batch also trained on a copy of its records
  with ``--fresh-patches`` short patches written in, to match the teacher's output on the records as they are:
  :func:`~lightning_fed.callbacks.fresh_distill.patch`, sides 2-8, values up to 4 standard deviations) and ``SEAM`` (``seam``: forgetting with random labels at ``--seam-forget-lr``,
  then ``--seam-epochs`` of recovery with the true ones), and ``fresh+nc``: distillation into a fresh model, then
  trigger unlearning on the student, its learning rate chosen from ``--nc-lr`` against the unrepaired model's
  accuracy (one 2-point budget for the chain: :func:`repair_nc`'s ``base``), on 500
  clean records the server holds (``PublicData``, generator seed 7, not the clients' data). They repair the final
  model, so each (attack, seed) is trained once with no defence and every post-training defence is applied to its
  own copy of that same final model. With ``--fp-max-drop`` fine-pruning's ratio, with several ``--defence-lr``
  the defences' learning rate, are chosen per model on 200 further clean records the server holds apart
  (generator seed 8; :func:`choose_fp_ratio`, :func:`repair_selected`); no setting reads the test set;
* combinations ``RULE/POST`` (backdoor rows only), e.g. ``normbound/fp+nad``: training with the aggregation rule
  ``RULE``, then the post-training defence ``POST`` on a copy of that run's final model;
* ``FedDF`` (backdoor rows only): ensemble distillation of the received client models on 1,000 unlabelled proxy
  records (feddf.yaml's settings, one architecture) under the same attack.

The row ``sign_flip_x1`` sends the malicious clients' updates flipped at their own length (scale 1, so a length test
passes them; ``sign_flip`` scales them by 4); ``sign_flip_sleeper`` is the same attacker building a record first: its
clients train honestly for the first third of the rounds, then flip. The row ``backdoor_mr_norm`` is model replacement constrained to pass a norm check (:class:`NormMatchedBackdoor`):
each malicious client cuts its boosted update to ``NORM_RATIO`` (2) times the norm of its own unboosted update, a
rule fixed before any run that needs nothing from the server.

A cell is clean test accuracy (and attack success rate on the triggered test records of the other classes, for the
backdoor rows), mean +- sd over the seeds. The trigger is the last 4 values set to +-3 unless ``--trigger-start`` /
``--trigger-pattern`` put it elsewhere or make it constant (training and the attack success rate use the same one;
its models are saved under their own names). Where a rule detects (multi-Krum and FLAME drop replies, NormBound and
WeakDP clip them), the detection precision and recall over the run against the known malicious clients
(:class:`~lightning_fed.callbacks.Detection`) are in a second table. Runs in-process, one FedLoop per training run.

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/robustness.py --quick                  # smoke test, seconds
    OMP_NUM_THREADS=1 python benchmarks/robustness.py --curve --rounds 40      # clean FedAvg's curve
    OMP_NUM_THREADS=1 python benchmarks/robustness.py --clients 20 --seeds 0 1 2 --json runs/rob20.json
    python benchmarks/robustness.py --load runs/rob20-a.json runs/rob20-b.json  # tables of saved results
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from lightning_fed import FedLoop
from lightning_fed.callbacks import (
    ANP,
    IBAU,
    MCR,
    NAD,
    SEAM,
    ActivationClip,
    Backdoor,
    Detection,
    FedCallback,
    FinePruning,
    FreshDistill,
    GaussianUpdate,
    LabelFlip,
    LittleIsEnough,
    RoundLRDecay,
    SignFlip,
    TriggerUnlearn,
    attack_success_rate,
)
from lightning_fed.callbacks._defence import accuracy
from lightning_fed.callbacks.anp import prune_
from lightning_fed.callbacks.attacks import Attack, float_items, malicious_clients, shard_tensors
from lightning_fed.callbacks.backdoor import PATTERNS
from lightning_fed.context import fed_context
from lightning_fed.data import Dirichlet, MNIST1DDataModule, PublicData
from lightning_fed.errors import AggregationRefused, RoundsFailed
from lightning_fed.models import MNIST1DCNN
from lightning_fed.seeding import generator
from lightning_fed.strategies import (
    FLAME,
    CoordinateMedian,
    FedAvg,
    FedDF,
    FLTrust,
    FoolsGold,
    Krum,
    LossFilter,
    NormBound,
    ReferenceFilter,
    ReputationFilter,
    RobustAggregator,
    RobustLR,
    TrimmedMean,
    WeakDP,
)
from lightning_fed.strategies.robust import AggregationReport, _weighted_mean_

TARGET, TRIGGER_SIZE, TRIGGER_VALUE = 0, 4, 3.0
DEFAULT_TRIGGER: tuple[int | None, str] = (None, "alternating")  # (start, pattern): the last 4 values, +-3
BYZANTINE = ("label_flip", "sign_flip", "gaussian", "alie", "sign_flip_x1", "sign_flip_sleeper")
BACKDOORS = ("backdoor", "backdoor_mr", "backdoor_mr_norm")
# backdoor_mr_norm: the boosted reply is cut to this times the norm of the client's own unboosted update
NORM_RATIO = 2.0
ATTACKS = (*BYZANTINE, *BACKDOORS)
AGGREGATION = (
    "none",
    "median",
    "trimmed",
    "krum",
    "normbound",
    "weakdp",
    "flame",
    "rlr",
    "rlr_zero",
    "fltrust",
    "refilter",
    "refilter_krum",
    "reputation",
    "reputation_roundnorm",
    "lossfilter",
    "lossfilter_round",
    "foolsgold",
    "oracle",
)
POST = ("fp", "nad", "mcr", "fp+nad", "ibau", "anp", "clip", "nc", "fresh", "freshpatch", "seam", "fresh+nc")
COMBOS = tuple(f"{rule}/{post}" for rule in AGGREGATION[1:] for post in POST)
DEFENCES = (*AGGREGATION, *POST, "feddf", *COMBOS)
DETECTS = {
    "krum": "dropped",
    "flame": "dropped",
    "fltrust": "dropped",
    "normbound": "clipped",
    "weakdp": "clipped",
    "refilter": "dropped",
    "refilter_krum": "dropped",
    "reputation": "dropped",
    "reputation_roundnorm": "dropped",
    "lossfilter": "dropped",
    "lossfilter_round": "dropped",
    "foolsgold": "dropped",
    "oracle": "dropped",
}
LABELS = {
    "none": "no defence",
    "median": "median",
    "trimmed": "trimmed mean",
    "krum": "multi-Krum",
    "normbound": "norm bound",
    "weakdp": "weak DP",
    "flame": "FLAME",
    "rlr": "robust LR",
    "rlr_zero": "robust LR (zeroed)",
    "fltrust": "FLTrust",
    "refilter": "reference filter (median)",
    "refilter_krum": "reference filter (multi-Krum)",
    "reputation": "reputation filter (multi-Krum)",
    "reputation_roundnorm": "reputation filter (multi-Krum), the round's norm only",
    "lossfilter": "loss filter",
    "lossfilter_round": "loss filter, each round on its own",
    "foolsgold": "FoolsGold",
    "oracle": "oracle (drops exactly the malicious, benchmark only)",
    "ibau": "I-BAU",
    "anp": "ANP",
    "clip": "activation clipping",
    "nc": "trigger unlearning (NC)",
    "fresh": "distillation into a fresh model",
    "freshpatch": "distillation into a fresh model, patched copies",
    "seam": "SEAM",
    "fp": "fine-pruning",
    "nad": "NAD",
    "mcr": "MCR",
    "fp+nad": "FP + NAD",
    "fresh+nc": "fresh distillation, then NC",
    "feddf": "FedDF",
    "clean": "no attack",
    "label_flip": "label flip",
    "sign_flip": "sign flip",
    "gaussian": "Gaussian",
    "alie": "little is enough",
    "sign_flip_x1": "sign flip x1",
    "sign_flip_sleeper": "sign flip x1 from round R/3 (sleeper)",
    "backdoor": "backdoor",
    "backdoor_mr": "backdoor + model replacement",
    "backdoor_mr_norm": "backdoor + model replacement, norm-constrained",
}
LABELS.update({c: f"{LABELS[c.split('/')[0]]}, then {LABELS[c.split('/')[1]]}" for c in COMBOS})
FP_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
ANP_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ANP_LAYERS = ["conv1", "conv2", "conv3"]
CLIP_LAYERS = ["conv1", "conv2", "conv3"]
FRESH_PROXY = (1000, 7)  # FreshDistill's unlabelled transfer records: FedDF's PublicData(1000, seed=7)


class Oracle(RobustAggregator):
    """Benchmark only, never a defence: drops exactly the replies of the attack's malicious clients (which a server
    cannot know) and takes the weighted mean of the rest: what "FedAvg on the honest replies" reaches, the ceiling
    of any filter. :attr:`feed` (a callback the run must add) tells it, every round, which positions are
    malicious. A round whose replies are all malicious has no honest reply to average: it is refused (the loop skips
    it), as a filter that drops every reply does."""

    def __init__(self, attack: Attack) -> None:
        super().__init__()
        self.attack = attack
        self.drop: list[int] = []
        self.feed = OracleFeed(self)

    def combine(self, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, report: AggregationReport) -> None:
        """The weighted mean of the honest rows; refused when every reply is malicious."""
        keep = [i for i in range(x.shape[0]) if i not in set(self.drop)]
        if not keep:
            raise AggregationRefused(f"Oracle: the {x.shape[0]} replies are all malicious")
        report.dropped = [i for i in range(x.shape[0]) if i not in set(keep)]
        _weighted_mean_(out, x, w, torch.tensor(keep))


class OracleFeed(FedCallback):
    """Server: before each aggregation, gives :class:`Oracle` the positions of the malicious clients' replies."""

    def __init__(self, oracle: Oracle) -> None:
        self.oracle = oracle

    def on_aggregate_start(self, trainer: Any, pl_module: Any, replies: list[Any]) -> None:
        """Note the positions of the round's malicious replies."""
        fed = fed_context(trainer)
        bad = set(self.oracle.attack.malicious(fed.round, fed.num_clients))
        self.oracle.drop = [i for i, r in enumerate(replies) if r.client_id in bad]


class WeightLog(FedCallback):
    """Server: the FoolsGold weights the run gave the malicious and the honest replies (benchmark only: the truth
    comes from the attack), summed over the run; :meth:`means` gives their means."""

    def __init__(self, attack: Attack, strategy: FoolsGold) -> None:
        self.attack, self.strategy = attack, strategy
        self.clients: list[int] = []
        self.sums = {"malicious": [0.0, 0], "honest": [0.0, 0]}

    def on_aggregate_start(self, trainer: Any, pl_module: Any, replies: list[Any]) -> None:
        """Note the client of each position and forget the previous report."""
        self.clients = [r.client_id for r in replies]
        self.strategy.last = None

    def on_round_end(self, trainer: Any, pl_module: Any, metrics: dict[str, float]) -> None:
        """Add this round's weights to the malicious or honest sums."""
        fed = fed_context(trainer)
        last = self.strategy.last
        if fed is None or last is None:
            return
        bad = set(self.attack.malicious(fed.round, fed.num_clients))
        for cid, w in zip(self.clients, last.scores, strict=True):
            acc = self.sums["malicious" if cid in bad else "honest"]
            acc[0], acc[1] = acc[0] + w, acc[1] + 1

    def means(self) -> dict[str, float]:
        """Mean weight of the malicious and of the honest replies over the run."""
        return {k: (v[0] / v[1] if v[1] else float("nan")) for k, v in self.sums.items()}


class NormMatchedBackdoor(Backdoor):
    """Benchmark only: model replacement constrained to pass a norm check without knowing the other clients'
    updates (Bagdasaryan et al.'s constrain-and-scale). A malicious client takes the norm of its own unboosted
    update as its estimate of the round's typical norm and sets ``max_norm`` to ``ratio`` times it before the boost
    (``boost`` x its update, cut to ``max_norm`` when longer). With ``ratio`` 2 a reply passes a filter of 3 times
    the round's median norm as long as the client's own update is under 1.5 times that median."""

    def __init__(self, ratio: float = NORM_RATIO, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not ratio >= 1:
            raise ValueError(f"NormMatchedBackdoor: ratio={ratio!r}; allowed: >= 1")
        self.ratio = float(ratio)

    def on_client_end(self, trainer: Any, pl_module: Any, reply: Any) -> None:
        """Malicious clients: ``max_norm`` from the unboosted update's norm, then the boost and the cut."""
        if self.malicious_context(trainer) is not None:
            norms = [torch.linalg.vector_norm(v.float()) for _, v in float_items(reply)]
            self.max_norm = self.ratio * float(torch.linalg.vector_norm(torch.stack(norms)))
        super().on_client_end(trainer, pl_module, reply)


def split_post(defence: str) -> tuple[str, str]:
    """``(training rule, post-training step)`` of a post-training column: ``"fp"`` -> ``("none", "fp")``,
    ``"normbound/fp+nad"`` -> ``("normbound", "fp+nad")``."""
    rule, _, post = defence.rpartition("/")
    return rule or "none", post


def make_attack(
    name: str,
    fraction: float,
    seed: int,
    boost: float,
    trigger: tuple[int | None, str] = DEFAULT_TRIGGER,
    rounds: int | None = None,
) -> Attack:
    """The attack ``name`` on a fixed, seeded ``fraction`` of the clients; backdoors write ``trigger`` (its
    ``(start, pattern)``, :func:`~lightning_fed.callbacks.backdoor.apply_trigger`); ``sign_flip_x1`` flips the
    updates at their own length; ``sign_flip_sleeper`` sends honest updates for the first third of the ``rounds``
    (at least one round) and then does the same."""
    common = {"fraction": fraction, "mode": "fixed", "seed": seed}
    if name == "label_flip":
        return LabelFlip(num_classes=10, **common)
    if name == "sign_flip":
        return SignFlip(scale=4.0, **common)
    if name == "sign_flip_x1":
        return SignFlip(scale=1.0, **common)
    if name == "sign_flip_sleeper":
        if rounds is None:
            raise ValueError("sign_flip_sleeper starts after a third of the run's rounds: pass rounds")
        return SignFlip(scale=1.0, start_round=max(1, rounds // 3), **common)
    if name == "gaussian":
        return GaussianUpdate(std=1.0, **common)
    if name == "alie":
        return LittleIsEnough(z=1.0, **common)
    replace = name in ("backdoor_mr", "backdoor_mr_norm")
    kind: Callable[..., Backdoor] = NormMatchedBackdoor if name == "backdoor_mr_norm" else Backdoor
    start, pattern, size, value = full_trigger(trigger)
    return kind(
        target=TARGET,
        poison_fraction=0.5,
        trigger_size=size,
        trigger_value=value,
        trigger_start=start,
        trigger_pattern=pattern,
        boost=boost if replace else 1.0,
        **common,
    )


def make_aggregator(
    name: str,
    fraction: float,
    per_round: int,
    seed: int,
    local_epochs: int = 1,
    attack: Attack | None = None,
) -> Any:
    """The robust rule of column ``name``, sized for ``fraction`` malicious among ``per_round`` replies.

    The reference filter (``refilter``: against the round's median; ``refilter_krum``: against the multi-Krum mean,
    Krum's f as below) drops replies whose cosine to the reference is <= 0 or whose norm is above 3 times the
    round's median norm: fixed before any run, not tuned. ``oracle`` (:class:`Oracle`) drops exactly ``attack``'s
    malicious replies (no attack: the weighted mean).

    Robust LR's theta is ``floor(fraction * n) + 1``, one more than the expected attackers of a round (as Krum's f
    and the trimmed share). FLTrust's server update trains on ``ROOT`` (100 clean records the server holds,
    ``PublicData`` generator seed 7) with the clients' own settings (``local_epochs``, SGD lr 0.05, momentum 0.9,
    batch 16, the same cosine decay): nothing is tuned."""
    expected = fraction * per_round
    if name in ("rlr", "rlr_zero"):
        return RobustLR(malicious=fraction, mode="negate" if name == "rlr" else "zero")
    if name == "fltrust":
        return FLTrust(
            clean=PublicData(num_samples=100, seed=7, labeled=True),
            epochs=local_epochs,
            lr=0.05,
            momentum=0.9,
            batch_size=16,
            lr_decay=RoundLRDecay(schedule="cosine", min_scale=0.1),
            seed=seed,
        )
    if name == "oracle":
        return Oracle(attack) if attack is not None else None
    if name == "refilter":
        return ReferenceFilter(reference="median", min_cosine=0.0, max_norm_ratio=3.0)
    if name == "refilter_krum":
        byz = min((per_round - 3) // 2, math.ceil(expected) + 1)
        return ReferenceFilter(reference="krum", byzantine=byz, min_cosine=0.0, max_norm_ratio=3.0)
    if name == "median":
        return CoordinateMedian()
    if name == "trimmed":
        return TrimmedMean(trim=min(0.4, (math.ceil(expected) + 1) / per_round))
    if name == "krum":
        return Krum(byzantine=min((per_round - 3) // 2, math.ceil(expected) + 1))
    if name == "normbound":
        return NormBound(max_norm=None)
    if name == "weakdp":
        return WeakDP(max_norm=None, noise_std=0.001, seed=seed)
    if name == "flame":
        return FLAME(noise_level=0.001, seed=seed)
    return None


def choose_fp_ratio(
    model: nn.Module, clean: PublicData, select: PublicData, seed: int, args: argparse.Namespace
) -> float:
    """Fine-pruning's ratio for ``model``, chosen on clean records the server holds apart (``select``, which no
    defence trains on): the strongest pruning the clean-accuracy budget allows. Each ratio of ``FP_GRID`` up to
    ``--fp-ratio`` prunes a copy and fine-tunes it (``--fp-epochs`` at the largest ``--defence-lr``); the largest
    ratio whose accuracy on ``select`` stays within ``--fp-max-drop`` of the unrepaired model's is chosen (the
    smallest when none does). The test set and the trigger are never used."""
    base = accuracy(model, select.x, select.y)
    lr = max(args.defence_lr)
    chosen = FP_GRID[0]
    for ratio in [r for r in FP_GRID if r <= args.fp_ratio + 1e-9]:
        probe = repair(model, post_defence("fp", clean, seed, args, ratio, lr), seed)
        if accuracy(probe, select.x, select.y) >= base - args.fp_max_drop:
            chosen = ratio
    return chosen


def choose_ibau_eps(
    model: nn.Module, clean: PublicData, select: PublicData, seed: int, args: argparse.Namespace
) -> float:
    """I-BAU's perturbation radius for ``model``, chosen like fine-pruning's ratio (:func:`choose_fp_ratio`): the
    largest of ``--ibau-eps`` whose repaired copy (at the largest ``--defence-lr``) stays within ``--select-drop`` of
    the unrepaired model's accuracy on the selection records (the smallest when none does). Never the test set, never
    the trigger."""
    base = accuracy(model, select.x, select.y)
    lr = max(args.defence_lr)
    grid = sorted(args.ibau_eps)
    chosen = grid[0]
    for eps in grid:
        probe = repair(model, post_defence("ibau", clean, seed, args, lr=lr, ibau_eps=eps), seed)
        if accuracy(probe, select.x, select.y) >= base - args.select_drop:
            chosen = eps
    return chosen


def choose_anp(
    model: nn.Module, clean: PublicData, select: PublicData, seed: int, args: argparse.Namespace
) -> tuple[float, float]:
    """ANP's ``(eps, threshold)`` for ``model``, on the selection records only: for every ``--anp-eps`` the masks are
    learnt once (as :class:`ANP` does at round 0) and every threshold of ``ANP_GRID`` prunes a copy; of the pairs
    whose pruned copy stays within ``--select-drop`` of the unrepaired model's accuracy there, the one that prunes
    the most channels (ties: the larger eps, then the smaller threshold). ``(eps, 0.0)``, pruning nothing, when none
    does. Never the test set, never the trigger."""
    base = accuracy(model, select.x, select.y)
    best: tuple[int, float, float] = (0, 0.0, 0.0)
    for eps in sorted(args.anp_eps, reverse=True):
        anp = post_defence("anp", clean, seed, args, anp_eps=eps)[0]
        xt, yt, _, _ = anp.data()
        masks = anp.masks(model, xt, yt, generator(seed, anp.stream, 0))
        for threshold in ANP_GRID:
            probe = copy.deepcopy(model)
            count = sum(len(v) for v in prune_(probe, masks, threshold).values())
            if accuracy(probe, select.x, select.y) >= base - args.select_drop and count > best[0]:
                best = (count, eps, threshold)
    return (best[1], best[2]) if best[0] else (max(args.anp_eps), 0.0)


def choose_clip_quantile(
    model: nn.Module, clean: PublicData, select: PublicData, seed: int, args: argparse.Namespace
) -> float:
    """Activation clipping's quantile for ``model``, chosen like I-BAU's radius (:func:`choose_ibau_eps`): the
    smallest of ``--clip-q`` (the tightest bounds) whose clipped copy stays within ``--select-drop`` of the unrepaired
    model's accuracy on the selection records (the largest when none does). Never the test set, never the
    trigger."""
    base = accuracy(model, select.x, select.y)
    grid = sorted(args.clip_q, reverse=True)
    chosen = grid[0]
    for q in grid:
        probe = repair(model, post_defence("clip", clean, seed, args, clip_q=q), seed)
        if accuracy(probe, select.x, select.y) >= base - args.select_drop:
            chosen = q
    return chosen


def fresh_candidates(
    model: nn.Module,
    clean: PublicData,
    select: PublicData,
    seed: int,
    args: argparse.Namespace,
    column: str = "fresh",
) -> list[tuple[float, float, nn.Module]]:
    """``(temperature, selection accuracy, student)`` of distillation into a fresh model for ``model`` at each of
    ``--fresh-t`` (highest first); ``column`` ``"fresh"`` or ``"freshpatch"``. Never the test set, never the
    trigger."""
    out = []
    for t in sorted(args.fresh_t, reverse=True):
        probe = repair(model, post_defence(column, clean, seed, args, fresh_t=t), seed)
        out.append((t, accuracy(probe, select.x, select.y), probe))
    return out


def choose_fresh_temperature(
    model: nn.Module,
    clean: PublicData,
    select: PublicData,
    seed: int,
    args: argparse.Namespace,
    column: str = "fresh",
    candidates: list[tuple[float, float, nn.Module]] | None = None,
) -> tuple[float, nn.Module]:
    """``(temperature, student)`` of distillation into a fresh model for ``model``, from :func:`fresh_candidates`.
    ``fresh``: chosen like activation clipping's quantile (:func:`choose_clip_quantile`), the lowest of ``--fresh-t``
    (the least soft targets, which carry the least of the teacher's behaviour off the clean records) whose student
    stays within ``--select-drop`` of the unrepaired model's accuracy on the selection records (the highest when none
    does). ``freshpatch``: the patched copies, not the temperature, keep the trigger out, so the temperature is the
    one whose student is the most accurate on the selection records (the lowest on a tie). Never the test set,
    never the trigger."""
    candidates = candidates or fresh_candidates(model, clean, select, seed, args, column)
    if column == "freshpatch":
        best = max(a for _, a, _ in candidates)
        t, _, probe = min((c for c in candidates if c[1] == best), key=lambda c: c[0])
        return t, probe
    base = accuracy(model, select.x, select.y)
    chosen: tuple[float, nn.Module] | None = None
    for t, acc, probe in candidates:
        if chosen is None or acc >= base - args.select_drop - 1e-9:
            chosen = (t, probe)
    assert chosen is not None
    return chosen


def post_defence(
    name: str,
    clean: PublicData,
    seed: int,
    args: argparse.Namespace,
    fp_ratio: float | None = None,
    lr: float | None = None,
    ibau_eps: float | None = None,
    anp_threshold: float | None = None,
    anp_eps: float | None = None,
    clip_q: float | None = None,
    nc_lr: float | None = None,
    fresh_t: float | None = None,
) -> list[Any]:
    """The post-training defence(s) of column ``name`` (``"fp"``, ``"nad"``, ``"mcr"``, ``"fp+nad"``, ``"ibau"``),
    fresh instances, applied in order; fine-pruning removes ``fp_ratio`` (default ``--fp-ratio``) of conv3's
    channels; I-BAU's radius is ``ibau_eps`` (default the largest ``--ibau-eps``); ANP (the paper's settings, on
    conv1-3, bound ``anp_eps``: default the largest ``--anp-eps``) prunes below ``anp_threshold`` (default 0.2, the
    paper's); activation clipping (``"clip"``, per channel and position, conv1-3) bounds at the clean outputs' ``clip_q``
    quantile (default the largest ``--clip-q``); trigger unlearning (``"nc"``: ``--nc-steps`` inversion steps of 64
    records, ``--nc-epochs`` of unlearning, ``--nc-fallback``) unlearns at ``nc_lr`` (default ``lr``); distillation
    into a fresh model (``"fresh"``) runs at temperature ``fresh_t`` (default the largest ``--fresh-t``); every SGD
    step but ANP's mask updates and SEAM's forgetting uses ``lr`` (default the first ``--defence-lr``)."""
    lr = args.defence_lr[0] if lr is None else lr
    ibau = IBAU(
        clean=clean,
        at=0,
        eps=max(args.ibau_eps) if ibau_eps is None else ibau_eps,
        rounds=args.ibau_rounds,
        steps=args.ibau_steps,
        lr=lr,
        seed=seed,
    )
    fp = FinePruning(
        clean=clean,
        layer="conv3",
        ratio=args.fp_ratio if fp_ratio is None else fp_ratio,
        at=0,
        epochs=args.fp_epochs,
        lr=lr,
        seed=seed,
    )
    nad = NAD(
        clean=clean,
        layers=["conv2", "conv3"],
        at=0,
        teacher_epochs=args.nad_epochs,
        epochs=args.nad_epochs,
        beta=args.nad_beta,
        lr=lr,
        seed=seed,
    )
    mcr = MCR(
        clean=clean,
        at=0,
        endpoint_epochs=args.mcr_epochs,
        epochs=args.mcr_epochs,
        lr=lr,
        seed=seed,
    )
    anp = ANP(
        clean=clean,
        layers=ANP_LAYERS,
        at=0,
        threshold=0.2 if anp_threshold is None else anp_threshold,
        eps=max(args.anp_eps) if anp_eps is None else anp_eps,
        iterations=args.anp_iterations,
        seed=seed,
    )
    clip = ActivationClip(
        clean=clean,
        layers=CLIP_LAYERS,
        quantile=max(args.clip_q) if clip_q is None else clip_q,
        at=0,
        seed=seed,
    )
    nc = TriggerUnlearn(
        clean=clean,
        num_classes=10,
        at=0,
        steps=args.nc_steps,
        fallback=args.nc_fallback,
        epochs=args.nc_epochs,
        lr=lr if nc_lr is None else nc_lr,
        seed=seed,
    )

    def distill(patches: int) -> FreshDistill:  # "fresh" (no patches) and "freshpatch"
        return FreshDistill(
            clean=clean,
            proxy=PublicData(num_samples=FRESH_PROXY[0], seed=FRESH_PROXY[1]),
            at=0,
            epochs=args.fresh_epochs,
            lr=lr,
            temperature=max(args.fresh_t) if fresh_t is None else fresh_t,
            alpha=args.fresh_alpha,
            patches=patches,
            init_seed=seed,
            seed=seed,
        )

    seam = SEAM(clean=clean, at=0, forget_lr=args.seam_forget_lr, epochs=args.seam_epochs, lr=lr, seed=seed)
    return {
        "fp": [fp],
        "nad": [nad],
        "mcr": [mcr],
        "fp+nad": [fp, nad],
        "ibau": [ibau],
        "anp": [anp],
        "clip": [clip],
        "nc": [nc],
        "fresh": [distill(0)],
        "freshpatch": [distill(args.fresh_patches)],
        "seam": [seam],
    }[name]


def repair_nc(
    model: nn.Module,
    clean: PublicData,
    select: PublicData,
    seed: int,
    args: argparse.Namespace,
    base: float | None = None,
) -> tuple[nn.Module, float, dict[str, Any]]:
    """``(repaired copy, lr, detection)`` of trigger unlearning: the triggers are reversed once (the inversion does
    not depend on the learning rate), then the unlearning runs at the largest ``--defence-lr`` whose repaired copy
    stays within ``--select-drop`` of the unrepaired model's accuracy on the selection records (the smallest when
    none does), as :func:`repair_selected` chooses. ``detection``: the flagged and the unlearnt classes, the largest
    anomaly index, every class's mask norm, and the positions where the unlearnt masks exceed 0.5. ``base``: the
    selection accuracy to stay within ``--select-drop`` of (default ``model``'s; a chain passes the model it started
    from, so the chain spends one budget). The learning rates are ``--nc-lr`` when given, else ``--defence-lr``.
    Never the test set, never the trigger."""
    lrs = sorted(args.nc_lr or args.defence_lr, reverse=True)
    base = accuracy(model, select.x, select.y) if base is None else base
    nc = post_defence("nc", clean, seed, args, nc_lr=lrs[0])[0]
    fixed = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100)  # as repair() seeds it
        record = nc.defend(None, fixed, 0)  # inversion and unlearning at the largest lr
    for lr in lrs[1:]:
        if accuracy(fixed, select.x, select.y) >= base - args.select_drop:
            break
        nc.lr = lr  # unlearning again from the unrepaired model with the same reversed triggers and batches
        fixed = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 100)
            nc.unlearn(fixed, record["unlearned_classes"])
    keys = ("flagged_classes", "unlearned_classes", "max_anomaly", "norms", "positions")
    return fixed, nc.lr, {k: record[k] for k in keys}


def repair_selected(
    model: nn.Module,
    post: str,
    clean: PublicData,
    select: PublicData,
    seed: int,
    args: argparse.Namespace,
    fp_ratio: float | None,
    ibau_eps: float | None = None,
) -> tuple[nn.Module, float]:
    """``(repaired copy, lr)``: with one ``--defence-lr``, :func:`repair` with it; with several, the largest whose
    repaired model's accuracy on the server's selection records ``select`` (clean records no defence trains on)
    stays within ``--select-drop`` of the unrepaired model's, or the smallest when none does. The test set and
    the trigger are never used."""
    lrs = sorted(args.defence_lr, reverse=True)
    base = accuracy(model, select.x, select.y) if len(lrs) > 1 else 0.0
    for lr in lrs:
        fixed = repair(model, post_defence(post, clean, seed, args, fp_ratio, lr, ibau_eps), seed)
        if len(lrs) == 1 or accuracy(fixed, select.x, select.y) >= base - args.select_drop:
            break
    return fixed, lr


def full_trigger(trigger: tuple[Any, ...]) -> tuple[int | None, str, int, float]:
    """``(start, pattern, size, value)`` of a trigger given as ``(start, pattern)`` (the size and value
    ``TRIGGER_SIZE`` and ``TRIGGER_VALUE``) or in full (``--trigger-size`` / ``--trigger-value``)."""
    if len(trigger) == 2:
        return trigger[0], trigger[1], TRIGGER_SIZE, TRIGGER_VALUE
    return trigger[0], trigger[1], int(trigger[2]), float(trigger[3])


def trigger_tag(trigger: tuple[Any, ...]) -> str:
    """The saved model's name suffix of a trigger ``(start, pattern)`` or ``(start, pattern, size, value)``: none for
    the default (the names are unchanged), ``-trigger18constant`` otherwise, ``-trigger10constant-size6-value2.5``
    for another size or value, so a model trained with another trigger is saved apart."""
    start, pattern, size, value = full_trigger(trigger)
    extra = "" if (size, value) == (TRIGGER_SIZE, TRIGGER_VALUE) else f"-size{size}-value{value:g}"
    return "" if (start, pattern) == DEFAULT_TRIGGER and not extra else f"-trigger{start}{pattern}{extra}"


def attack_seed_tag(offset: int) -> str:
    """The saved model's name suffix of an ``--attack-seed-offset``: none for 0 (the names are unchanged),
    ``-attackseed+1`` otherwise, so a model trained against another malicious set is saved apart."""
    return "" if offset == 0 else f"-attackseed{offset:+d}"


def saved_path(
    models: Path,
    clients: int,
    fraction: float,
    attack: str,
    seed: int,
    defence: str = "none",
    trigger: tuple[int | None, str] = DEFAULT_TRIGGER,
    attack_seed_offset: int = 0,
) -> Path:
    """Where ``--models`` keeps the final model of one training run (``defence`` "none": the undefended one)."""
    tag = (
        ("" if defence == "none" else f"-{defence}")
        + trigger_tag(trigger)
        + attack_seed_tag(attack_seed_offset)
    )
    return models / f"{clients}-{fraction}-{attack}-{seed}{tag}.pt"


def set_path(saved: Path) -> Path:
    """The file beside a saved model that lists the malicious clients it was trained against."""
    return saved.with_name(saved.stem + ".malicious.json")


def check_saved_set(saved: Path, malicious: list[int]) -> None:
    """Refuse to reuse a saved model trained against another malicious set than ``malicious``.

    Raises:
        SystemExit: the list beside the model is missing (a model saved before the fixed set got its own random
            stream, when it shared round 13's client sample) or names other clients.
    """
    listed = set_path(saved)
    kept = json.loads(listed.read_text())["malicious"] if listed.exists() else None
    if kept != malicious:
        raise SystemExit(
            f"{saved} was trained against the malicious clients {kept if kept is not None else '(not recorded)'}, "
            f"this run's are {malicious}: a model saved before the fixed malicious set got its own random stream, "
            "or of another attack seed; give --models a fresh folder"
        )


def load_saved(
    models: Path, attack: str, seed: int, trigger: tuple[int | None, str] = DEFAULT_TRIGGER
) -> MNIST1DCNN:
    """The saved undefended model of the 20-client, 20 % run ``attack``/``seed``/``trigger`` (its attack seeded like
    the run), in eval mode; refused (``SystemExit``) when it was trained against another malicious set."""
    saved = saved_path(models, 20, 0.2, attack, seed, trigger=trigger)
    check_saved_set(saved, malicious_clients(0.2, 20, seed))
    model = seeded_model(seed)
    model.load_state_dict(torch.load(saved))
    return model.eval()


def seeded_model(seed: int) -> MNIST1DCNN:
    """fedavg.yaml's model, its initial weights seeded."""
    L.seed_everything(seed, verbose=False)
    return MNIST1DCNN(channels=25, lr=0.05, optimizer="sgd", momentum=0.9)


def test_tensors(dm: MNIST1DDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split as two tensors."""
    data = dm.test_dataloader().dataset
    if isinstance(data, torch.utils.data.TensorDataset):
        return data.tensors[0], data.tensors[1]
    return shard_tensors(data)


def measure(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, trigger: tuple[Any, ...] = DEFAULT_TRIGGER
) -> dict[str, float]:
    """Clean test accuracy and the attack success rate of the benchmark's trigger (its ``(start, pattern)``, or
    ``(start, pattern, size, value)``: :func:`full_trigger`)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=500)
    start, pattern, size, value = full_trigger(trigger)
    return {
        "acc": accuracy(model, x, y),
        "asr": attack_success_rate(model, loader, TARGET, size, value, start, pattern),
    }


def train(
    args: argparse.Namespace,
    clients: int,
    seed: int,
    attack: Attack | None,
    defence: str,
    out: Path,
    test_every: int = 0,
    assumed: float = 0.0,
) -> tuple[nn.Module, dict[str, Any], MNIST1DDataModule]:
    """One FedLoop run: the final global model, what was recorded (detection, curve), the data module. Without an
    attack the rule is sized for an ``assumed`` malicious share."""
    per_round = min(args.per_round, clients)
    fraction = attack.fraction if attack is not None else assumed
    agg = make_aggregator(defence, fraction, per_round, seed, args.local_epochs, attack)
    if defence == "feddf":
        strategy: Any = FedDF(
            public=PublicData(num_samples=1000, seed=7),
            proxy_size=1000,
            distill_steps=args.distill_steps,
            distill_lr=1e-3,
            temperature=1.0,
            seed=seed,
        )
    elif defence in ("lossfilter", "lossfilter_round"):  # the step of each reply on the server's clean records
        strategy = LossFilter(
            clean=PublicData(num_samples=args.loss_clean, seed=7, labeled=True), record=defence == "lossfilter"
        )
    elif defence == "foolsgold":
        strategy = FoolsGold(layers=args.fg_layers, kappa=args.fg_kappa)
    elif defence in ("reputation", "reputation_roundnorm"):  # refilter_krum's test with the clients' records
        byz = min((per_round - 3) // 2, math.ceil(fraction * per_round) + 1)
        strategy = ReputationFilter(
            reference="krum",
            byzantine=byz,
            min_cosine=0.0,
            max_norm_ratio=3.0,
            norm_memory=defence == "reputation",
        )
    else:
        strategy = FedAvg(aggregator=agg)
    callbacks: list[Any] = [RoundLRDecay(schedule="cosine", min_scale=0.1)]
    detection = weight_log = None
    if attack is not None:
        callbacks.append(attack)
        if isinstance(agg, Oracle):
            callbacks.append(agg.feed)
        if defence in DETECTS:
            # FoolsGold, ReputationFilter and LossFilter are strategies that keep `last`; the other rules are aggregators
            owner = agg if agg is not None else strategy
            detection = Detection(attack, owner, flag=DETECTS[defence])
            callbacks.append(detection)
        if defence == "foolsgold":
            weight_log = WeightLog(attack, strategy)
            callbacks.insert(0, weight_log)
    dm = MNIST1DDataModule(batch_size=16, num_samples=args.samples)
    loop = FedLoop(
        num_clients=clients,
        clients_per_round=per_round,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        partition=Dirichlet(alpha=0.5, min_samples=args.min_samples),
        strategy=strategy,
        callbacks=callbacks,
        eval_every=args.rounds,
        test_every=test_every,
        checkpoint_every=0,
        output_dir=str(out),
        seed=seed,
        verbose=False,
        plot=False,
        loggers=[],
    )
    model = seeded_model(seed)
    try:
        result = loop.fit(model, dm)
    except RoundsFailed as err:  # the attack wrecked the model: every reply rejected (e.g. non-finite losses)
        return model, {"collapsed": str(err).splitlines()[0]}, dm
    record: dict[str, Any] = {"skipped": int(sum(h.get("skipped", 0) for h in result.history))}
    if isinstance(strategy, LossFilter):
        record["loss_clean"] = len(strategy.clean)
    if detection is not None:
        record["detection"] = detection.totals()
    if weight_log is not None:
        record["fg_weight"] = weight_log.means()
    if test_every:
        record["curve"] = [(int(h["round"]), h["test_acc"]) for h in result.history if "test_acc" in h]
    return model, record, dm


def repair(model: nn.Module, defences: list[Any], seed: int) -> nn.Module:
    """A repaired copy of ``model``: each defence's step in order, with torch's generator seeded and restored."""
    fixed = copy.deepcopy(model)
    for i, defence in enumerate(defences):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 100 + i)
            defence.defend(None, fixed, 0)
    return fixed


def run_seed(
    args: argparse.Namespace, clients: int, seed: int, emit: Callable[[dict[str, Any]], None]
) -> None:
    """Every requested (fraction, attack, defence) cell of one setting and seed, plus the clean reference."""
    clean = PublicData(num_samples=500, seed=7, labeled=True)
    select = PublicData(num_samples=args.select_samples, seed=8, labeled=True)
    trigger: tuple[Any, ...] = (args.trigger_start, args.trigger_pattern)
    if (args.trigger_size, args.trigger_value) != (TRIGGER_SIZE, TRIGGER_VALUE):
        trigger = (*trigger, args.trigger_size, args.trigger_value)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        dm = MNIST1DDataModule(batch_size=16, num_samples=args.samples)
        dm.prepare_data()
        dm.setup("test")
        x, y = test_tensors(dm)
        if "clean" in args.attacks:  # the reference, and each rule's cost without an attack
            rules = [d for d in args.defences if d in AGGREGATION] if args.clean_rules else ["none"]
            # without an attack the oracle drops nothing: its clean run is plain FedAvg, the reference
            rules = list(dict.fromkeys("none" if r == "oracle" else r for r in rules))
            for rule in rules:
                t0 = time.perf_counter()
                assumed = max(args.fractions) if rule != "none" else 0.0
                model, rec, _ = train(args, clients, seed, None, rule, out / f"clean-{rule}", assumed=assumed)
                emit(
                    {
                        "clients": clients,
                        "seed": seed,
                        "fraction": 0.0,
                        "attack": "clean",
                        "defence": rule,
                        **({"assumed": assumed} if rule != "none" else {}),
                        **measure(model, x, y, trigger),
                        **rec,
                        "seconds": time.perf_counter() - t0,
                    }
                )
        for fraction in args.fractions:
            for attack_name in [a for a in args.attacks if a != "clean"]:
                backdoor = attack_name in BACKDOORS
                defences = [d for d in args.defences if d in AGGREGATION or (backdoor and d == "feddf")]
                posts = [d for d in args.defences if d in POST or d in COMBOS] if backdoor else []
                for rule in dict.fromkeys(split_post(d)[0] for d in posts):  # the models they repair
                    if rule not in defences:
                        defences.insert(0, rule)
                for defence in defences:
                    t0 = time.perf_counter()
                    attack_seed = seed + args.attack_seed_offset
                    attack = make_attack(attack_name, fraction, attack_seed, args.boost, trigger, args.rounds)
                    saved = (
                        saved_path(
                            args.models,
                            clients,
                            fraction,
                            attack_name,
                            seed,
                            defence,
                            trigger,
                            args.attack_seed_offset,
                        )
                        if args.models is not None and backdoor and defence != "feddf"
                        else None
                    )
                    bad = attack.malicious(0, clients)
                    if saved is not None and saved.exists():  # the same run, trained before
                        check_saved_set(saved, bad)
                        model, rec = seeded_model(seed), {"reused": True}
                        model.load_state_dict(torch.load(saved))
                    else:
                        model, rec, _ = train(
                            args, clients, seed, attack, defence, out / f"{attack_name}-{defence}"
                        )
                        if saved is not None:
                            saved.parent.mkdir(parents=True, exist_ok=True)
                            torch.save(model.state_dict(), saved)
                            set_path(saved).write_text(json.dumps({"malicious": bad}))
                    row = {
                        "clients": clients,
                        "seed": seed,
                        "fraction": fraction,
                        "attack": attack_name,
                        "defence": defence,
                        "attack_seed": attack_seed,
                        **({"trigger": list(trigger)} if trigger != DEFAULT_TRIGGER else {}),
                        **measure(model, x, y, trigger),
                        **rec,
                        "seconds": time.perf_counter() - t0,
                    }
                    emit(row)
                    chosen: list[float] = []  # fine-pruning's ratio for this model, chosen once
                    chosen_eps: list[float] = []  # I-BAU's radius for this model, chosen once
                    detected: dict[str, Any] = {}  # what trigger unlearning flagged and unlearnt
                    for column in [d for d in posts if split_post(d)[0] == defence]:
                        t0 = time.perf_counter()
                        post = split_post(column)[1]
                        extra: dict[str, Any] = {}
                        ratio = None
                        if "fp" in post and args.fp_max_drop is not None:
                            chosen = chosen or [choose_fp_ratio(model, clean, select, seed, args)]
                            ratio = chosen[0]
                        eps = None
                        if post == "ibau" and len(args.ibau_eps) > 1:
                            chosen_eps = chosen_eps or [choose_ibau_eps(model, clean, select, seed, args)]
                            eps = chosen_eps[0]
                        if post == "anp":  # no learning rate: the bound (in "defence_lr") and the threshold
                            anp_eps, eps = choose_anp(model, clean, select, seed, args)
                            fixed = repair(
                                model,
                                post_defence("anp", clean, seed, args, anp_threshold=eps, anp_eps=anp_eps),
                                seed,
                            )
                            lr = anp_eps
                        elif post == "nc":  # the reversed triggers once, the unlearning's lr chosen
                            fixed, lr, detected = repair_nc(model, clean, select, seed, args)
                        elif post == "clip":  # no learning rate: the quantile
                            eps = choose_clip_quantile(model, clean, select, seed, args)
                            fixed = repair(model, post_defence("clip", clean, seed, args, clip_q=eps), seed)
                            lr = None
                        elif post in ("fresh", "freshpatch"):  # the first --defence-lr; the temperature chosen
                            cands = fresh_candidates(model, clean, select, seed, args, post)
                            eps, fixed = choose_fresh_temperature(model, clean, select, seed, args, post, cands)
                            extra = {  # every temperature's student, for the record (the choice never reads it)
                                "fresh_candidates": [
                                    {"t": t, "select_acc": a, **measure(m, x, y, trigger)} for t, a, m in cands
                                ]
                            }
                            lr = args.defence_lr[0]
                        elif post == "fresh+nc":  # the student unlearns; one budget against the teacher
                            eps, student = choose_fresh_temperature(model, clean, select, seed, args)
                            base = accuracy(model, select.x, select.y)
                            fixed, lr, detected = repair_nc(student, clean, select, seed, args, base=base)
                        else:
                            fixed, lr = repair_selected(model, post, clean, select, seed, args, ratio, eps)
                        emit(
                            {
                                **{
                                    k: v for k, v in row.items() if k != "reused"
                                },  # this cell is computed now
                                "defence": column,
                                **measure(fixed, x, y, trigger),
                                "defence_lr": lr,
                                **({"nc": detected} if post in ("nc", "fresh+nc") else {}),
                                **extra,
                                **({"fp_ratio": ratio} if ratio is not None else {}),
                                **(
                                    {
                                        {
                                            "ibau": "ibau_eps",
                                            "anp": "anp_threshold",
                                            "clip": "clip_quantile",
                                            "fresh": "fresh_temperature",
                                            "freshpatch": "fresh_temperature",
                                            "fresh+nc": "fresh_temperature",
                                        }[post]: eps
                                    }
                                    if eps is not None
                                    else {}
                                ),
                                "seconds": time.perf_counter() - t0,
                            }
                        )


def curve(args: argparse.Namespace) -> None:
    """Clean FedAvg's test accuracy every 5 rounds, per requested setting and seed."""
    console = Console()
    table = Table(
        title=f"Clean FedAvg, test accuracy against rounds ({args.local_epochs} local epochs, "
        f"cosine decay over {args.rounds} rounds)"
    )
    table.add_column("clients")
    table.add_column("seed")
    table.add_column("seconds", justify="right")
    rounds = list(range(5, args.rounds + 1, 5))
    for r in rounds:
        table.add_column(f"r{r}", justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for clients in args.clients:
            for seed in args.seeds:
                t0 = time.perf_counter()
                _, rec, _ = train(
                    args, clients, seed, None, "none", Path(tmp) / f"c{clients}s{seed}", test_every=5
                )
                accs = dict(rec["curve"])
                table.add_row(
                    str(clients),
                    str(seed),
                    f"{time.perf_counter() - t0:.0f}",
                    *[f"{100 * accs[r]:.1f}" if r in accs else "" for r in rounds],
                )
    console.print(table)


def cell(rows: list[dict[str, Any]], key: str, seeds: int = 0) -> str:
    """``mean ±sd`` in percent of ``key`` over ``rows`` (``-`` when none; ``(n=k)`` when fewer than ``seeds``;
    ``†k`` when k of the runs stopped early because every reply was rejected: the model they left is measured)."""
    vals = [100 * r[key] for r in rows if key in r and not math.isnan(r[key])]
    if not vals:
        return "-"
    sd = f" ±{statistics.stdev(vals):.1f}" if len(vals) > 1 else ""
    dead = sum(1 for r in rows if r.get("collapsed"))
    return (
        f"{statistics.fmean(vals):.1f}{sd}"
        + (f" (n={len(vals)})" if len(vals) < seeds else "")
        + (f" †{dead}" if dead and key == "acc" else "")
    )


Grid = tuple[str, list[str], list[list[str]], str]


def grids(rows: list[dict[str, Any]]) -> list[Grid]:
    """``(title, header, body, footnote)`` of the accuracy / attack-success table and of the detection table of
    every setting and fraction in ``rows``."""
    out: list[Grid] = []
    for clients in sorted({r["clients"] for r in rows}):
        mine = [r for r in rows if r["clients"] == clients]
        ref = [r for r in mine if r["attack"] == "clean" and r["defence"] == "none"]
        seeds = sorted({r["seed"] for r in mine})
        n = len(seeds)
        for fraction in sorted({r["fraction"] for r in mine if r["attack"] != "clean"}):
            here = [r for r in mine if r["fraction"] == fraction]
            here += [
                r for r in mine if r["attack"] == "clean" and r.get("assumed") == fraction
            ]  # a rule's cost
            defences = [d for d in DEFENCES if any(r["defence"] == d for r in here)]
            attacks = [a for a in ("clean", *ATTACKS) if any(r["attack"] == a for r in here)]
            body = []
            for attack in attacks:
                cells = [LABELS[attack]]
                for d in defences:
                    got = [r for r in here if r["attack"] == attack and r["defence"] == d]
                    if not got and attack == "clean" and d == "none":
                        got = ref
                    if not got:
                        cells.append("n/a¹" if attack in BYZANTINE and d in (*POST, *COMBOS, "feddf") else "")
                    elif attack in BACKDOORS:
                        cells.append(f"{cell(got, 'acc', n)} / {cell(got, 'asr', n)}")
                    else:
                        cells.append(cell(got, "acc", n))
                body.append(cells)
            title = (
                f"{clients} clients, {100 * fraction:.0f} % malicious, seeds {seeds}: clean test accuracy % "
                f"(backdoor rows: accuracy % / attack success rate %), mean ±sd; clean FedAvg "
                f"{cell(ref, 'acc', n)} %"
            )
            note = (
                "¹ a post-training backdoor defence does not repair a model wrecked by a byzantine attack; "
                "FedDF runs under the backdoors only."
                + (
                    " †k: k of the seeds' runs stopped early (every reply rejected, e.g. non-finite losses); the "
                    "global model they left is measured."
                    if any(r.get("collapsed") for r in here)
                    else ""
                )
            )
            out.append((title, ["attack", *[LABELS[d] for d in defences]], body, note))
            detecting = [d for d in defences if d in DETECTS]
            if not detecting:
                continue
            det = []
            for attack in attacks:
                cells = [LABELS[attack]]
                for d in detecting:
                    got = [
                        r["detection"]
                        for r in here
                        if r["attack"] == attack and r["defence"] == d and "detection" in r
                    ]
                    cells.append(f"{cell(got, 'precision', n)} / {cell(got, 'recall', n)}" if got else "")
                det.append(cells)
            out.append(
                (
                    (
                        f"{clients} clients, {100 * fraction:.0f} % malicious: detection over the run, precision % "
                        "/ recall % (replies dropped by multi-Krum, FLAME, the reference and reputation filters and the oracle, given "
                        "trust 0 by FLTrust, weight 0 by FoolsGold, clipped by the norm bounds)"
                    ),
                    ["attack", *[LABELS[d] for d in detecting]],
                    det,
                    "",
                )
            )
    return out


def tables(rows: list[dict[str, Any]], console: Console, markdown: bool = False) -> None:
    """Print :func:`grids` as rich tables (or Markdown) and the compute spent."""
    for title, header, body, note in grids(rows):
        if markdown:
            console.print(f"\n{title}\n", markup=False, highlight=False, soft_wrap=True)
            lines = [header, ["---"] * len(header), *body]
            for line in lines:
                console.print("| " + " | ".join(line) + " |", markup=False, highlight=False, soft_wrap=True)
        else:
            table = Table(title=title)
            for i, h in enumerate(header):
                table.add_column(h, justify="left" if i == 0 else "right")
            for line in body:
                table.add_row(*line)
            console.print(table)
        if note:
            console.print(note, markup=False, highlight=False, soft_wrap=True)
    for clients in sorted({r["clients"] for r in rows}):
        mine = [r for r in rows if r["clients"] == clients]
        console.print(f"{clients} clients: {len(mine)} cells, {sum(r['seconds'] for r in mine) / 60:.1f} min")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--clients", type=int, nargs="+", default=[20], help="settings: number of clients (20, 100)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--fractions", type=float, nargs="+", default=[0.1, 0.2], help="shares of malicious clients"
    )
    p.add_argument(
        "--attacks",
        nargs="+",
        default=["clean", *ATTACKS],
        choices=["clean", *ATTACKS],
        help="rows (clean: the reference run without attack)",
    )
    p.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=DEFENCES)
    p.add_argument(
        "--clean-rules",
        action="store_true",
        help="the clean row with each requested aggregation rule ('none' only when requested; sized for the "
        "largest --fractions share): the rule's cost without an attack",
    )
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--per-round", type=int, default=10, help="clients per round")
    p.add_argument("--samples", type=int, default=5000, help="MNIST-1D samples (80 %% train, 20 %% test)")
    p.add_argument("--min-samples", type=int, default=10, help="Dirichlet's minimum records per client")
    p.add_argument(
        "--boost",
        type=float,
        default=5.0,
        help="model replacement's boost (the paper's n / eta, shared by the round's expected attackers)",
    )
    p.add_argument("--distill-steps", type=int, default=100, help="FedDF's distillation steps per round")
    p.add_argument(
        "--fp-ratio", type=float, default=0.6, help="fine-pruning: share of conv3's channels removed"
    )
    p.add_argument(
        "--fp-max-drop",
        type=float,
        help="fine-pruning: choose the ratio per model on the selection records (the largest of 0.1, 0.2, ... "
        "up to --fp-ratio whose fine-tuned accuracy is within this of the unrepaired model's); unset: --fp-ratio",
    )
    p.add_argument(
        "--fp-epochs", type=int, default=10, help="fine-pruning: fine-tuning epochs on the clean data"
    )
    p.add_argument("--nad-beta", type=float, default=100.0, help="NAD: weight of the attention loss")
    p.add_argument(
        "--nad-epochs", type=int, default=20, help="NAD: epochs of the teacher and of the distillation"
    )
    p.add_argument("--mcr-epochs", type=int, default=20, help="MCR: epochs of the endpoint and of the curve")
    p.add_argument(
        "--ibau-eps",
        type=float,
        nargs="+",
        default=[0.5],
        help="I-BAU: the perturbation's L2 radius, a share of the clean records' mean norm; several: the largest "
        "within --select-drop on the selection records",
    )
    p.add_argument("--ibau-rounds", type=int, default=20, help="I-BAU: alternations (one outer epoch each)")
    p.add_argument("--anp-iterations", type=int, default=2000, help="ANP: mask updates (the paper's 2000)")
    p.add_argument(
        "--anp-eps",
        type=float,
        nargs="+",
        default=[0.4],
        help="ANP: the neuron perturbations' bound (the paper's 0.4); several: chosen with the threshold on the "
        "selection records",
    )
    p.add_argument(
        "--clip-q",
        type=float,
        nargs="+",
        default=[1.0, 0.9999, 0.999, 0.995, 0.99, 0.98, 0.95],
        help="activation clipping: the bounds' quantile of the clean outputs; several: the smallest within "
        "--select-drop on the selection records",
    )
    p.add_argument(
        "--nc-steps",
        type=int,
        default=1000,
        help="trigger unlearning: Adam steps of the inversion (64 records each)",
    )
    p.add_argument("--nc-epochs", type=int, default=10, help="trigger unlearning: epochs of unlearning")
    p.add_argument(
        "--nc-lr",
        type=float,
        nargs="+",
        help="trigger unlearning: its learning rates to choose from (default: --defence-lr), e.g. for fresh+nc, "
        "whose distillation keeps the first --defence-lr",
    )
    p.add_argument(
        "--nc-fallback",
        default="smallest",
        choices=("none", "smallest", "all"),
        help="trigger unlearning when no class is flagged: nothing, the smallest-mask class's trigger, every class's",
    )
    p.add_argument("--ibau-steps", type=int, default=10, help="I-BAU: gradient-ascent steps per perturbation")
    p.add_argument(
        "--fresh-t",
        type=float,
        nargs="+",
        default=[4.0, 2.0, 1.0],
        help="distillation into a fresh model: the temperature; several: the lowest within --select-drop on the "
        "selection records",
    )
    p.add_argument(
        "--fresh-epochs",
        type=int,
        default=150,
        help="distillation into a fresh model: passes over the transfer set",
    )
    p.add_argument(
        "--fresh-patches",
        type=int,
        default=2,
        help="distillation into a fresh model with patched copies (freshpatch): patches written into each copy",
    )
    p.add_argument(
        "--fresh-alpha",
        type=float,
        default=0.5,
        help="distillation into a fresh model: weight of the clean records' cross-entropy (the rest: distillation)",
    )
    p.add_argument("--seam-forget-lr", type=float, default=0.1, help="SEAM: learning rate of the forgetting")
    p.add_argument("--seam-epochs", type=int, default=30, help="SEAM: epochs of the recovery")
    p.add_argument(
        "--defence-lr",
        type=float,
        nargs="+",
        default=[0.05],
        help="SGD lr of the clean-data defences; several: chosen per model on the selection records",
    )
    p.add_argument(
        "--select-drop",
        type=float,
        default=0.02,
        help="with several --defence-lr: the largest whose selection accuracy is within this of the unrepaired",
    )
    p.add_argument(
        "--select-samples",
        type=int,
        default=200,
        help="clean records the server holds apart to choose settings on (PublicData, generator seed 8)",
    )
    p.add_argument(
        "--loss-clean",
        type=int,
        default=200,
        help="the loss filter's clean records (PublicData, generator seed 7)",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke test: 1 seed, 2 rounds, 400 samples, few epochs"
    )
    p.add_argument("--curve", action="store_true", help="only clean FedAvg's accuracy every 5 rounds")
    p.add_argument(
        "--models", type=Path, help="keep the undefended backdoor models here (reused when present)"
    )
    p.add_argument(
        "--trigger-start",
        type=int,
        help="the backdoor trigger's first position (default: the last TRIGGER_SIZE values); training and the "
        "attack success rate both use it",
    )
    p.add_argument(
        "--trigger-pattern",
        default="alternating",
        choices=PATTERNS,
        help="the trigger's values: alternating +-3 (the default) or constant +3",
    )
    p.add_argument(
        "--trigger-size",
        type=int,
        default=TRIGGER_SIZE,
        help="the trigger's length in values (saved models of another size are named apart)",
    )
    p.add_argument(
        "--trigger-value",
        type=float,
        default=TRIGGER_VALUE,
        help="the trigger's magnitude (saved models of another value are named apart)",
    )
    p.add_argument(
        "--fg-layers",
        nargs="+",
        default=["head"],
        help="FoolsGold: the indicative layers whose update histories are compared (default: the output layer)",
    )
    p.add_argument(
        "--attack-seed-offset",
        type=int,
        default=0,
        help="every attack's seed is the run's seed plus this (training, sampling and data keep the run's seed): "
        "another malicious set for the same runs",
    )
    p.add_argument("--fg-kappa", type=float, default=1.0, help="FoolsGold: the logit's confidence kappa")
    p.add_argument("--json", type=Path, help="also write every cell's numbers here (one JSON list)")
    p.add_argument(
        "--load",
        type=Path,
        nargs="+",
        help="print the tables of saved JSON results (a later file's cell wins, unless it only reused a saved "
        "model) and exit",
    )
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    args = p.parse_args(argv)
    if not 1 <= args.trigger_size <= 40:
        p.error(f"--trigger-size {args.trigger_size}: MNIST-1D's records hold 1 to 40 values")
    if args.trigger_start is not None and not 0 <= args.trigger_start <= 40 - args.trigger_size:
        p.error(
            f"--trigger-start {args.trigger_start}: MNIST-1D's 40 values hold the trigger from 0 to "
            f"{40 - args.trigger_size}"
        )
    if args.quick:
        args.seeds, args.rounds, args.local_epochs, args.samples = args.seeds[:1], 2, 1, 500
        args.min_samples, args.distill_steps = 2, 2
        args.fp_epochs = args.nad_epochs = args.mcr_epochs = args.ibau_rounds = 1
        args.anp_iterations = args.nc_steps = 2
        args.nc_epochs = 1
        args.anp_iterations = 2
        args.fresh_epochs = args.seam_epochs = 1
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run (or load) the benchmark, print its tables, return its cells."""
    args = parse(argv)
    console = Console(width=250)
    if args.load:
        # A cell in a later file replaces the same cell (the same trigger and attack seed too) in an earlier one,
        # unless it only reused a saved model (its training run's record, e.g. detection, is in the earlier file).
        cells = {}
        for path in args.load:
            for r in json.loads(path.read_text()):
                key = (
                    r["clients"],
                    r["seed"],
                    r["fraction"],
                    r["attack"],
                    r["defence"],
                    tuple(r.get("trigger") or ()),
                    r.get("attack_seed", r["seed"]),
                )
                if not (r.get("reused") and key in cells):
                    cells[key] = r
        rows = list(cells.values())
        tables(rows, console, args.markdown)
        return rows
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning_fed").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    if args.curve:
        curve(args)
        return []
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        console.log(
            f"{row['clients']} clients, seed {row['seed']}, {row['fraction']:.0%} {row['attack']} / "
            f"{row['defence']}: acc {100 * row['acc']:.1f} asr {100 * row['asr']:.1f} "
            f"({row['seconds']:.1f} s)"
        )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=1))

    for clients in args.clients:
        for seed in args.seeds:
            run_seed(args, clients, seed, emit)
    tables(rows, console, args.markdown)
    return rows


if __name__ == "__main__":
    main()
