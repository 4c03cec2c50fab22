"""The held probe batch: a fixed set of training examples, stratified by task.

Every probe of a run sees the same examples, so changes in the signals over steps come from the
parameters, not from resampling. Stratification gives each task ``floor(n / T)`` examples (the
first ``n mod T`` tasks one more); a task with too few examples gives what it has and the rest of
the budget goes to the other tasks, so the batch still has ``n`` examples when the data allow.
Selection uses its own seeded generator and never the global RNG, so building the batch does not
change what training draws.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from dynamics.integrations.task_ids import TASK_IDS_KEY, encode_task_ids, task_of_item

__all__ = ["stratified_indices", "build_probe_batch", "split_task_ids", "to_device"]


def _quotas(size: int, n_tasks: int) -> list[int]:
    return [size // n_tasks + (1 if a < size % n_tasks else 0) for a in range(n_tasks)]


def stratified_indices(
    task_of: Callable[[int], int],
    n_items: int,
    n_tasks: int,
    size: int,
    *,
    seed: int = 0,
) -> list[int]:
    """Pick ``size`` item indices, balanced over tasks, scanning a seeded permutation lazily.

    Args:
        task_of: index -> task id of that item (read only for the items scanned).
        n_items: number of items.
        n_tasks: number of tasks ``T``.
        size: how many to pick (all items if fewer).
        seed: seed of the permutation.

    Returns:
        indices grouped by task (task 0 first), in scan order within a task.

    Raises:
        ValueError: if an item's task id is outside ``range(T)``.
    """
    if size < 1:
        raise ValueError(f"probe_size must be >= 1, got {size}")
    quota = _quotas(min(size, n_items), n_tasks)
    picked: list[list[int]] = [[] for _ in range(n_tasks)]
    spare: list[list[int]] = [[] for _ in range(n_tasks)]
    gen = torch.Generator().manual_seed(seed)
    for idx in torch.randperm(n_items, generator=gen).tolist():
        task = int(task_of(idx))
        if not 0 <= task < n_tasks:
            raise ValueError(
                f"item {idx} has task id {task}, outside the {n_tasks} declared tasks (ids 0..{n_tasks - 1}); "
                "fix the dataset's task_ids or declare the task"
            )
        if len(picked[task]) < quota[task]:
            picked[task].append(idx)
            if all(len(p) == q for p, q in zip(picked, quota, strict=True)):
                break
        elif sum(map(len, spare)) < size:
            spare[task].append(idx)
    missing = min(size, n_items) - sum(map(len, picked))
    # Tasks that ran short: hand their places to the others, round-robin, so no task dominates.
    while missing > 0 and any(spare):
        for a in range(n_tasks):
            if missing > 0 and spare[a]:
                picked[a].append(spare[a].pop(0))
                missing -= 1
    return [i for p in picked for i in p]


def build_probe_batch(
    dataset: Any,
    collate_fn: Callable[[list[Any]], Any],
    n_tasks: int,
    size: int,
    *,
    seed: int = 0,
    key: str = TASK_IDS_KEY,
    tasks: Sequence[str] | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Collate a stratified probe batch from a map-style dataset of dict items.

    ``task_ids`` may be indices or, given ``tasks``, the task names.

    The collator runs inside a forked RNG scope, so a random collator (e.g. MLM masking) does not
    consume the training RNG.

    Returns:
        ``(batch, task_ids)``: the collated batch without ``key``, and the ids as a ``LongTensor``.
    """
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(
            f"a probe batch needs a map-style dataset (with __len__ and __getitem__), got {type(dataset).__name__}; "
            "pass probe_batch= (a collated batch holding task_ids) instead"
        )
    names = list(tasks) if tasks is not None else [str(a) for a in range(n_tasks)]
    column_names = getattr(dataset, "column_names", None)
    if isinstance(column_names, list) and key in column_names:
        # datasets.Dataset: reading one column is cheap, decoding whole rows (images) is not.
        column = dataset[key]

        def task_of(i: int) -> int:
            return task_of_item({key: column[i]}, names, key)
    else:

        def task_of(i: int) -> int:
            return task_of_item(dataset[i], names, key)

    indices = stratified_indices(task_of, len(dataset), n_tasks, size, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        items = [dataset[i] for i in indices]
        if tasks is not None:  # names -> indices before the collator (which may drop strings)
            items = [
                {**item, key: encode_task_ids(item[key], tasks)} if isinstance(item, Mapping) else item
                for item in items
            ]
        batch = collate_fn(items)
    return split_task_ids(batch, key=key, n_tasks=n_tasks, tasks=tasks)


def split_task_ids(
    batch: Any, *, key: str = TASK_IDS_KEY, n_tasks: int | None = None, tasks: Sequence[str] | None = None
) -> tuple[dict[str, Any], torch.Tensor]:
    """Separate ``batch[key]`` from a collated batch; check it is one id per example in range.

    Ids may be indices or (given ``tasks``) names."""
    if not isinstance(batch, Mapping) or key not in batch:
        raise ValueError(
            f"the probe batch must be a dict holding {key!r} (one task index per example), got "
            f"{type(batch).__name__} with keys {sorted(batch) if isinstance(batch, Mapping) else '-'}"
        )
    rest = {k: v for k, v in batch.items() if k != key}
    raw = encode_task_ids(batch[key], tasks) if tasks is not None else batch[key]
    task_ids = torch.as_tensor(raw).reshape(-1).long()
    if n_tasks is not None and task_ids.numel() and (task_ids.min() < 0 or task_ids.max() >= n_tasks):
        raise ValueError(
            f"probe batch task ids must lie in 0..{n_tasks - 1}, got {sorted(set(task_ids.tolist()))}"
        )
    return rest, task_ids


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
