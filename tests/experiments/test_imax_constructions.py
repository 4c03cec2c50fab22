"""IMAX / DMAX builders: the paper's densities, identical per-task counts, decentralisation."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest

from dynamics.experiments.imax_dmax.constructions import build_bundle, build_imax
from dynamics.experiments.imax_dmax.sources import make_sources
from dynamics.experiments.imax_dmax.tasks import TASK_NAMES


@pytest.fixture(scope="module", params=[60, 257])
def bundle(request):
    return build_bundle(request.param, 20, size=48, heterogeneity=1.0, seed=request.param)


def _pairs(entries):
    return Counter((e.image_id, e.task) for e in entries)


def test_imax_densities_match_the_paper(bundle):
    # Counted from the entries directly, not through Construction.stats().
    images = {e.image_id for e in bundle.imax.entries}
    assert images == set(bundle.imax.images)
    pairs = _pairs(bundle.imax.entries)
    assert len(pairs) / len(images) == pytest.approx(4.10, abs=0.1)
    assert len(bundle.imax.entries) / len(images) == pytest.approx(7.46, abs=0.2)
    st = bundle.imax.stats()
    assert st["tasks_per_image"] == pytest.approx(len(pairs) / len(images))
    assert "tasks/image" in bundle.imax.describe()


def test_dmax_has_identical_per_task_counts_and_multiplicities(bundle):
    imax, dmax = bundle.imax, bundle.dmax
    assert Counter(e.task for e in dmax.entries) == Counter(e.task for e in imax.entries)
    # Same per-task distribution of entries per image, too.
    mult = lambda es: {t: sorted(m for (_, tt), m in _pairs(es).items() if tt == t) for t in TASK_NAMES}  # noqa: E731
    assert mult(dmax.entries) == mult(imax.entries)


def test_dmax_is_decentralised(bundle):
    dmax = bundle.dmax
    tasks_of = defaultdict(set)
    for e in dmax.entries:
        tasks_of[e.image_id].add(e.task)
    assert all(len(ts) == 1 for ts in tasks_of.values())  # no image shared across tasks
    assert set(tasks_of) == set(dmax.images)
    assert not set(dmax.images) & set(bundle.imax.images)  # DMAX images are other images
    for e in dmax.entries:  # each task from its own source
        assert dmax.images[e.image_id].source == TASK_NAMES.index(e.task)
    # IMAX, by contrast, mixes every source into every task.
    src = defaultdict(set)
    for e in bundle.imax.entries:
        src[e.task].add(bundle.imax.images[e.image_id].source)
    assert all(len(s) > 1 for s in src.values())


def test_entries_of_one_image_and_task_are_distinct(bundle):
    for cons in (bundle.imax, bundle.dmax):
        seen = Counter((e.image_id, e.task, e.key) for e in cons.entries)
        assert max(seen.values()) == 1


def test_eval_set_is_image_centric_and_balanced(bundle):
    ev = bundle.eval
    assert Counter(e.task for e in ev.entries) == {t: 20 for t in TASK_NAMES}
    per_image = Counter(e.image_id for e in ev.entries)
    assert set(per_image.values()) == {len(TASK_NAMES)}
    assert not set(ev.images) & (set(bundle.imax.images) | set(bundle.dmax.images))


def test_home_mask_marks_each_tasks_dmax_source(bundle):
    assert all(bundle.dmax.home_mask())  # DMAX trains every task on its home source only
    ev = bundle.eval
    mask = ev.home_mask()
    for t in TASK_NAMES:
        home = [ev.images[e.image_id].source == TASK_NAMES.index(t) for e in ev.entries if e.task == t]
        assert [m for m, e in zip(mask, ev.entries, strict=True) if e.task == t] == home
        assert 1 <= sum(home) <= 20 // len(TASK_NAMES) + 1  # balanced sources: about 1/7 at home
    subset = ev.entries[::3]
    assert ev.home_mask(subset) == mask[::3]
    split = ev.source_split()
    assert split["home"] == [i for i, m in enumerate(mask) if m]
    assert sorted(split["home"] + split["shifted"]) == list(range(len(ev.entries)))


def test_builder_is_deterministic_in_its_seed():
    a = build_bundle(30, 5, seed=3)
    b = build_bundle(30, 5, seed=3)
    c = build_bundle(30, 5, seed=4)
    assert [e.answer for e in a.dmax.entries] == [e.answer for e in b.dmax.entries]
    assert [e.answer for e in a.imax.entries] != [e.answer for e in c.imax.entries]


def test_builder_rejects_bad_input():
    src = make_sources(7)
    with pytest.raises(ValueError, match="n_images"):
        build_imax(3, sources=src, size=48, seed=0)
    with pytest.raises(ValueError, match="entries_per_image"):
        build_imax(50, sources=src, size=48, seed=0, tasks_per_image=4.1, entries_per_image=3.0)
    with pytest.raises(ValueError, match="spare slots"):
        build_imax(50, sources=src, size=48, seed=0, tasks_per_image=2.0, entries_per_image=20.0)
    with pytest.raises(ValueError, match="unknown arm 'CMAX'"):
        build_bundle(20, 5).train("CMAX")


def test_dmax_mixed_has_dmax_counts_one_task_per_image_and_imaxs_source_mix(bundle):
    imax, dmax, mixed = bundle.imax, bundle.dmax, bundle.dmax_mixed
    assert Counter(e.task for e in mixed.entries) == Counter(e.task for e in dmax.entries)
    mult = lambda es: {t: sorted(m for (_, tt), m in _pairs(es).items() if tt == t) for t in TASK_NAMES}  # noqa: E731
    assert mult(mixed.entries) == mult(dmax.entries)
    tasks_of = defaultdict(set)
    for e in mixed.entries:
        tasks_of[e.image_id].add(e.task)
    assert all(len(ts) == 1 for ts in tasks_of.values()) and set(tasks_of) == set(mixed.images)
    assert not set(mixed.images) & (set(imax.images) | set(dmax.images) | set(bundle.eval.images))
    # Sources: every task's images spread over all seven sources, balanced within the task (as IMAX's).
    for t in TASK_NAMES:
        n_img = Counter(mixed.images[i].source for i, ts in tasks_of.items() if t in ts)
        assert set(n_img) == set(range(len(TASK_NAMES))) or sum(n_img.values()) < len(TASK_NAMES)
        assert max(n_img.values()) - min(n_img.values()) <= 1
    assert mixed.stats()["tasks_per_image"] == 1.0
    assert bundle.train("dmax-mixed") is mixed and bundle.train("DMAX-3stage") is dmax


def test_common_probe_set_is_fresh_all_sources_all_tasks(bundle):
    pr = bundle.probe
    assert set(Counter(e.image_id for e in pr.entries).values()) == {len(TASK_NAMES)}
    others = (
        set(bundle.imax.images)
        | set(bundle.dmax.images)
        | set(bundle.dmax_mixed.images)
        | set(bundle.eval.images)
    )
    assert not set(pr.images) & others


def test_style_seed_draws_other_sources_data_seed_other_images():
    a, b, c = (
        build_bundle(20, 7, seed=0, style_seed=0),
        build_bundle(20, 7, seed=0, style_seed=1),
        build_bundle(20, 7, seed=1),
    )
    assert a.sources != b.sources and a.sources == c.sources
    # Same data seed: the same phantoms (answers), rendered in other styles.
    assert [r.phantom.ctr for r in a.imax.images.values()] == [r.phantom.ctr for r in b.imax.images.values()]
    assert not np.array_equal(a.imax.images[0].pixels, b.imax.images[0].pixels)
    assert [e.answer for e in a.imax.entries] != [e.answer for e in c.imax.entries]
