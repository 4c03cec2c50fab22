"""IMAX versus DMAX on synthetic chest X-rays (arXiv 2504.09967, small-scale analogue).

    from dynamics.experiments.imax_dmax import reproduce, build_bundle, ARCHITECTURES
    reproduce("out/imax", preset="main")       # what `dynamics reproduce imax-dmax --out ...` runs

Modules: ``phantoms`` (renderer, ground truth), ``sources`` (acquisition styles, heterogeneity),
``tasks`` (the seven task families, parsers), ``metrics``, ``constructions`` (IMAX / DMAX /
DMAX-mixed / eval / common probe set, the arms), ``corpus`` and ``pretrain`` (stage 0),
``pseudo`` (DMAX-3stage's pseudo-IMAX), ``tokenizer``, ``zoo`` (tiny VLMs), ``data`` (dataset,
collator), ``train``, ``evaluate``, ``presets``, ``pipeline``, ``workers`` (worker processes),
``results`` (results.md), ``figures``. See README.md in this folder.
Names are imported lazily so that importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "reproduce": "dynamics.experiments.imax_dmax.pipeline",
    "build_bundle": "dynamics.experiments.imax_dmax.constructions",
    "ARCHITECTURES": "dynamics.experiments.imax_dmax.zoo",
    "get_arch": "dynamics.experiments.imax_dmax.zoo",
    "TASK_NAMES": "dynamics.experiments.imax_dmax.tasks",
    "train_run": "dynamics.experiments.imax_dmax.train",
    "TrainConfig": "dynamics.experiments.imax_dmax.train",
    "QUICK": "dynamics.experiments.imax_dmax.presets",
    "MAIN": "dynamics.experiments.imax_dmax.presets",
    "ARMS": "dynamics.experiments.imax_dmax.constructions",
    "densify": "dynamics.experiments.imax_dmax.pseudo",
    "pretrain": "dynamics.experiments.imax_dmax.pretrain",
    "FULL": "dynamics.experiments.imax_dmax.presets",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dynamics.experiments.imax_dmax' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
