"""One import hook, so that ``import dynamics`` is all a TRL packing script needs.

TRL packs the dataset inside ``SFTTrainer(...)`` and keeps only the tokens and labels there, so the
per-token task ids must be packed along before ``attach`` ever sees the trainer.
:func:`dynamics.integrations.trl.keep_task_ids_through_packing` patches TRL for that, but importing
it needs torch and TRL, which ``import dynamics`` must not pull in. So this module only watches for
TRL's SFT trainer module: when it is executed (or at once, if it already was), the patch is applied.
Nothing is imported here beyond the standard library.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

_TARGET = "trl.trainer.sft_trainer"


def _patch() -> None:
    try:
        from dynamics.integrations.trl import keep_task_ids_through_packing

        keep_task_ids_through_packing()
    except Exception:  # a TRL version we do not know: attach still says what is missing
        pass


class _Loader(importlib.abc.Loader):
    """TRL's own loader, then the patch once the module's classes exist."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _patch()


class _SFTWatcher(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Any, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot: ask the real finders, never ourselves again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Patch TRL now if its SFT trainer is loaded, else when it is (idempotent)."""
    if _TARGET in sys.modules:
        _patch()
    elif not any(isinstance(f, _SFTWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _SFTWatcher())
