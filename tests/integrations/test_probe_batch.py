"""Stratified held probe batch."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from dynamics.integrations.probe_batch import build_probe_batch, stratified_indices


def test_quota_per_task_and_distinct_items():
    task = [i % 3 for i in range(60)]
    idx = stratified_indices(task.__getitem__, 60, 3, 10, seed=1)
    assert len(idx) == len(set(idx)) == 10
    assert Counter(task[i] for i in idx) == {0: 4, 1: 3, 2: 3}


def test_short_task_gives_what_it_has_and_others_fill_the_budget():
    task = [0] * 20 + [1] * 20 + [2]
    idx = stratified_indices(task.__getitem__, len(task), 3, 9, seed=0)
    counts = Counter(task[i] for i in idx)
    assert counts[2] == 1 and sum(counts.values()) == 9 and abs(counts[0] - counts[1]) <= 1


def test_seeded_and_leaves_the_global_rng_alone():
    task = [i % 4 for i in range(100)]
    state = torch.get_rng_state()
    first = stratified_indices(task.__getitem__, 100, 4, 8, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert first == stratified_indices(task.__getitem__, 100, 4, 8, seed=5)
    assert first != stratified_indices(task.__getitem__, 100, 4, 8, seed=6)


def test_out_of_range_task_id_is_named():
    with pytest.raises(ValueError, match="task id 7"):
        stratified_indices([0, 7, 1].__getitem__, 3, 2, 3)


def test_build_from_dict_items_through_a_collator():
    items = [{"x": torch.full((2,), float(i)), "labels": i % 5, "task_ids": i % 2} for i in range(12)]
    batch, ids = build_probe_batch(items, torch.utils.data.default_collate, 2, 6, seed=0)
    assert set(batch) == {"x", "labels"}
    assert Counter(ids.tolist()) == {0: 3, 1: 3}
    # each collated row is the item it claims to be
    for row in range(6):
        i = int(batch["x"][row, 0])
        assert int(batch["labels"][row]) == i % 5 and int(ids[row]) == i % 2
    with pytest.raises(ValueError, match="'task_ids' entry"):
        build_probe_batch([{"x": torch.zeros(2)}] * 3, torch.utils.data.default_collate, 2, 2)
