"""Small example LightningModules for MNIST-1D: the paper's CNN shape and an MLP.

They are ordinary LightningModules (``training_step``, ``validation_step``, ``configure_optimizers``,
``self.log``) and run unchanged under ``lightning.Trainer`` and under ``FedLoop``.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_fed.validation import CheckedArguments

_OPTIMIZERS = ("sgd", "adam", "adamw")
SPLITS = (1, 2, 3)


class _Classifier(CheckedArguments, L.LightningModule):
    """Shared training logic: cross-entropy, accuracy, SGD/Adam/AdamW."""

    def __init__(self, lr: float, optimizer: str, momentum: float, weight_decay: float, num_classes: int) -> None:
        super().__init__()
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"{type(self).__name__}: optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
        if not lr > 0:
            raise ValueError(f"{type(self).__name__}: lr must be > 0, got {lr}")
        self.lr, self.optimizer_name, self.momentum, self.weight_decay = lr, optimizer, momentum, weight_decay
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one batch; logs ``train_loss``."""
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``val_loss`` and ``val_acc``."""
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``test_loss`` and ``test_acc`` (the same computation as :meth:`validation_step`)."""
        self._eval_step(batch, "test")

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", F.cross_entropy(logits, y))
        self.log(f"{stage}_acc", self.val_acc(logits, y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD (with momentum), Adam or AdamW at ``lr``."""
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        cls = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.AdamW
        return cls(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def add_conv_stem(module: nn.Module, channels: int, length: int) -> int:
    """Give ``module`` the MNIST-1D paper's stem (``conv1``-``conv3``: stride-2 1-D convolutions of ``channels``
    filters); return the length of the sequence it outputs."""
    module.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
    module.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
    module.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
    return stem_length(length, 3)


def stem_length(length: int, convs: int) -> int:
    """Sequence length after the first ``convs`` convolutions of the stem of :func:`add_conv_stem`."""
    for k in (5, 3, 3)[:convs]:
        length = (length + 2 - k) // 2 + 1
    return length


def conv_stem_features(module: nn.Module, x: Tensor) -> Tensor:
    """Flattened output of the stem added by :func:`add_conv_stem` for sequences ``[B, length]``."""
    x = x.view(x.shape[0], 1, x.shape[-1])
    x = F.relu(module.conv1(x))
    x = F.relu(module.conv2(x))
    x = F.relu(module.conv3(x))
    return x.flatten(1)


class MNIST1DCNN(_Classifier):
    """The MNIST-1D paper's CNN: three stride-2 1-D convolutions of ``channels`` filters and a linear head
    (about 5.2k parameters at 25 channels); ``depth > 3`` adds ``depth - 3`` length-preserving (stride-1, kernel 3)
    convolutions of the same width after the third. It can be split after convolution 1, 2 or 3:
    ``classify(extract(x, s), s) == forward(x)`` (FedGKT runs the bottom half on the client and a large model on
    its feature map).

    Args:
        channels: filters per convolution.
        depth: convolutions in all, at least 3 (the paper's three; ``channels`` and ``depth`` are the size knobs
            an architecture search turns, docs/tiers.md).
        num_classes: output classes.
        lr: learning rate.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        length: input sequence length.
    """

    def __init__(
        self,
        channels: int = 25,
        num_classes: int = 10,
        lr: float = 0.05,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        length: int = 40,
        depth: int = 3,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay, num_classes)
        if channels < 1:
            raise ValueError(f"MNIST1DCNN: channels must be >= 1, got {channels}")
        if depth < 3:
            raise ValueError(f"MNIST1DCNN: depth={depth!r} is not allowed; depth must be >= 3 (the stem's three "
                             "convolutions)")
        self.save_hyperparameters()
        out_len = add_conv_stem(self, channels, length)
        # empty at depth 3: the paper's model keeps its parameter names and state dict
        self.extra = nn.ModuleList(nn.Conv1d(channels, channels, 3, padding=1) for _ in range(depth - 3))
        self.head = nn.Linear(channels * out_len, num_classes)

    def _extra(self, h: Tensor) -> Tensor:
        for conv in self.extra:
            h = F.relu(conv(h))
        return h

    def features(self, x: Tensor) -> Tensor:
        """The flattened convolutional features (the head's input)."""
        if not len(self.extra):
            return conv_stem_features(self, x)
        return self._extra(self.extract(x, 3)).flatten(1)

    def _check_split(self, split: int) -> None:
        if split not in SPLITS:
            raise ValueError(f"{type(self).__name__}: split={split!r} is not allowed; split must be one of {SPLITS} "
                             "(the number of convolutions before the split)")

    def extract(self, x: Tensor, split: int) -> Tensor:
        """The feature map after the first ``split`` convolutions, ``[B, channels, L]`` (a split model's bottom
        half: FedGKT's client-side extractor)."""
        self._check_split(split)
        h = x.view(x.shape[0], 1, x.shape[-1])
        for conv in (self.conv1, self.conv2, self.conv3)[:split]:
            h = F.relu(conv(h))
        return h

    def classify(self, h: Tensor, split: int) -> Tensor:
        """Logits from the feature map of :meth:`extract` (the remaining convolutions and the head)."""
        self._check_split(split)
        for conv in (self.conv1, self.conv2, self.conv3)[split:]:
            h = F.relu(conv(h))
        return self.head(self._extra(h).flatten(1))

    def extract_shape(self, split: int) -> tuple[int, ...]:
        """Shape of one sample's :meth:`extract` output, ``(channels, L)``."""
        self._check_split(split)
        return (self.hparams.channels, stem_length(self.hparams.length, split))

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of sequences ``[B, length]``."""
        return self.head(self.features(x))


class MNIST1DMLP(_Classifier):
    """A two-hidden-layer MLP on the raw sequence.

    Args:
        hidden: width of both hidden layers.
        num_classes: output classes.
        lr: learning rate.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        length: input sequence length.
    """

    def __init__(
        self,
        hidden: int = 100,
        num_classes: int = 10,
        lr: float = 0.05,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        length: int = 40,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay, num_classes)
        if hidden < 1:
            raise ValueError(f"MNIST1DMLP: hidden must be >= 1, got {hidden}")
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(length, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of sequences ``[B, length]``."""
        return self.net(x.flatten(1))
