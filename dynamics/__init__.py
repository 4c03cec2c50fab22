"""dynamics: training-dynamics signals for multi-task models.

The public API is small and imported lazily, so that ``import dynamics`` inside a training script
pulls in nothing heavy: the store writer needs pyarrow, the probe needs torch, the Trainer adapter
needs transformers, and the analysis side (pandas, scipy) is only loaded by ``load_runs``.

    from dynamics import RunWriter, load_runs      # run store
    from dynamics import probe, ProbeResult        # signals on one probe batch
    from dynamics import attach, DynamicsCallback  # Hugging Face Trainer hooks
    from dynamics import evaluate_per_task          # per-task evaluation from one eval set
    from dynamics import LoopRecorder              # plain PyTorch loop hooks
    from dynamics import RecorderConfig, split_by_task
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dynamics import _import_hooks

__version__ = "0.1.0"

# TRL packing keeps task ids per token once TRL's SFT trainer is imported (standard library only here).
_import_hooks.install()

# name -> module that defines it; resolved on first attribute access (PEP 562).
_LAZY = {
    "RunWriter": "dynamics.store.writer",
    "load_runs": "dynamics.store.reader",
    "RunSet": "dynamics.store.reader",
    "probe": "dynamics.probing",
    "ProbeResult": "dynamics.probing",
    "attach": "dynamics.integrations.hf",
    "DynamicsCallback": "dynamics.integrations.hf",
    "evaluate_per_task": "dynamics.integrations.hf",
    "LoopRecorder": "dynamics.integrations.loop",
    "RecorderConfig": "dynamics.integrations.config",
    "split_by_task": "dynamics.integrations.task_ids",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from dynamics.integrations.config import RecorderConfig
    from dynamics.integrations.hf import DynamicsCallback, attach, evaluate_per_task
    from dynamics.integrations.loop import LoopRecorder
    from dynamics.integrations.task_ids import split_by_task
    from dynamics.probing import ProbeResult, probe
    from dynamics.store.reader import RunSet, load_runs
    from dynamics.store.writer import RunWriter


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dynamics' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
