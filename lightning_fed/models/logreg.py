"""Multinomial logistic regression, the FedProx paper's model for its Synthetic(alpha, beta) data.

One linear layer from ``in_features`` to ``num_classes`` logits with softmax cross-entropy, trained with plain SGD
(the paper: learning rate 0.01, batch 10). An ordinary LightningModule: it runs under ``lightning.Trainer`` and
``FedLoop`` alike.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_fed.models.mnist1d import _Classifier


class LogisticRegression(_Classifier):
    """Softmax regression ``logits = W x + b``.

    Example::

        model = LogisticRegression(in_features=60, num_classes=10, lr=0.01)
        loop.fit(model, SyntheticDataModule(alpha=1.0, beta=1.0))

    Args:
        in_features: input dimension (60 for Synthetic).
        num_classes: output classes.
        lr: learning rate.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        momentum: SGD momentum (the paper: none).
        weight_decay: L2 weight decay.
    """

    def __init__(
        self,
        in_features: int = 60,
        num_classes: int = 10,
        lr: float = 0.01,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay, num_classes)
        for key, value in (("in_features", in_features), ("num_classes", num_classes)):
            if value < 1:
                raise ValueError(f"LogisticRegression: {key}={value!r} is not allowed; {key} must be >= 1")
        self.save_hyperparameters()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch ``[B, in_features]``."""
        return self.linear(x)


__all__ = ["LogisticRegression"]
