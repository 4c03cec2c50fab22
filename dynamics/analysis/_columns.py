"""Which columns of a features frame are features, tags and scores (shared by the statistics)."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence

import pandas as pd

__all__ = ["feature_columns", "tag_columns", "require_columns"]


def tag_columns(feats: pd.DataFrame) -> list[str]:
    """Tag columns recorded by :func:`features`, or, for a hand-made frame, its non-numeric columns."""
    tags = feats.attrs.get("tag_columns")
    if tags is not None:
        return [t for t in tags if t in feats.columns]
    return [c for c in feats.columns if c != "run_id" and not pd.api.types.is_numeric_dtype(feats[c])]


def require_columns(feats: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise a ValueError naming each missing column, its closest matches and the available tags."""
    missing = [c for c in columns if c not in feats.columns]
    if not missing:
        return
    hints = []
    for c in missing:
        close = difflib.get_close_matches(str(c), [str(x) for x in feats.columns], n=3)
        hints.append(f"{c!r}" + (f" (did you mean {close}?)" if close else ""))
    raise ValueError(
        f"{what}: column(s) {', '.join(hints)} not in the features frame; its tag columns are "
        f"{tag_columns(feats)}"
    )


def feature_columns(feats: pd.DataFrame, features: str | Sequence[str] | None = None) -> list[str]:
    """Resolve ``features`` (names or glob patterns such as ``"fisher_*/all/*"``) to columns.

    ``None`` means every feature column: ``attrs["feature_columns"]`` of a :func:`features` frame,
    else every numeric column whose name contains ``/`` and is not a score.
    """
    if features is None:
        cols = feats.attrs.get("feature_columns")
        if cols is None:
            cols = [
                c
                for c in feats.columns
                if isinstance(c, str)
                and "/" in c
                and not c.startswith("score/")
                and pd.api.types.is_numeric_dtype(feats[c])
            ]
        return [c for c in cols if c in feats.columns]
    patterns = [features] if isinstance(features, str) else list(features)
    out: list[str] = []
    for pat in patterns:
        if pat in feats.columns:
            hits = [pat]
        else:
            hits = [c for c in feats.columns if isinstance(c, str) and fnmatch.fnmatchcase(c, pat)]
        if not hits:
            require_columns(feats, [pat], "features")
        out.extend(h for h in hits if h not in out)
    not_numeric = [c for c in out if not pd.api.types.is_numeric_dtype(feats[c])]
    if not_numeric:
        raise ValueError(
            f"features must be numeric columns; {not_numeric} are not (tags go in by / pair_on / control)"
        )
    return out
