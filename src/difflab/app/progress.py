"""The progress bar of ``difflab train``: steps of a step-limited run, time of a budgeted one.

A run with a time budget (``--minutes``) stops at the budget long before its step count (the
``mnist`` preset's 100,000 steps), so a bar of steps would promise hours. Its bar counts
seconds instead and reads ``MM:SS of MM:SS, MM:SS left, step N``: the time left is the budget's,
or the step count's at the current pace when that comes first.
"""

from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm

from difflab.safe_io import progress_bar

__all__ = ["training_bar"]


class _BudgetBar:
    """A tqdm bar over the seconds of the budget, told of each step by :meth:`update`."""

    def __init__(
        self, budget_s: float, *, steps: int, initial: int, start: float, disable: bool
    ) -> None:
        self.budget_s = float(budget_s)
        self.steps, self.initial, self.step = steps, initial, initial
        self.start = start
        self.bar = progress_bar(
            total=self.budget_s,
            disable=disable,
            bar_format="{percentage:3.0f}%|{bar}| {desc}{postfix}",
        )
        self._describe(0.0)

    def _describe(self, elapsed: float) -> None:
        done = self.step - self.initial
        left = max(self.budget_s - elapsed, 0.0)
        if done > 0:  # the step count first, at this pace?
            left = min(left, (self.steps - self.step) * elapsed / done)
        fmt = tqdm.format_interval
        self.bar.set_description_str(
            f"{fmt(elapsed)} of {fmt(self.budget_s)}, {fmt(left)} left, step {self.step:,}",
            refresh=False,
        )

    def update(self, n: int = 1) -> None:
        self.step += n
        elapsed = time.perf_counter() - self.start
        self._describe(elapsed)
        self.bar.update(min(elapsed, self.budget_s) - self.bar.n)

    def set_postfix(self, **kwargs: Any) -> None:
        self.bar.set_postfix(**kwargs)

    def close(self) -> None:
        self.bar.close()


def training_bar(
    *, steps: int, initial: int, budget_s: float | None, start: float, disable: bool
) -> Any:
    """The bar of a run at step ``initial`` of ``steps``: of steps, or with a time budget
    ``budget_s`` (seconds from ``start``, a ``time.perf_counter()`` value) of its seconds.
    Either has ``update(n_steps)``, ``set_postfix(**values)`` and ``close()``."""
    if budget_s is None:
        return progress_bar(total=steps, initial=initial, disable=disable)
    return _BudgetBar(budget_s, steps=steps, initial=initial, start=start, disable=disable)
