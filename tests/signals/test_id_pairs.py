"""The embedding block from pairs of equal ids equals the Gram of explicit dense per-example gradients."""

from __future__ import annotations

import pytest
import torch

from dynamics.signals.id_pairs import equal_id_gram

N, VOCAB, D = 7, 23, 5


def _rows(kind: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    m = 60
    if kind == "uniform":
        ids = torch.randint(0, VOCAB, (m,), generator=gen)
    elif kind == "one_id":  # every example reads the same id: only the dense block
        ids = torch.zeros(m, dtype=torch.long)
    else:  # a few ids read by every example (a template), the rest rare: both parts
        ids = torch.where(torch.rand(m, generator=gen) < 0.4, torch.randint(0, 2, (m,), generator=gen),
                          torch.randint(2, VOCAB, (m,), generator=gen))  # fmt: skip
    examples = torch.randint(0, N, (m,), generator=gen)
    b = torch.randn(m, D, generator=gen, dtype=torch.float64)
    return ids, examples, b


def _dense(ids, examples, b):
    g = torch.zeros(N, VOCAB, D, dtype=torch.float64)
    g.index_put_((examples, ids), b, accumulate=True)  # g_i = sum_t e_{u_t} b_t^T
    return g.reshape(N, -1)


@pytest.mark.parametrize("kind", ["uniform", "one_id", "mixed"])
@pytest.mark.parametrize("limit", [None, 0, 1, 2, 4, N])
def test_equal_id_gram_equals_dense_per_example_gradients(kind, limit):
    ids, examples, b = _rows(kind)
    direction = torch.randn(VOCAB, D, dtype=torch.float64)
    K, dots, dense_only = equal_id_gram(ids, examples, b, N, direction, limit=limit)
    g = _dense(ids, examples, b)
    torch.testing.assert_close(K, g @ g.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dots, g @ direction.reshape(-1), rtol=1e-12, atol=1e-12)
    if limit is not None:
        assert dense_only == (limit == 0)


def test_the_chosen_split_forms_pairs_for_rare_ids_and_nothing_for_no_rows():
    ids, examples, b = _rows("uniform")
    assert not equal_id_gram(ids, examples, b, N)[2]  # rare ids: pairs, not the dense block
    K, dots, _ = equal_id_gram(ids[:0], examples[:0], b[:0], N, torch.zeros(VOCAB, D, dtype=torch.float64))
    assert not K.any() and dots is not None and not dots.any()
