"""Reused example-axis verdicts (:mod:`dynamics.signals.axis_cache`): same answers, re-verified on new content.

The reference is always the brute-force Gram (one autograd.grad per example), never the probe itself.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import torch

from dynamics import probe
from dynamics.signals import axis_cache
from tests import tiny_models as tm
from tests.reference import ref_grads
from tests.signals.signals_helpers import assert_gram


def _coverage(res) -> dict[str, str]:
    return {name: path for path, names in res.coverage.items() for name in names}


def _llava_batch(images_per_example: list[int], seq_len: int, seed: int = 0):
    """LLaVA batch whose example ``i`` carries ``images_per_example[i]`` images (BOS, images, text).

    ``pixel_values`` holds ``sum(images_per_example)`` images, consumed in order; every batch of
    one ``seq_len`` and image total has the same tensor shapes whatever the assignment.
    """
    n = len(images_per_example)
    base, _ = tm.llava_batch(n=n, text_len=6, seed=seed, dtype=torch.float64)
    P = tm.N_IMAGE_TOKENS
    ids = torch.full((n, seq_len), tm.PAD_ID)
    att = torch.zeros(n, seq_len, dtype=torch.long)
    lab = torch.full((n, seq_len), -100)
    for i, k in enumerate(images_per_example):
        text = base["input_ids"][i, 1 + P :][base["attention_mask"][i, 1 + P :] == 1]
        tlab = base["labels"][i, 1 + P :][base["attention_mask"][i, 1 + P :] == 1]
        row = torch.cat([torch.tensor([tm.BOS_ID]), torch.full((k * P,), tm.IMAGE_TOKEN_ID), text])
        lrow = torch.cat([torch.full((1 + k * P,), -100), tlab])
        ids[i, : len(row)], lab[i, : len(lrow)], att[i, : len(row)] = row, lrow, 1
    gen = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(sum(images_per_example), 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE, generator=gen)
    return {"input_ids": ids, "attention_mask": att, "labels": lab, "pixel_values": pixels.double()}


def test_second_probe_of_the_same_batch_reuses_the_verdicts_and_gives_the_same_gram(weighted_passes):
    model = tm.tiny_llava(seed=0, dtype=torch.float64)
    batch, task_ids = tm.llava_batch(n=4, text_len=6, seed=0, dtype=torch.float64)
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "causal_lm")
    first = probe(model, batch, task_ids=task_ids)
    assert weighted_passes["n"] == 1
    second = probe(model, batch, task_ids=task_ids)
    assert weighted_passes["n"] == 1  # every verdict reused: no check pass
    exact = probe(model, batch, task_ids=task_ids, method="exact")
    assert torch.equal(second.gram, first.gram)
    assert second.coverage == first.coverage
    assert_gram(second, G)
    np.testing.assert_allclose(second.gram.numpy(), exact.gram.numpy(), rtol=1e-9, atol=1e-12 * G.max() ** 2)
    assert _coverage(second)["model.vision_tower.embeddings.patch_embedding.weight"] != "exact"

    probe(model, batch, task_ids=task_ids, cache_checks=False)
    assert weighted_passes["n"] == 2  # switched off: verified again


def test_same_shapes_with_images_moved_to_other_examples_are_verified_again(weighted_passes):
    """One image per example, then the same shapes with example 0 holding two images and example 1 none.

    A cache keyed on shapes alone would reuse "vision-tower row r is example r" and return a
    wrong Gram matrix for the second batch.
    """
    model = tm.tiny_llava(seed=0, dtype=torch.float64)
    seq_len = 1 + 2 * tm.N_IMAGE_TOKENS + 6
    one_each = _llava_batch([1, 1, 1, 1], seq_len)
    moved = _llava_batch([2, 0, 1, 1], seq_len)
    moved["pixel_values"] = one_each["pixel_values"].clone()  # same images, other owners
    assert all(one_each[k].shape == moved[k].shape for k in one_each)
    task_ids = torch.arange(4) % 2

    res = probe(model, one_each, task_ids=task_ids)
    G, _, _ = ref_grads(model, one_each, list(model.parameters()), "causal_lm")
    assert_gram(res, G)
    assert _coverage(res)["model.multi_modal_projector.linear_1.weight"] != "exact"
    probe(model, one_each, task_ids=task_ids)
    assert weighted_passes["n"] == 1

    res = probe(model, moved, task_ids=task_ids)
    assert weighted_passes["n"] == 2
    G, _, _ = ref_grads(model, moved, list(model.parameters()), "causal_lm")
    assert_gram(res, G)
    cov = _coverage(res)
    assert cov["model.vision_tower.embeddings.patch_embedding.weight"] == "exact"
    assert cov["model.multi_modal_projector.linear_1.weight"] == "exact"

    again = probe(model, moved, task_ids=task_ids)  # "not per-example" reused: still exact, still right
    assert weighted_passes["n"] == 2
    assert_gram(again, G)

    moved["input_ids"][1, -1] = tm.PAD_ID + 3  # an in-place edit of the held batch's content
    probe(model, moved, task_ids=task_ids)
    assert weighted_passes["n"] == 3


def test_other_parameters_or_loss_are_verified_again(weighted_passes):
    model = tm.tiny_llava(seed=0, dtype=torch.float64)
    batch, task_ids = tm.llava_batch(n=3, text_len=6, seed=1, dtype=torch.float64)
    probe(model, batch, task_ids=task_ids)
    sub = [p for n, p in model.named_parameters() if "language_model" in n]
    probe(model, batch, task_ids=task_ids, params=sub)
    assert weighted_passes["n"] == 2
    probe(model, batch, task_ids=task_ids, params=sub)
    assert weighted_passes["n"] == 2
    probe(model, batch, task_ids=task_ids, params=sub, loss="causal_lm")
    assert weighted_passes["n"] == 3


def test_the_cache_keeps_neither_model_nor_batch_alive():
    axis_cache.clear()
    model = tm.tiny_llava(seed=0)
    batch, task_ids = tm.llava_batch(n=2, text_len=6, seed=0)
    probe(model, batch, task_ids=task_ids)
    assert axis_cache.cached_models() == 1
    refs = [weakref.ref(model), weakref.ref(batch["pixel_values"]), weakref.ref(batch["input_ids"])]
    del model, batch
    gc.collect()
    assert all(r() is None for r in refs)
    assert axis_cache.cached_models() == 0


def test_uncomparable_batch_leaves_disable_the_cache(weighted_passes):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))

    class Opaque:  # a leaf with no value equality
        pass

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    for _ in range(2):
        probe(model, (x, y, Opaque()), task_ids=torch.zeros(5, dtype=torch.long), loss=loss_fn)
    assert weighted_passes["n"] == 2
    for _ in range(2):
        probe(model, (x, y), task_ids=torch.zeros(5, dtype=torch.long), loss=loss_fn)
    assert weighted_passes["n"] == 3


class SharedTable(torch.nn.Module):
    """Every row local, but the root's re-run (which splits ``table`` by rows) cannot reproduce it."""

    def __init__(self, d: int = 5):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.randn(d))
        self.head = torch.nn.Linear(d, 3)

    def forward(self, x, table):
        # scale reaches the product by two paths: neither a plain product p * x nor one shared chain
        # f(p), which the elementwise path covers (tests/signals/test_elementwise_uses.py)
        return self.head(torch.tanh(x * (self.scale.exp() + self.scale) + table.mean(0)))


def test_module_rerun_failing_after_the_graph_was_freed_recomputes_the_losses(weighted_passes, monkeypatch):
    import dynamics.probing as probing

    forwards = {"n": 0}
    real = probing.per_example_losses

    def counting(*args, **kwargs):
        forwards["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(probing, "per_example_losses", counting)
    torch.manual_seed(2)
    model = SharedTable().double()
    gen = torch.Generator().manual_seed(2)
    n = 6
    batch = {
        "x": torch.randn(n, 5, generator=gen, dtype=torch.float64),
        "table": torch.randn(n, 5, generator=gen, dtype=torch.float64),
        "labels": torch.randint(0, 3, (n,), generator=gen),
    }
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "classification")
    first = probe(model, batch, task_ids=torch.arange(n) % 2)
    assert forwards["n"] == 1  # the graph was kept for the fallback
    second = probe(model, batch, task_ids=torch.arange(n) % 2)
    assert weighted_passes["n"] == 1
    assert forwards["n"] == 3  # graph freed by the single backward, losses recomputed for exact
    for res in (first, second):
        assert_gram(res, G)
        assert _coverage(res)["scale"] == "exact"
