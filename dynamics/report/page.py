"""What a report page is: a titled builder that draws figures from a context, or says why it cannot."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from dynamics.report.context import ReportContext

__all__ = ["Page", "NoData"]


class NoData(Exception):
    """Raised by a page builder that has nothing to draw; the message is the note on the overview."""


@dataclass(frozen=True)
class Page:
    """A page family: ``build(ctx)`` returns one or more figures, or raises :class:`NoData`.

    ``key`` names the exported figure files (``03_loss.png``); ``title`` names the page in notes.
    """

    key: str
    title: str
    build: Callable[[ReportContext], list[Figure]]
