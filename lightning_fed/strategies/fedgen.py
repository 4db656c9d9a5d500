"""FedGen: data-free knowledge distillation with a server-side generator in the classifier's latent space.

Zhu, Hong & Zhou, "Data-Free Knowledge Distillation for Heterogeneous Federated Learning", ICML 2021.
Clients train and send weights as in FedAvg, plus their label counts. The server averages the weights and
then trains a small conditional generator ``G(z, y)`` that outputs latent vectors (the input space of the
classifier head) on which the ensemble of the received client heads predicts ``y`` (each client's head
weighted by its share of label ``y``). Clients receive the generator and add a regulariser to their loss:
``alpha * CE(head(G(z, y')), y')`` for labels ``y'`` drawn from the global label distribution, and
``beta * KL(softmax(head(G(z, y))) || softmax(model(x)))`` for the batch's own labels ``y``; both weights
decay by ``decay`` per round (the paper: ``alpha = beta = 10``, decay 0.98).

FedGen averages whole models, so all clients must share one architecture: tiers that add architectures
are refused. Models need ``features(x)`` and a linear ``head`` (e.g. MNIST1DCNN).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.callbacks.kd_losses import kd_loss
from lightning_fed.callbacks.step_hook import ForwardCapture, TrainingStepHook, step_loss, with_loss
from lightning_fed.protocol import Instruction, Payload, PayloadSpec, Reply, TensorSpec
from lightning_fed.seeding import Stream, generator
from lightning_fed.strategies.aggregators import Aggregator, resolve_aggregator
from lightning_fed.strategies.base import Strategy
from lightning_fed.strategies.server_opt import ServerOptimizer, resolve_server_optimizer
from lightning_fed.strategies.tiers import ModelTiers, TierAverage, require_homogeneous
from lightning_fed.weights import float_state, load_into

log = logging.getLogger("lightning_fed")


class LatentGenerator(nn.Module):
    """``G(z, y)``: noise and a one-hot label to a latent vector of the classifier head's input width."""

    def __init__(self, noise_dim: int, num_classes: int, hidden: int, latent_dim: int) -> None:
        super().__init__()
        self.noise_dim, self.num_classes = noise_dim, num_classes
        self.net = nn.Sequential(nn.Linear(noise_dim + num_classes, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, latent_dim), nn.ReLU())

    def forward(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Latent vectors for labels ``y`` (fresh noise each call)."""
        z = torch.randn(len(y), self.noise_dim, generator=generator).to(y.device)
        return self.net(torch.cat([z, F.one_hot(y, self.num_classes).float()], dim=1))


class FedGenClient(FedCallback):
    """Client side of FedGen: the generator regulariser, and the label counts of the last local epoch.

    Under a plain ``lightning.Trainer`` call :meth:`configure` with a generator's state first.

    Example::

        cb = FedGenClient(generator=LatentGenerator(16, 10, 64, 75))
        cb.configure(gen_state, label_dist, alpha=10.0, beta=10.0)
        L.Trainer(callbacks=[cb], max_epochs=1).fit(MNIST1DCNN(), dm)

    Args:
        generator: the generator module (its weights are set by :meth:`configure`).
        head: name of the classifier head submodule of the trained module.
    """

    def __init__(self, generator: LatentGenerator, head: str = "head") -> None:
        self.generator = generator
        self.head = head
        self.alpha = 0.0
        self.beta = 0.0
        self.label_dist: Tensor | None = None
        self.label_counts = torch.zeros(generator.num_classes)
        self._hook = TrainingStepHook(self._step)
        self._capture = ForwardCapture()
        self._trainer: Any = None
        self._module: Any = None

    def configure(self, generator_state: dict[str, Tensor] | None, label_dist: Tensor | None,
                  alpha: float, beta: float) -> None:
        """Load the generator and set this round's regulariser weights (``None`` state: no regulariser)."""
        if generator_state is not None:
            self.generator.load_state_dict(generator_state)
        self.label_dist = label_dist
        on = generator_state is not None and label_dist is not None and float(label_dist.sum()) > 0
        self.alpha, self.beta = (alpha, beta) if on else (0.0, 0.0)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Capture the module's logits; wrap ``training_step``."""
        self._trainer, self._module = trainer, pl_module
        self.label_counts = torch.zeros(self.generator.num_classes)
        self.generator.to(pl_module.device).eval().requires_grad_(False)
        self._capture.install(pl_module)
        self._hook.install(pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Unwrap."""
        self._hook.remove()
        self._capture.remove()

    def _step(self, original: Any, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
        self._capture.value = None
        out = original(batch, batch_idx, *args, **kwargs)
        logits = self._capture.value
        y = batch[1]
        t = self._trainer
        if t is not None and t.current_epoch == t.max_epochs - 1:
            self.label_counts += torch.bincount(y.detach().cpu(), minlength=self.generator.num_classes).float()
        loss = step_loss(out)
        if loss is None or (self.alpha == 0 and self.beta == 0) or self.label_dist is None:
            return out
        head = self._module.get_submodule(self.head)
        with torch.no_grad():
            y_s = torch.multinomial(self.label_dist.float(), len(y), replacement=True).to(y.device)
            z_s = self.generator(y_s)
            z_b = self.generator(y)
        extra = self.alpha * F.cross_entropy(head(z_s), y_s)
        if logits is not None and self.beta > 0:
            with torch.no_grad():
                teacher = head(z_b)
            extra = extra + self.beta * kd_loss(logits, teacher, 1.0)
        return with_loss(out, loss + extra)


class FedGen(Strategy):
    """FedAvg plus a server-trained latent generator that clients use as a regulariser.

    Example::

        strategy = FedGen(gen_steps=50, alpha=10.0, beta=10.0)
        FedLoop(strategy=strategy, ...).fit(MNIST1DCNN(), dm)

    Args:
        tiers: must add no architecture (FedGen averages whole models); kept for a clear error.
        noise_dim: generator noise width.
        gen_hidden: generator hidden width.
        gen_steps: generator optimizer steps per round.
        gen_lr: generator Adam learning rate.
        gen_batch_size: labels per generator step.
        alpha: weight of the CE regulariser on generated latents (round 0 value).
        beta: weight of the latent-teacher KL regulariser (round 0 value).
        decay: per-round decay of ``alpha`` and ``beta``.
        head: name of the classifier head submodule.
        seed: seed of the generator's noise.
        aggregator: the rule averaging the weight deltas (``None``:
            :class:`~lightning_fed.strategies.WeightedMean`).
        server_optimizer: how the aggregate is applied to the global weights (``None``: the plain step);
            its state is part of :meth:`state_dict`.
    """

    def __init__(self, *, tiers: ModelTiers | None = None, noise_dim: int = 16, gen_hidden: int = 64,
                 gen_steps: int = 50, gen_lr: float = 1e-3, gen_batch_size: int = 64, alpha: float = 10.0,
                 beta: float = 10.0, decay: float = 0.98, head: str = "head", seed: int = 0,
                 aggregator: Aggregator | None = None, server_optimizer: ServerOptimizer | None = None) -> None:
        require_homogeneous(tiers, "FedGen")
        for key, val, ok, allowed in (("noise_dim", noise_dim, noise_dim >= 1, ">= 1"),
                                      ("gen_hidden", gen_hidden, gen_hidden >= 1, ">= 1"),
                                      ("gen_steps", gen_steps, gen_steps >= 0, ">= 0"),
                                      ("gen_lr", gen_lr, gen_lr > 0, "> 0"),
                                      ("gen_batch_size", gen_batch_size, gen_batch_size >= 1, ">= 1"),
                                      ("alpha", alpha, alpha >= 0, ">= 0"), ("beta", beta, beta >= 0, ">= 0"),
                                      ("decay", decay, 0 < decay <= 1, "in (0, 1]")):
            if not ok:
                raise ValueError(f"FedGen: {key}={val} is not allowed; {key} must be {allowed}")
        self.noise_dim, self.gen_hidden, self.gen_steps, self.gen_lr = noise_dim, gen_hidden, gen_steps, gen_lr
        self.gen_batch_size, self.alpha, self.beta, self.decay = gen_batch_size, alpha, beta, decay
        self.head, self.seed = head, seed
        self.aggregator = resolve_aggregator("FedGen", aggregator)
        self.server_optimizer = resolve_server_optimizer("FedGen", server_optimizer)
        self.avg: TierAverage | None = None
        self.generator: LatentGenerator | None = None
        self.gen_opt: torch.optim.Optimizer | None = None
        self.client: FedGenClient | None = None
        self.label_counts: Tensor | None = None
        self.trained = False
        self.num_classes = 0

    def setup(self, model: nn.Module) -> None:
        """FedAvg state, and a generator sized to the model's head."""
        head = model.get_submodule(self.head) if hasattr(model, self.head) else None
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"FedGen: head={self.head!r} is not allowed for {type(model).__name__}; "
                "it must name the model's linear classifier head")
        self.num_classes = head.out_features
        self.avg = TierAverage(model, self.aggregator, self.server_optimizer)
        self.generator = LatentGenerator(self.noise_dim, self.num_classes, self.gen_hidden, head.in_features)
        self.gen_opt = torch.optim.Adam(self.generator.parameters(), lr=self.gen_lr)
        if self.client is None:
            self.client = FedGenClient(LatentGenerator(self.noise_dim, self.num_classes, self.gen_hidden,
                                                       head.in_features), head=self.head)
        self.label_counts = torch.zeros(self.num_classes)
        self.trained = False

    def _ready(self) -> tuple[TierAverage, LatentGenerator, FedGenClient]:
        if self.avg is None or self.generator is None or self.client is None:
            raise RuntimeError("FedGen.setup(model) must be called before use")
        return self.avg, self.generator, self.client

    def client_callbacks(self) -> list[Any]:
        """The client regulariser (built lazily at setup: its size depends on the model)."""
        return [_LazyClient(self)]

    def configure_round(self, server_round: int, clients: list[int]) -> list[Instruction]:
        """Global weights, the generator and the label distribution (one shared payload)."""
        avg, gen, _ = self._ready()
        payload = {f"w/{k}": v for k, v in avg.payload().items()}
        if self.trained:
            payload.update({f"g/{k}": v.detach().clone() for k, v in gen.state_dict().items()})
            payload["label_dist"] = self.label_counts / self.label_counts.sum().clamp_min(1)
        scale = self.decay ** server_round
        config = {"gen_alpha": self.alpha * scale, "gen_beta": self.beta * scale}
        return [Instruction(cid, payload, dict(config)) for cid in clients]

    def client_receive(self, model: nn.Module, instruction: Instruction) -> None:
        """Load the global weights; hand the generator to the client callback."""
        _, _, client = self._ready()
        p = instruction.payload
        load_into(model, {k[2:]: v for k, v in p.items() if k.startswith("w/")})
        gen = {k[2:]: v for k, v in p.items() if k.startswith("g/")} or None
        client.configure(gen, p.get("label_dist"), float(instruction.config.get("gen_alpha", 0.0)),
                         float(instruction.config.get("gen_beta", 0.0)))

    def client_reply(self, model: nn.Module, instruction: Instruction) -> Payload:
        """Weight deltas and the label counts of the last local epoch."""
        _, _, client = self._ready()
        local = float_state(model)
        out = {k: local[k[2:]].detach().float().cpu() - v.float() for k, v in instruction.payload.items()
               if k.startswith("w/")}
        out["label_counts"] = client.label_counts.clone().float()
        return out

    def reply_spec(self, instruction: Instruction) -> PayloadSpec:
        """The model's weights (``w/`` names) and ``[classes]`` label counts."""
        avg, _, _ = self._ready()
        spec = {f"w/{k}": v for k, v in avg.spec.tensor_specs().items()}
        spec["label_counts"] = TensorSpec((self.num_classes,), torch.float32)
        return spec

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """FedAvg of the weights, then generator training against the clients' heads."""
        avg, gen, _ = self._ready()
        assert self.gen_opt is not None and self.label_counts is not None
        good = [r for r in replies if not bool((r.payload["label_counts"] < 0).any())]
        if len(good) < len(replies):
            log.warning("round %d: FedGen dropped %d replies with negative label counts", server_round + 1,
                        len(replies) - len(good))
        if not good:
            return {"fedgen_rejected": float(len(replies))}
        base = avg.payload()
        w_key, b_key = f"{self.head}.weight", f"{self.head}.bias"
        heads = [(base[w_key] + r.payload[f"w/{w_key}"], base[b_key] + r.payload[f"w/{b_key}"]) for r in good]
        counts = torch.stack([r.payload["label_counts"].float() for r in good])  # [K, C]
        avg.average([{k[2:]: v for k, v in r.payload.items() if k.startswith("w/")} for r in good],
                     [r.num_examples for r in good])
        self.label_counts += counts.sum(0)
        metrics = {"fedgen_rejected": float(len(replies) - len(good))}
        if self.gen_steps and float(counts.sum()) > 0:
            metrics["generator_loss"] = self._train_generator(gen, heads, counts, server_round)
            self.trained = True
        return metrics

    def _train_generator(self, gen: LatentGenerator, heads: list[tuple[Tensor, Tensor]], counts: Tensor,
                         server_round: int) -> float:
        assert self.gen_opt is not None
        g = generator(self.seed, Stream.FEDGEN_GENERATOR, server_round)
        share = counts / counts.sum(0, keepdim=True).clamp_min(1e-8)  # [K, C]: client k's share of label c
        dist = counts.sum(0) / counts.sum()
        gen.train()
        last = 0.0
        with torch.enable_grad():
            for _ in range(self.gen_steps):
                y = torch.multinomial(dist, self.gen_batch_size, replacement=True, generator=g)
                z = gen(y, generator=g)
                loss = torch.zeros(())
                for k, (w, b) in enumerate(heads):
                    loss = loss + (share[k, y] * F.cross_entropy(z @ w.T + b, y, reduction="none")).mean()
                self.gen_opt.zero_grad(set_to_none=True)
                loss.backward()
                self.gen_opt.step()
                last = float(loss.detach())
        gen.eval()
        return last

    def load_global(self, model: nn.Module) -> None:
        """The global weights into the loop's model."""
        avg, _, _ = self._ready()
        load_into(model, avg.payload())

    def state_dict(self) -> dict[str, Any]:
        """Global weights and their server optimizer, generator and its optimizer, label counts."""
        avg, gen, _ = self._ready()
        assert self.gen_opt is not None and self.label_counts is not None
        return {"flat": avg.flat.clone(), "generator": {k: v.clone() for k, v in gen.state_dict().items()},
                "gen_opt": self.gen_opt.state_dict(), "label_counts": self.label_counts.clone(), "trained": self.trained,
                "server_optimizer": avg.server_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        avg, gen, _ = self._ready()
        assert self.gen_opt is not None
        avg.flat.copy_(state["flat"])
        if "server_optimizer" in state:
            avg.server_optimizer.load_state_dict(state["server_optimizer"])
        gen.load_state_dict(state["generator"])
        self.gen_opt.load_state_dict(state["gen_opt"])
        self.label_counts = state["label_counts"].clone()
        self.trained = bool(state["trained"])


class _LazyClient(FedCallback):
    """Forwards the training hooks to the strategy's :class:`FedGenClient`, which exists once setup ran."""

    def __init__(self, strategy: FedGen) -> None:
        self.strategy = strategy

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Forward."""
        if self.strategy.client is not None:
            self.strategy.client.on_train_start(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Forward."""
        if self.strategy.client is not None:
            self.strategy.client.on_train_end(trainer, pl_module)


__all__ = ["FedGen", "FedGenClient", "LatentGenerator"]
