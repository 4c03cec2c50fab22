"""Reuse of the example-axis verdicts (:mod:`.example_axis`) across probes of the same batch.

The locality check (and the discovery of row maps) costs a second backward pass. The training hooks
probe one *held* batch every ``probe_every`` steps, so that pass would answer the same question
again and again. This module remembers, per model (weakly: an entry never keeps its model alive),
the verdict of every captured call, together with everything the verdict was obtained from, and
hands it back only when all of that is the same again:

* the batch: its nesting (dict keys, sequence lengths), every non-tensor leaf, and every tensor's
  dtype, shape, device and *values* (compared exactly, ``torch.equal``, with a private copy; never
  by address or version counter, which ``.data`` writes, numpy views or a freed-and-reused block
  can fool);
* the chosen parameters (identity, in order) and the loss (the same built-in name, or the same
  callable object);
* the model's hooked modules (identity and class) and what this forward actually did: for every
  hooked module, each call's input and output shapes and dtypes and whether it reaches the loss,
  plus the size of the loss's autograd graph and the number of uses of each chosen parameter.

**Why reuse is safe.** The verdict "row ``r`` of this call's outputs influences only example
``r``'s loss" is a statement about *which* rows reach *which* losses, i.e. about the dependency
structure of the computation. That structure is fixed by the model's code and its inputs: in eval
mode (the probe's mode) examples meet only where the code makes them meet (e.g. LLaVA placing the
images by the image tokens of ``input_ids``), and the batch, the code path (same modules, same
calls with the same shapes, the same autograd graph size) and the parameter set are all part of
the key. A different batch with identical shapes but the images moved to other examples differs in
``input_ids`` values and is verified afresh.

A row-mapped call's verdict is its row -> example map (:mod:`.row_map`), and the same argument
holds for it: which example's loss each row reaches is the same dependency structure (Qwen2-VL's
patches reach the loss of the example whose image tokens they replace, which ``input_ids`` and
the image grid fix), so a map is reused under exactly the key that reuses a boolean verdict.
A map with rows of zero gradient (mapped to ``-1``, dropped) is not stored: a row's gradient can be
zero by parameter *value* (a LoRA ``B`` initialised to zero behind a row-mapped ``A``) and matter
after a few steps, when its example must be known; such calls are verified on every probe.

Two ways the verdict could still depend on parameter *values* are excluded or harmless:

* parameter-dependent routing (mixture-of-experts): an expert receives the tokens that the router
  sends it, gathered across examples, so its call is not batch-first by shape or fails the locality
  check. A "not per-example" verdict only sends parameters to exact autograd, which is right for
  any model, so reusing it can cost time but never correctness; a routing change that alters the
  number of tokens an expert gets changes the call's shapes (part of the key) and the call is
  verified again;
* a cross-example path whose gradient is exactly zero at the first probe (a gate initialised to
  zero in front of an operation that mixes examples) would pass the check at that probe and start
  to matter only later. No stock layer mixes examples in eval mode, but code can; for such
  models pass ``cache_checks=False`` to :func:`dynamics.probe` to verify on every call.

The module path's re-run check (:func:`.example_axis.reproduces`) is not cached: the re-run is
needed for its gradients anyway, and comparing its outputs costs little.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

_PRIMITIVE = (int, float, str, bool, bytes, type(None))

CallKey = tuple[int, int]  # (id of the module, index of the call among the module's calls)
# a batch-first call's "rows are local", or a row-mapped call's row -> example map (False: none found)
Verdict = bool | Tensor


def _flatten(tree: Any, tensors: list[Tensor]) -> Any:
    """Hashable structure of ``tree`` with tensors replaced by their index in ``tensors``.

    Raises TypeError for a leaf that cannot be compared by value (then nothing is cached).
    """
    if isinstance(tree, Tensor):
        tensors.append(tree)
        return ("T", len(tensors) - 1)
    if isinstance(tree, Mapping):
        return ("M", tuple((k, _flatten(v, tensors)) for k, v in tree.items()))
    if isinstance(tree, (tuple, list)):
        return ("S", type(tree).__name__, tuple(_flatten(v, tensors) for v in tree))
    if isinstance(tree, _PRIMITIVE):
        return ("P", tree)
    raise TypeError(f"batch leaf of type {type(tree).__name__} cannot be compared by value")


@dataclass
class _BatchPrint:
    """The batch's structure and a private copy of its tensors, compared exactly."""

    structure: Any
    tensors: list[Tensor]

    @classmethod
    def of(cls, batch: Any) -> _BatchPrint | None:
        tensors: list[Tensor] = []
        try:
            structure = _flatten(batch, tensors)
        except TypeError:
            return None
        return cls(structure, [t.detach().clone() for t in tensors])

    def matches(self, batch: Any) -> bool:
        tensors: list[Tensor] = []
        try:
            structure = _flatten(batch, tensors)
        except TypeError:
            return False
        if structure != self.structure or len(tensors) != len(self.tensors):
            return False
        return all(
            a.dtype == b.dtype and a.shape == b.shape and a.device == b.device and torch.equal(a, b.detach())
            for a, b in zip(self.tensors, tensors, strict=True)
        )  # NaN != NaN: a batch holding NaN is verified every time, which is only slower


def _loss_key(loss: Any) -> Any:
    if isinstance(loss, str):
        return loss
    try:
        return weakref.ref(loss)
    except TypeError:
        return None  # an object we cannot hold weakly: no caching


@dataclass
class _Entry:
    batch: _BatchPrint
    params: list[weakref.ref]
    loss: Any
    structure: Any = None
    modules: dict[int, weakref.ref] = field(default_factory=dict)
    verdicts: dict[CallKey, Verdict] = field(default_factory=dict)

    def same_inputs(self, batch: Any, params: list[Tensor], loss: Any) -> bool:
        if len(params) != len(self.params) or any(
            r() is not p for r, p in zip(self.params, params, strict=True)
        ):
            return False
        if isinstance(self.loss, weakref.ref):
            if self.loss() is not loss:
                return False
        elif self.loss != loss:
            return False
        return self.batch.matches(batch)


_CACHE: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()


class AxisMemo:
    """Verdicts of one ``(model, batch, params, loss)``; obtain with :func:`memo_for`.

    :meth:`lookup` returns the stored verdicts if the forward just run has the same structure as
    the one they came from; :meth:`store` records new ones.
    """

    def __init__(self, entry: _Entry):
        self._entry = entry

    def lookup(self, structure: Any, modules: dict[int, nn.Module]) -> dict[CallKey, Verdict] | None:
        e = self._entry
        if e.structure is None or e.structure != structure or e.modules.keys() != modules.keys():
            return None
        if any(e.modules[k]() is not m for k, m in modules.items()):
            return None
        return e.verdicts

    def store(self, structure: Any, modules: dict[int, nn.Module], verdicts: dict[CallKey, Verdict]) -> None:
        e = self._entry
        if e.structure != structure or e.modules.keys() != modules.keys():
            e.verdicts = {}
        e.structure = structure
        e.modules = {k: weakref.ref(m) for k, m in modules.items()}
        e.verdicts.update(verdicts)


def memo_for(model: nn.Module, batch: Any, params: list[Tensor], loss: Any) -> AxisMemo | None:
    """The memo for this model and inputs: the stored one if batch, params and loss match, else a fresh one.

    None when the batch or loss cannot be compared by value (then every probe verifies).
    """
    entry = _CACHE.get(model)
    if entry is not None and entry.same_inputs(batch, params, loss):
        return AxisMemo(entry)
    key = _loss_key(loss)
    fp = _BatchPrint.of(batch)
    if key is None or fp is None:
        _CACHE.pop(model, None)
        return None
    entry = _Entry(batch=fp, params=[weakref.ref(p) for p in params], loss=key)
    _CACHE[model] = entry
    return AxisMemo(entry)


def clear(model: nn.Module | None = None) -> None:
    """Forget the verdicts of ``model`` (of every model if None): the next probe verifies afresh."""
    if model is None:
        _CACHE.clear()
    else:
        _CACHE.pop(model, None)


def cached_models() -> int:
    """Number of models with stored verdicts (for tests of the weak references)."""
    return len(_CACHE)
