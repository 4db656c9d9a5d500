"""FedGKT: group knowledge transfer between small client models and a large server model.

He, Annavaram & Avestimehr, "Group Knowledge Transfer: Federated Learning of Large CNNs at the Edge",
NeurIPS 2020. Every client keeps a small model, split into a feature extractor (its bottom layers) and a
classifier (the rest). After local training it sends, for its training samples, the extracted feature
maps, its logits and the labels. The server trains a large model on the feature maps (cross-entropy plus
KD from the client logits) and sends back its own logits on each client's samples; next round the client
adds KD from those server logits to its cross-entropy (``loss = CE + alpha * T^2 * KL``; the paper used
``alpha = 1``, ``T = 3``). No weights are exchanged. The model the paper evaluates is split inference:
the client's extractor followed by the server model.

Where the model is split (``split``): as in the paper, by default after the client's first layers, so the
server model continues from a feature map ``[C, L]`` (:class:`GKTConvServer`, convolutions). The client
model then implements ``extract(x, split)``, ``classify(h, split)`` and ``extract_shape(split)``, as
:class:`~lightning_fed.models.MNIST1DCNN` does. ``split=None`` splits before the last layer instead: the
model needs ``features(x)`` and a linear ``head``, and the server is an MLP (:class:`GKTServerModel`).
Clients of different tiers may have different feature widths: the server model starts with one adapter
per tier, followed by a shared trunk.

With ``assistant_chain`` (teacher-assistant distillation, :mod:`~lightning_fed.strategies.gkt_chain`) the
server's knowledge reaches one tier through smaller server-side assistants (e.g. server -> mid -> small).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_fed.callbacks.base import FedCallback
from lightning_fed.callbacks.kd_losses import kd_loss
from lightning_fed.callbacks.step_hook import ForwardCapture, TrainingStepHook, step_loss, with_loss
from lightning_fed.evaluate import stage_metrics
from lightning_fed.protocol import Instruction, Payload, PayloadSpec, Reply, TensorSpec
from lightning_fed.seeding import Stream, generator
from lightning_fed.strategies.gkt_chain import SERVER, GKTAssistants, fit_on_features
from lightning_fed.strategies.tiers import ModelTiers, OwnModels, tier_names, tier_of

log = logging.getLogger("lightning_fed")


def _key(row: Tensor) -> bytes:
    return row.detach().cpu().contiguous().numpy().tobytes()


class GKTServerModel(nn.Module):
    """The server's large model on client features: a linear adapter per tier, then a shared MLP trunk."""

    def __init__(self, feature_dims: list[int], num_classes: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(nn.Linear(d, hidden) for d in feature_dims)
        trunk: list[nn.Module] = []
        for _ in range(layers - 1):
            trunk += [nn.ReLU(), nn.Linear(hidden, hidden)]
        self.trunk = nn.Sequential(*trunk, nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, features: Tensor, tier: int) -> Tensor:
        """Logits of the features of a tier-``tier`` client."""
        return self.trunk(self.adapters[tier](features))


class GKTConvServer(nn.Module):
    """The server's large model on client feature maps ``[C_tier, L]``: a 1x1 convolution per tier to
    ``channels``, ``layers`` convolutions (kernel 3, stride 2 while the length is above 5), then an MLP head.

    Example::

        server = GKTConvServer([8, 16], length=19, num_classes=10, channels=64, hidden=256, layers=3)
        logits = server(torch.randn(4, 16, 19), tier=1)
    """

    def __init__(self, channel_dims: list[int], length: int, num_classes: int, channels: int, hidden: int,
                 layers: int) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(nn.Conv1d(c, channels, 1) for c in channel_dims)
        trunk: list[nn.Module] = []
        for _ in range(layers):
            stride = 2 if length > 5 else 1
            trunk += [nn.ReLU(), nn.Conv1d(channels, channels, 3, stride=stride, padding=1)]
            length = (length - 1) // stride + 1
        self.trunk = nn.Sequential(*trunk, nn.ReLU(), nn.Flatten(), nn.Linear(channels * length, hidden), nn.ReLU(),
                                   nn.Linear(hidden, num_classes))

    def forward(self, features: Tensor, tier: int) -> Tensor:
        """Logits of the feature maps of a tier-``tier`` client."""
        return self.trunk(self.adapters[tier](features))


class GKTComposed(L.LightningModule):
    """Evaluation-only: a client's extractor followed by the server model (split inference)."""

    def __init__(self, client: nn.Module, server: nn.Module, tier: int, extract: Callable[[nn.Module, Tensor], Tensor]
                 ) -> None:
        super().__init__()
        self.client = client
        self.server = server
        self.tier = tier
        self._extract = extract

    def forward(self, x: Tensor) -> Tensor:
        """Server logits of the client's features."""
        return self.server(self._extract(self.client, x), self.tier)


class GKTClient(FedCallback):
    """Client side of FedGKT: KD from the server's logits during training, and collection of the samples
    seen in the last local epoch (whose features, logits and labels are sent).

    Under a plain ``lightning.Trainer`` give the server logits with :meth:`set_server_logits`; the
    collected samples are in :attr:`collected` after ``fit``.

    Example::

        cb = GKTClient(alpha=1.0, temperature=3.0)
        cb.set_server_logits(x_local, server_logits)
        L.Trainer(callbacks=[cb], max_epochs=1).fit(model, dm)
        x, y = cb.collected

    Args:
        alpha: weight of the KD term.
        temperature: KD temperature.
        max_samples: at most this many samples are collected (and sent).
    """

    def __init__(self, alpha: float = 1.0, temperature: float = 3.0, max_samples: int = 4096) -> None:
        if alpha < 0:
            raise ValueError(f"GKTClient: alpha={alpha} is not allowed; alpha must be >= 0")
        if not temperature > 0:
            raise ValueError(f"GKTClient: temperature={temperature} is not allowed; it must be > 0")
        if max_samples < 1:
            raise ValueError(f"GKTClient: max_samples={max_samples} is not allowed; it must be >= 1")
        self.alpha = alpha
        self.temperature = temperature
        self.max_samples = max_samples
        self._rows: dict[bytes, int] = {}
        self._server: Tensor | None = None
        self._hook = TrainingStepHook(self._step)
        self._capture = ForwardCapture()
        self._trainer: Any = None
        self._xs: list[Tensor] = []
        self._ys: list[Tensor] = []
        self.collected: tuple[Tensor, Tensor] | None = None

    def set_server_logits(self, x: Tensor | None, logits: Tensor | None) -> None:
        """The server's logits for inputs ``x`` (rows matched by value); ``None`` clears them."""
        if x is None or logits is None or len(x) != len(logits):
            self._rows, self._server = {}, None
            return
        self._rows = {_key(r): i for i, r in enumerate(x)}
        self._server = logits.float()

    def on_client_start(self, trainer: Any, pl_module: Any, instruction: Instruction) -> None:
        """Pair the received server logits with the samples this client sent last time."""
        x = trainer.client_state.get("gkt_x")
        logits = instruction.payload.get("server_logits")
        if x is not None and logits is not None and len(x) != len(logits):
            log.warning("FedGKT: client %s got %d server logits for %d samples; ignored",
                        trainer.client_id, len(logits), len(x))
        self.set_server_logits(x, logits)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Capture the module's logits and wrap ``training_step``."""
        self._trainer = trainer
        self._xs, self._ys, self.collected = [], [], None
        self._capture.install(pl_module)
        self._hook.install(pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Unwrap; keep the last epoch's samples."""
        self._hook.remove()
        self._capture.remove()
        if self._xs:
            x, y = torch.cat(self._xs)[: self.max_samples], torch.cat(self._ys)[: self.max_samples]
            self.collected = (x, y)

    def on_client_end(self, trainer: Any, pl_module: Any, reply: Any) -> None:
        """Remember which samples were sent (the server's logits will come back in this order)."""
        if self.collected is not None:
            trainer.client_state["gkt_x"] = self.collected[0].clone()

    def _step(self, original: Any, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
        self._capture.value = None
        out = original(batch, batch_idx, *args, **kwargs)
        logits = self._capture.value
        x, y = batch[0], batch[1]
        t = self._trainer
        if t is not None and t.current_epoch == t.max_epochs - 1:
            self._xs.append(x.detach().cpu())
            self._ys.append(y.detach().cpu())
        loss = step_loss(out)
        if loss is None or self._server is None or logits is None or self.alpha == 0:
            return out
        idx = [self._rows.get(_key(r), -1) for r in x]
        mask = torch.tensor([i >= 0 for i in idx], device=x.device)
        if not bool(mask.any()):
            return out
        target = self._server[torch.tensor([i for i in idx if i >= 0])].to(x.device)
        return with_loss(out, loss + self.alpha * kd_loss(logits[mask], target, self.temperature))


class FedGKT(OwnModels):
    """Small client models, a large server model on their feature maps; KD both ways; no weights exchanged.

    Example::

        strategy = FedGKT(tiers=ModelTiers(models=[MNIST1DCNN(channels=16)]), split=1, server_channels=64)
        FedLoop(strategy=strategy, ...).fit(MNIST1DCNN(channels=8), dm)

    Evaluation logs ``tier<t>/test_acc`` (mean over evaluated clients' own models), ``server/test_acc``
    (split inference: the server model on those clients' extractors, the paper's model) and
    ``tier<t>/server_test_acc`` on the test data; the same with ``val`` for ``test`` on the validation data.

    Args:
        tiers: client architectures (each implements the split: ``extract``, ``classify``, ``extract_shape``;
            with ``split=None``, ``features(x)`` and a linear ``head``).
        split: where client models are split, passed to their ``extract(x, split)`` (for MNIST1DCNN: after
            convolution 1, 2 or 3); the features must be ``[C, L]`` maps of one length ``L`` across tiers and
            the server is a :class:`GKTConvServer`. ``None``: before the linear head, the server is an MLP
            on the flat features (:class:`GKTServerModel`).
        server_channels: channels of the convolutional server model (``split`` set).
        server_hidden: width of the server's MLP (its head with ``split`` set, all of it with ``split=None``).
        server_layers: convolutions of the server trunk (``split`` set) or linear layers after the adapter
            (``split=None``).
        server_epochs: passes of the server over the round's received features.
        server_lr: Adam learning rate of the server model.
        server_batch_size: server batch size.
        alpha: KD weight on both sides.
        temperature: KD temperature on both sides.
        max_samples: samples a client sends at most per round (caps the payload).
        feature_cache: keep the latest features, logits and labels of every client heard from and train the
            server on all of them each round (the paper's server trains on every client's features each round;
            with partial participation the cache stands in for the clients that sat out). Off by default: it
            holds every client's features in server memory, and on the MNIST-1D benchmark it did not help
            (``split=None``: server accuracy 30.7 % with it, 31.2 % without). ``False`` trains on the round's
            replies only.
        eval_clients: stored client models evaluated per tier.
        seed: seed of the server's batch order.
        assistant_chain: route of the server's logits to one tier through server-side assistants, e.g.
            ``["server", "mid", "small"]`` (``None``: every tier receives the server model's logits): each
            assistant learns from the previous model's logits on the round's feature maps, and the clients of the
            chain's last name (a tier, :class:`ModelTiers` ``names``) receive the logits of the model before it.
            Starts at ``"server"``; no name twice; sizes strictly decreasing.
        assistants: server-side assistants by name: the server model's architecture with this many channels
            (``split`` set; the MLP head's width scaled by the same factor) or this hidden width (``split=None``);
            trained with the server's optimizer settings, checkpointed, and evaluated (split inference) as
            ``assistant/<name>/<stage>_acc``.
    """

    def __init__(self, *, tiers: ModelTiers | None = None, split: int | None = 1, server_channels: int = 64,
                 server_hidden: int = 256, server_layers: int = 3, server_epochs: int = 2, server_lr: float = 1e-3,
                 server_batch_size: int = 64, alpha: float = 1.0, temperature: float = 3.0, max_samples: int = 4096,
                 feature_cache: bool = False, eval_clients: int = 5, seed: int = 0,
                 assistant_chain: list[str] | None = None, assistants: dict[str, int] | None = None) -> None:
        for key, val, ok, allowed in (("server_hidden", server_hidden, server_hidden >= 1, ">= 1"),
                                      ("server_channels", server_channels, server_channels >= 1, ">= 1"),
                                      ("server_layers", server_layers, server_layers >= 1, ">= 1"),
                                      ("server_epochs", server_epochs, server_epochs >= 0, ">= 0"),
                                      ("server_lr", server_lr, server_lr > 0, "> 0"),
                                      ("server_batch_size", server_batch_size, server_batch_size >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"FedGKT: {key}={val} is not allowed; {key} must be {allowed}")
        if assistant_chain is None and assistants:
            raise ValueError(f"FedGKT: assistants={sorted(assistants)} is not allowed without assistant_chain; name "
                             "them in assistant_chain, or leave assistants unset")
        self.chain = None if assistant_chain is None else GKTAssistants(
            assistant_chain, assistants, tiers, server_hidden if split is None else server_channels,
            "hidden units" if split is None else "channels")
        self.last_routes: list[tuple[str, str]] = []
        """``(teacher, student)`` pairs of the last round: the server-side steps, then who teaches each tier."""
        super().__init__(tiers=tiers, eval_clients=eval_clients)
        self.gkt = GKTClient(alpha=alpha, temperature=temperature, max_samples=max_samples)
        self.split, self.server_channels = split, server_channels
        self.server_hidden, self.server_layers, self.server_epochs = server_hidden, server_layers, server_epochs
        self.server_lr, self.server_batch_size = server_lr, server_batch_size
        self.alpha, self.temperature, self.max_samples, self.seed = alpha, temperature, max_samples, seed
        self.feature_cache = feature_cache
        self.cache: dict[int, dict[str, Tensor]] = {}
        self.feature_shapes: list[tuple[int, ...]] = []
        self.num_classes = 0
        self.server: nn.Module | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.server_logits: dict[int, Tensor] = {}
        self._composed: dict[tuple[str, int], GKTComposed] = {}

    def _feature_shape(self, t: int, m: nn.Module) -> tuple[int, ...]:
        name = type(m).__name__
        if self.split is None:
            if not callable(getattr(m, "features", None)) or not isinstance(getattr(m, "head", None), nn.Linear):
                raise ValueError(f"FedGKT: the tier-{t} model {name} is not allowed with split=None; client models "
                                 "need a features(x) method and a linear `head` (e.g. MNIST1DCNN)")
            return (m.head.in_features,)
        if not all(callable(getattr(m, f, None)) for f in ("extract", "classify", "extract_shape")):
            raise ValueError(f"FedGKT: the tier-{t} model {name} is not allowed with split={self.split}; client models "
                             "need extract(x, split), classify(h, split) and extract_shape(split) (e.g. MNIST1DCNN), "
                             "or use split=None with a features(x) method and a linear `head`")
        shape = tuple(int(d) for d in m.extract_shape(self.split))
        if len(shape) != 2:
            raise ValueError(f"FedGKT: the tier-{t} model {name} extracts features of shape {shape} at split="
                             f"{self.split}; the convolutional server needs [channels, length] maps")
        return shape

    def extract(self, model: nn.Module, x: Tensor) -> Tensor:
        """The client-side half: ``model``'s features at the split."""
        return model.features(x) if self.split is None else model.extract(x, self.split)

    def classify(self, model: nn.Module, h: Tensor) -> Tensor:
        """The client's own logits from its features."""
        return model.head(h) if self.split is None else model.classify(h, self.split)

    def setup(self, model: nn.Module) -> None:
        """Read every tier's feature shape and build the server model."""
        super().setup(model)
        shapes, classes = [], set()
        for t, m in enumerate(self.tier_modules()):
            shapes.append(self._feature_shape(t, m))
            with torch.no_grad():  # the width of the client's logits, from one zero feature map
                classes.add(int(self.classify(m, torch.zeros(1, *shapes[-1])).shape[-1]))
        if len(classes) != 1:
            raise ValueError(f"FedGKT: the tiers' heads have different numbers of classes {sorted(classes)}")
        self.feature_shapes, self.num_classes = shapes, classes.pop()
        if self.split is not None:
            lengths = {s[1] for s in shapes}
            if len(lengths) != 1:
                raise ValueError(f"FedGKT: at split={self.split} the tiers' feature maps have lengths {sorted(lengths)};"
                                 " the server model needs one length across tiers")
        self.server = self._server_model(self.server_hidden if self.split is None else self.server_channels)
        self.opt = torch.optim.Adam(self.server.parameters(), lr=self.server_lr)
        self.server_logits, self._composed, self.cache, self.last_routes = {}, {}, {}, []
        if self.chain is not None:
            self.chain.build(self._server_model, self.server, self.tier_modules(), self.server_lr)

    def _server_model(self, width: int) -> nn.Module:
        """A server-side model on the tiers' features: ``width`` channels (``split`` set; the head's hidden width
        scaled alike) or ``width`` hidden units (``split=None``)."""
        shapes = self.feature_shapes
        if self.split is None:
            return GKTServerModel([s[0] for s in shapes], self.num_classes, width, self.server_layers)
        hidden = max(1, round(self.server_hidden * width / self.server_channels))
        return GKTConvServer([s[0] for s in shapes], shapes[0][1], self.num_classes, width, hidden, self.server_layers)

    def configure_round(self, server_round: int, clients: list[int]) -> list[Instruction]:
        """Each client gets the server's logits on the samples it sent last time (if any)."""
        out = []
        for cid in clients:
            payload = {"server_logits": self.server_logits[cid]} if cid in self.server_logits else {}
            out.append(Instruction(cid, payload))
        return out

    def client_receive(self, model: nn.Module, instruction: Instruction) -> None:
        """Nothing to load: the client's own weights come from its store; server logits go to the callback."""

    @torch.no_grad()
    def client_reply(self, model: nn.Module, instruction: Instruction) -> Payload:
        """Features, logits and labels of the samples seen in the last local epoch."""
        if self.gkt.collected is None:
            raise RuntimeError("FedGKT: no training samples were collected on this client")
        x, y = self.gkt.collected
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        feats = self.extract(model, x.to(device))
        logits = self.classify(model, feats)
        model.train(was_training)
        return {"features": feats.float().cpu(), "logits": logits.float().cpu(), "labels": y.long().cpu()}

    def reply_spec(self, instruction: Instruction) -> PayloadSpec:
        """``[n, *feature_shape_tier]`` features, ``[n, C]`` logits, ``[n]`` int64 labels, ``n <= max_samples``."""
        f = self.feature_shapes[tier_of(self.tiers, instruction.client_id)]
        n, c = self.max_samples, self.num_classes
        return {"features": TensorSpec((-1, *f), torch.float32, max_numel=n * math.prod(f)),
                "logits": TensorSpec((-1, c), torch.float32, max_numel=n * c),
                "labels": TensorSpec((-1,), torch.int64, max_numel=n)}

    def consistent(self, reply: Reply) -> str | None:
        """Why a shape-valid reply is still malformed (row counts or label range), or ``None``."""
        p = reply.payload
        n = len(p["labels"])
        if n == 0 or len(p["features"]) != n or len(p["logits"]) != n:
            return f"row counts differ or are zero: features {len(p['features'])}, logits {len(p['logits'])}, labels {n}"
        if int(p["labels"].min()) < 0 or int(p["labels"].max()) >= self.num_classes:
            return f"labels outside [0, {self.num_classes})"
        return None

    def aggregate(self, server_round: int, replies: list[Reply]) -> dict[str, float]:
        """Train the server model on the features (CE + KD from client logits); compute its logits per client."""
        assert self.server is not None and self.opt is not None
        good, rejected = [], 0
        for r in replies:
            why = self.consistent(r)
            if why is None:
                good.append(r)
            else:
                log.warning("round %d: FedGKT reply of client %d rejected: %s", server_round + 1, r.client_id, why)
                rejected += 1
        received = {r.client_id: r.payload for r in good}
        if self.feature_cache:
            self.cache.update(received)
            received = dict(sorted(self.cache.items()))
        train = [(cid, p, tier_of(self.tiers, cid)) for cid, p in received.items()]
        g = generator(self.seed, Stream.FEDGKT_SERVER, server_round)
        total, count = fit_on_features(self.server, self.opt, train, [p["logits"] for _c, p, _t in train],
                                       self.server_epochs, self.server_batch_size, self.alpha, self.temperature, g)
        metrics = {"server_loss": total / max(count, 1), "gkt_rejected": float(rejected)}
        self.last_routes = []
        if self.chain is not None:
            chain_metrics, self.last_routes = self.chain.train(server_round, train, self.server, self.seed,
                                                               self.server_epochs, self.server_batch_size, self.alpha,
                                                               self.temperature)
            metrics.update(chain_metrics)
        teachers = {}
        for t, name in enumerate(tier_names(self.tiers)):
            who = SERVER if self.chain is None else self.chain.teacher_name(t)
            teachers[t] = self.server if self.chain is None or who == SERVER else self.chain.models[who]
            self.last_routes.append((who, name))
        with torch.no_grad():
            for cid, p, t in train:
                self.server_logits[cid] = teachers[t](p["features"], t)
        return metrics

    def client_callbacks(self) -> list[Any]:
        """Per-client models and the FedGKT client callback."""
        return [self.client_models, self.gkt]

    def extra_eval(self, module: nn.Module, tier: int,
                   evaluate: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
        """The server model on this client's extractor (and every assistant, as ``assistant/<name>/``)."""
        assert self.server is not None
        models = {SERVER: self.server, **(self.chain.models if self.chain is not None else {})}
        out: dict[str, float] = {}
        for name, server in models.items():
            if (name, tier) not in self._composed:
                self._composed[name, tier] = GKTComposed(module, server, tier, self.extract)
            prefix = "server/" if name == SERVER else f"assistant/{name}/"
            out.update(stage_metrics(evaluate(self._composed[name, tier]), prefix))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Tier initial weights, the server model and optimizer, the per-client server logits and feature cache."""
        assert self.server is not None and self.opt is not None
        state = super().state_dict()
        state.update(server={k: v.clone() for k, v in self.server.state_dict().items()},
                     opt=self.opt.state_dict(), server_logits={int(c): v.clone() for c, v in self.server_logits.items()},
                     cache={int(c): {k: v.clone() for k, v in p.items()} for c, p in self.cache.items()})
        if self.chain is not None:
            state["assistants"] = self.chain.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        assert self.server is not None and self.opt is not None
        super().load_state_dict(state)
        self.server.load_state_dict(state["server"])
        self.opt.load_state_dict(state["opt"])
        self.server_logits = {int(c): v for c, v in state["server_logits"].items()}
        self.cache = {int(c): dict(p) for c, p in state.get("cache", {}).items()}
        if self.chain is not None or state.get("assistants"):
            if self.chain is None:
                raise ValueError(f"FedGKT checkpoint's assistants {sorted(state['assistants'])} do not match "
                                 "assistants []")
            self.chain.load_state_dict(state.get("assistants", {}))


__all__ = ["FedGKT", "GKTClient", "GKTComposed", "GKTConvServer", "GKTServerModel"]
