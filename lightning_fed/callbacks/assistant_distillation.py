"""Teacher-assistant distillation for a plain ``lightning.Trainer``: teacher -> assistants -> student.

Mirzadeh et al., "Improved Knowledge Distillation via Teacher Assistant", AAAI 2020. A student learns badly
from a teacher far larger than itself; an intermediate-size assistant, distilled from the teacher first,
teaches the student instead. Before the student's first epoch the callback trains each assistant in turn on
the student's training batches (``alpha * CE + (1 - alpha) * KD`` from the previous model of the chain,
Adam), then distils the last assistant into the student exactly as :class:`Distillation` does. The assistants'
training draws from the global random state (the data loader's shuffles) and puts it back afterwards, so the
student sees the same batches as without assistants.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fed.callbacks.distillation import Distillation
from lightning_fed.callbacks.kd_losses import kd_loss
from lightning_fed.context import fed_context

log = logging.getLogger("lightning_fed")


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class AssistantDistillation(Distillation):
    """Distil ``teacher`` into the trained module through a chain of assistants, largest first.

    Example::

        cb = AssistantDistillation(teacher=MNIST1DCNN(channels=64), teacher_weights="teacher.safetensors",
                                   assistants=[MNIST1DCNN(channels=16)], assistant_epochs=5)
        L.Trainer(callbacks=[cb]).fit(MNIST1DCNN(channels=4), dm)    # 64 -> 16 -> 4 channels
        cb.routes   # [("teacher", "assistants[0]"), ("assistants[0]", "student")]

    Batches must be ``(x, y, ...)`` tuples (``x`` at ``input_index``, the labels at ``label_index``). The
    assistants' weights and whether they are trained are checkpointed (:meth:`state_dict`): a resumed fit does
    not train them again. Inside ``FedLoop`` the callback refuses to run (each client would train its own
    assistants on its own shard): train the chain centrally and give the last assistant as a
    :class:`Distillation` teacher.

    Args:
        teacher: the frozen teacher (the chain's first model).
        assistants: intermediate models in teaching order; parameter counts strictly decrease from the teacher
            through the assistants to the student (checked at setup, when the student is known).
        assistant_epochs: passes over the training data per assistant.
        assistant_lr: Adam learning rate of the assistants.
        alpha: weight of the task loss (cross-entropy for the assistants, the module's own loss for the student).
        temperature: softmax temperature of every distillation step.
        teacher_weights: optional state dict file loaded into the teacher.
        input_index: position of the input in a batch.
        label_index: position of the labels in a batch (for the assistants' cross-entropy).
    """

    def __init__(
        self,
        teacher: nn.Module,
        assistants: list[nn.Module],
        assistant_epochs: int = 1,
        assistant_lr: float = 1e-3,
        alpha: float = 0.5,
        temperature: float = 4.0,
        teacher_weights: str | None = None,
        input_index: int = 0,
        label_index: int = 1,
    ) -> None:
        super().__init__(
            teacher,
            alpha=alpha,
            temperature=temperature,
            teacher_weights=teacher_weights,
            input_index=input_index,
        )
        if not assistants:
            raise ValueError(
                "AssistantDistillation: assistants=[] is not allowed; give at least one assistant "
                "(without one, use Distillation)"
            )
        bad = [i for i, a in enumerate(assistants) if not isinstance(a, nn.Module)]
        if bad:
            raise ValueError(
                f"AssistantDistillation: assistants[{bad[0]}] is not allowed; it must be an nn.Module"
            )
        for key, val in (("assistant_epochs", assistant_epochs), ("label_index", label_index)):
            if val < 0 or (key == "assistant_epochs" and val == 0):
                raise ValueError(
                    f"AssistantDistillation: {key}={val} is not allowed; {key} must be "
                    f"{'>= 1' if key == 'assistant_epochs' else '>= 0'}"
                )
        if not assistant_lr > 0:
            raise ValueError(
                f"AssistantDistillation: assistant_lr={assistant_lr} is not allowed; it must be > 0"
            )
        self.chain_teacher = self.teacher
        self.assistants = list(assistants)
        self.assistant_epochs = assistant_epochs
        self.assistant_lr = assistant_lr
        self.label_index = label_index
        self.trained = False
        self.routes: list[tuple[str, str]] = []
        self.names = ["teacher"] + [f"assistants[{i}]" for i in range(len(assistants))] + ["student"]
        self._check_sizes([self.chain_teacher, *self.assistants])

    def _check_sizes(self, chain: list[nn.Module]) -> None:
        sizes = [_size(m) for m in chain]
        for i in range(len(sizes) - 1):
            if sizes[i + 1] >= sizes[i]:
                raise ValueError(
                    f"AssistantDistillation: assistants are not allowed in this order; {self.names[i]} "
                    f"({sizes[i]} parameters) cannot teach {self.names[i + 1]} ({sizes[i + 1]} "
                    "parameters): the chain teacher -> assistants -> student goes from larger to "
                    "smaller models"
                )

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse FedLoop and a student not smaller than the last assistant; then the teacher's checks."""
        if fed_context(trainer) is not None:
            raise ValueError(
                "AssistantDistillation is not allowed inside FedLoop (every client would train its "
                "own assistants on its own shard); train the chain with lightning.Trainer and give "
                "the last assistant to Distillation(teacher=...), or use FedDF(assistant_chain=...)"
            )
        self._check_sizes([self.chain_teacher, *self.assistants, pl_module])
        self.teacher = self.assistants[-1] if self.trained else self.chain_teacher
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Train the assistants in chain order (unless restored from a checkpoint), then distil the last one."""
        if not self.trained:
            self.routes = []
            teacher = self.chain_teacher.to(pl_module.device).eval()
            with torch.random.fork_rng(
                devices=[]
            ):  # the student's shuffles are those it would have without us
                for i, assistant in enumerate(self.assistants):
                    self._train_assistant(assistant.to(pl_module.device), teacher, trainer.train_dataloader)
                    self.routes.append((self.names[i], self.names[i + 1]))
                    teacher = assistant
            self.trained = True
        self.routes = [*self.routes[: len(self.assistants)], (self.names[-2], "student")]
        self.teacher = self.assistants[-1]
        super().on_train_start(trainer, pl_module)

    def _train_assistant(self, assistant: nn.Module, teacher: nn.Module, loader: Any) -> None:
        """``assistant_epochs`` passes of ``alpha * CE + (1 - alpha) * KD(teacher)`` over ``loader``."""
        device = next(assistant.parameters()).device
        teacher.requires_grad_(False)
        teacher.eval()
        assistant.requires_grad_(True)
        assistant.train()
        opt = torch.optim.Adam(assistant.parameters(), lr=self.assistant_lr)
        with torch.enable_grad():
            for _ in range(self.assistant_epochs):
                for batch in loader:
                    x, y = self._input(batch).to(device), batch[self.label_index].to(device)
                    with torch.no_grad():
                        t_logits = teacher(x)
                    logits = assistant(x)
                    loss = self.alpha * F.cross_entropy(logits, y) + (1.0 - self.alpha) * kd_loss(
                        logits, t_logits, self.temperature
                    )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        assistant.requires_grad_(False)
        assistant.eval()
        log.info(
            "AssistantDistillation: trained an assistant (%d parameters) from a teacher of %d parameters",
            _size(assistant),
            _size(teacher),
        )

    def state_dict(self) -> dict[str, Any]:
        """The settings, whether the assistants are trained, and their weights."""
        return {
            **super().state_dict(),
            "trained": self.trained,
            "assistants": [
                {k: v.detach().cpu().clone() for k, v in a.state_dict().items()} for a in self.assistants
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the assistants' weights; trained assistants are not trained again)."""
        saved: list[dict[str, Tensor]] = state.get("assistants", [])
        if len(saved) != len(self.assistants):
            raise ValueError(
                f"AssistantDistillation checkpoint has {len(saved)} assistants, this callback "
                f"{len(self.assistants)}"
            )
        for a, s in zip(self.assistants, saved, strict=True):
            a.load_state_dict(s)
        self.trained = bool(state.get("trained", False))


__all__ = ["AssistantDistillation"]
