"""Phantom ground truth against what the renderer actually draws, and the source styles."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dynamics.experiments.imax_dmax.phantoms import Lesion, Phantom, render, sample_phantom
from dynamics.experiments.imax_dmax.sources import BASE, make_sources, render_styled


def _clean(ctr: float = 0.5, **kw) -> Phantom:
    base = dict(
        cx=0.5, cy=0.52, a=0.40, b=0.38, ctr=ctr, effusion=None, effusion_level=0.0,
        nodule=None, opacity=None, edema=0, texture_seed=3,
    )  # fmt: skip
    base.update(kw)
    return Phantom(**base)


@pytest.mark.parametrize("ctr", [0.40, 0.47, 0.55, 0.61])
@pytest.mark.parametrize("zoom", [1.0, 0.85])
def test_rendered_cardiothoracic_ratio_matches_ground_truth(ctr, zoom):
    # Measure the ratio on the image the way a reader would: widest heart row / widest thorax row.
    size = 320
    ph = _clean(ctr)
    img, boxes = render(ph, size=size, zoom=zoom)
    # Edges at the logistic midpoints: air 0 | soft tissue 0.5, and aerated lung 0.12 | heart 0.80
    # (both heart borders lie over the lungs across the sampled CTR range).
    body = img > 0.25
    thorax_w = max(np.ptp(np.flatnonzero(row)) + 1 for row in body if row.any())
    hx, hy = (((v - 0.5) * zoom + 0.5) * size for v in ph.heart()[:2])
    row = img[int(hy)] > 0.46  # the heart's widest row; walk out from its centre to both borders
    left = right = int(hx)
    while row[left - 1]:
        left -= 1
    while row[right + 1]:
        right += 1
    heart_w = right - left + 1
    assert heart_w / thorax_w == pytest.approx(ctr, abs=0.005)
    # The heart box is the drawn heart's extent.
    x0, _, x1, _ = boxes["heart"]
    assert left == pytest.approx(x0, abs=1.0) and right + 1 == pytest.approx(x1, abs=1.0)


def test_lesion_boxes_enclose_the_drawn_lesions():
    size = 256
    nod = Lesion("right", "upper", 0.30, 0.36, 0.06)
    ph = _clean(0.45, nodule=nod)
    img, boxes = render(ph, size=size)
    # Look in a window of +-1.5 r (all aerated lung around the nodule) at the edge midpoint
    # between the lung (0.12) and the nodule (0.95).
    c0, c1 = int((0.30 - 0.09) * size), int((0.30 + 0.09) * size)
    r0, r1 = int((0.36 - 0.09) * size), int((0.36 + 0.09) * size)
    ys, xs = np.nonzero(img[r0:r1, c0:c1] > (0.95 + 0.12) / 2)
    x0, y0, x1, y1 = boxes["nodule"]
    assert c0 + xs.min() == pytest.approx(x0, abs=1.0) and c0 + xs.max() + 1 == pytest.approx(x1, abs=1.0)
    assert r0 + ys.min() == pytest.approx(y0, abs=1.0) and r0 + ys.max() + 1 == pytest.approx(y1, abs=1.0)


def test_effusion_and_edema_raise_density_where_the_truth_says():
    size = 96
    plain, _ = render(_clean(), size=size)
    eff, boxes = render(_clean(effusion="left", effusion_level=0.3), size=size)
    x0, y0, x1, y1 = (int(round(v)) for v in boxes["effusion"])
    inside = (slice(y0, y1), slice(x0, x1))
    assert eff[inside].mean() > plain[inside].mean() + 0.15
    # Nothing changes on the other side (the patient's right is the image's left).
    np.testing.assert_allclose(eff[:, : int(0.3 * size)], plain[:, : int(0.3 * size)])
    lung = boxes["right lung"]
    sl = (slice(int(lung[1]) + 2, int(lung[3]) - 2), slice(int(lung[0]) + 2, int(lung[2]) - 2))
    means = [render(_clean(edema=g), size=size)[0][sl].mean() for g in range(4)]
    assert all(b > a + 0.03 for a, b in zip(means, means[1:], strict=False))


def test_labels_follow_the_sampled_findings():
    rng = np.random.default_rng(0)
    for _ in range(200):
        ph = sample_phantom(rng)
        lab = ph.labels()
        assert lab["cardiomegaly"] == (ph.ctr > 0.5)
        assert lab["effusion"] == (ph.effusion is not None)
        assert lab["nodule"] == (ph.nodule is not None) and lab["opacity"] == (ph.opacity is not None)
        assert lab["edema"] == (ph.edema >= 1)
        if ph.nodule and ph.opacity:
            assert (ph.nodule.side, ph.nodule.zone) != (ph.opacity.side, ph.opacity.zone)
        if ph.effusion:  # no focal lesion hidden in the fluid
            for les in (ph.nodule, ph.opacity):
                assert les is None or (les.side, les.zone) != (ph.effusion, "lower")


def test_render_is_deterministic_and_validates_input():
    ph = sample_phantom(np.random.default_rng(5))
    a, _ = render(ph, size=48)
    b, _ = render(ph, size=48)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    with pytest.raises(ValueError, match="size"):
        render(ph, size=8)
    with pytest.raises(ValueError, match="side"):
        ph.lung("middle")


def test_heterogeneity_zero_makes_sources_identical_and_one_makes_them_differ():
    same = make_sources(7, 0.0)
    for s in same:
        assert dataclasses.replace(s, name="base") == BASE
    ph = sample_phantom(np.random.default_rng(1))
    imgs = [render_styled(ph, s, 48, np.random.default_rng(9))[0] for s in same]
    for im in imgs[1:]:
        np.testing.assert_array_equal(im, imgs[0])
    diff = make_sources(7, 1.0)
    assert len({(s.gamma, s.zoom, s.noise) for s in diff}) == 7
    half = make_sources(7, 0.5)
    assert half[2].gamma == pytest.approx(0.5 * (BASE.gamma + diff[2].gamma))
    with pytest.raises(ValueError, match="heterogeneity"):
        make_sources(7, 1.5)
