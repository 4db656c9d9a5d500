"""A rich progress bar over rounds that shows the latest accuracy."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

class RoundProgress:
    """Context manager: ``with RoundProgress(total, start) as p: p.advance(metrics)``.

    Args:
        total: number of rounds of the run.
        start: rounds already done (when resuming).
        enabled: ``False`` turns it into a no-op.
        console: the rich console to draw on.
    """

    def __init__(self, total: int, start: int = 0, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.total, self.start = total, start
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> Self:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]round"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("fit", total=self.total, completed=self.start, status="")
        return self

    def advance(self, metrics: dict[str, float]) -> None:
        """Mark one round done and show its validation accuracy (``val_acc``), test accuracy (``test_acc``, at
        test rounds), training loss and, with a simulated clock, the simulated time so far (``sim_time_s``)."""
        if self._progress is None:
            return
        parts = []
        for key, fmt in (("val_acc", "val {:.2%}"), ("test_acc", "test {:.2%}"), ("train_loss", "loss {:.3f}"),
                         ("sim_time_s", "sim {:.4g} s")):
            if key in metrics:
                parts.append(fmt.format(metrics[key]))
        if parts:
            self._last = " ".join(parts)
        self._progress.update(self._task, advance=1, status=getattr(self, "_last", ""))

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.__exit__(et, e, tb)
