"""An MNIST-1D classifier with an explicit residual feed-forward block, the natural target for MoE.

A convolutional stem (the MNIST-1D paper's CNN shape) turns a sequence into one feature vector per sample;
a projection to ``width``, a pre-norm residual feed-forward block ``x + ffn(norm(x))`` (the transformer's
FFN sub-layer) with ``ffn = Linear(width, hidden), ReLU, Linear(hidden, width)``, and a linear head follow. ``MoERouting(convert=["ffn"])`` turns the block
into a mixture of experts routed per sample, without editing this code; a sample whose assignment is
dropped by the capacity limit passes through the residual connection unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fed.models.mnist1d import _Classifier, add_conv_stem, conv_stem_features


class MNIST1DFFN(_Classifier):
    """Conv stem, projection, pre-norm residual feed-forward block (``ffn``) and linear head for MNIST-1D.

    Example::

        model = MNIST1DFFN(hidden=128)                       # dense
        cb = MoERouting(convert=["ffn"], num_experts=4)      # the same model with 4 experts of 128

    Args:
        channels: filters of each of the three stride-2 convolutions.
        width: size of the feature vector the feed-forward block reads and writes.
        hidden: hidden size of the feed-forward block.
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
        width: int = 64,
        hidden: int = 128,
        num_classes: int = 10,
        lr: float = 0.05,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        length: int = 40,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay, num_classes)
        for key, value in (("channels", channels), ("width", width), ("hidden", hidden)):
            if value < 1:
                raise ValueError(f"MNIST1DFFN: {key}={value!r} is not allowed; {key} must be >= 1")
        self.save_hyperparameters()
        out_len = add_conv_stem(self, channels, length)
        self.proj = nn.Linear(channels * out_len, width)
        self.norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of sequences ``[B, length]``."""
        h = F.relu(self.proj(conv_stem_features(self, x)))
        h = h + self.ffn(self.norm(h))
        return self.head(h)


__all__ = ["MNIST1DFFN"]
