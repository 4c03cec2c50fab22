"""A progress bar advanced by labelled steps, shared by the report and the terminal summary."""

from __future__ import annotations

import time

from tqdm import tqdm

__all__ = ["StepProgress"]


class StepProgress:
    """``progress("computing features")`` finishes the previous step and names the next one.

    Drawn on stderr by tqdm, so a summary printed on stdout stays clean; disabled when
    ``enabled`` is False. The seconds spent in each step are kept in :attr:`timings`.
    """

    def __init__(self, enabled: bool, total: int, desc: str = "report") -> None:
        self.bar = tqdm(
            total=total, disable=not enabled, unit="step", dynamic_ncols=True, desc=desc, leave=False
        )
        self.timings: dict[str, float] = {}
        self._label: str | None = None
        self._since = time.perf_counter()

    def _finish(self) -> None:
        now = time.perf_counter()
        if self._label is not None:
            self.timings[self._label] = self.timings.get(self._label, 0.0) + now - self._since
            self.bar.update(1)
        self._since = now

    def __call__(self, label: str) -> None:
        self._finish()
        self._label = label
        self.bar.set_description(label)

    def close(self) -> None:
        self._finish()
        self._label = None
        if self.bar.total and self.bar.n < self.bar.total:
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()
