"""Loss-curve curvature: exact on polynomials, accurate on noisy analytic curves, any step spacing."""

from __future__ import annotations

import numpy as np
import pytest

from dynamics.analysis import loss_curvature
from dynamics.analysis.loss_curvature import curvature_on_grid


def _uneven_steps(rng, n, last, start=1):
    """Dense early, sparse late (as when a probe schedule thins out), plus random jitter."""
    raw = start + (last - start) * rng.random(n) ** 2
    return np.unique(np.round(raw).astype(np.int64))


def _brute_force_grid(x, y, bandwidth, degree, resolution):
    """Reference: one weighted least-squares polynomial fit per grid point, points one by one."""
    delta = bandwidth / resolution
    x0 = x.min()
    n_bins = int(np.floor((x.max() - x0) / delta)) + 1
    b = np.minimum(np.floor((x - x0) / delta).astype(int), n_bins - 1)
    centers = x0 + (np.arange(n_bins) + 0.5) * delta
    out = np.full(n_bins, np.nan)
    for i, c in enumerate(centers):
        lag = b - i
        near = np.abs(lag) <= resolution - 1
        w = np.clip(1 - np.abs(lag[near] / resolution) ** 3, 0, None) ** 3
        if np.unique(b[near][w > 0]).size < degree + 2:
            continue
        u = (x[near] - c) / bandwidth
        vander = np.vander(u, degree + 1, increasing=True)
        sw = np.sqrt(w)
        beta = np.linalg.lstsq(vander * sw[:, None], y[near] * sw, rcond=None)[0]
        out[i] = 2 * beta[2] / bandwidth**2
    return centers, out


@pytest.mark.parametrize("degree", [2, 3])
def test_binned_moments_equal_point_by_point_weighted_fits(degree):
    rng = np.random.default_rng(0)
    x = _uneven_steps(rng, 400, 3000).astype(float)
    y = np.log(1 + 3 * np.exp(-x / 500)) + 0.05 * rng.standard_normal(x.size)
    centers, d2 = curvature_on_grid(
        np.zeros(x.size, int), x, y, 1, bandwidth=300.0, degree=degree, resolution=8
    )
    ref_c, ref = _brute_force_grid(x, y, 300.0, degree, 8)
    np.testing.assert_allclose(centers[0], ref_c)
    assert np.array_equal(np.isnan(d2[0]), np.isnan(ref))
    np.testing.assert_allclose(d2[0], ref, rtol=1e-7, atol=1e-12)


def test_cubic_log_loss_is_reproduced_exactly_on_an_uneven_grid_far_from_zero():
    rng = np.random.default_rng(1)
    x = _uneven_steps(rng, 600, 1_000_000 + 20_000, start=1_000_000).astype(float)
    t = (x - 1_000_000) / 20_000
    loss = np.exp(1.0 - 0.8 * t + 0.6 * t**2 - 0.3 * t**3)
    truth = (2 * 0.6 - 6 * 0.3 * t) / 20_000**2  # second derivative over steps
    est = loss_curvature(x, loss)
    ok = np.isfinite(est)
    assert ok.mean() > 0.99
    np.testing.assert_allclose(est[ok], truth[ok], rtol=1e-3, atol=1e-6 * np.abs(truth).max())


def test_noisy_sine_is_recovered_with_uneven_spacing():
    rng = np.random.default_rng(2)
    last = 20_000
    x = _uneven_steps(rng, 4000, last)
    omega = 2 * np.pi * 2 / last
    log_loss = 1.0 - 0.5 * x / last + 0.3 * np.sin(omega * x)
    truth = -0.3 * omega**2 * np.sin(omega * x)
    noisy = np.exp(log_loss + 0.05 * rng.standard_normal(x.size))
    est = loss_curvature(x, noisy, bandwidth=2000)
    inner = (x > 2000) & (x < last - 2000)
    rel_rmse = np.sqrt(np.mean((est[inner] - truth[inner]) ** 2)) / np.abs(truth).max()
    assert rel_rmse < 0.15
    # Bias check against a shuffled order of the same points: the estimate ignores input order.
    perm = rng.permutation(x.size)
    np.testing.assert_allclose(loss_curvature(x[perm], noisy[perm], bandwidth=2000), est[perm], rtol=1e-9)


def test_dense_early_logging_does_not_bias_the_curve():
    """The same curve logged every step and logged on a thinning schedule gives the same curvature."""
    rng = np.random.default_rng(3)
    last = 10_000
    every = np.arange(1, last + 1)
    sparse = _uneven_steps(rng, 1500, last)

    def curve(s):
        return np.exp(0.5 + 1.5 * np.exp(-s / 2500))

    truth = lambda s: (1.5 / 2500**2) * np.exp(-s / 2500)  # noqa: E731
    probe = np.linspace(1500, 8500, 50)
    a = loss_curvature(every, curve(every), bandwidth=1000, at=probe)
    b = loss_curvature(sparse, curve(sparse), bandwidth=1000, at=probe)
    np.testing.assert_allclose(a, truth(probe), rtol=0.02)
    np.testing.assert_allclose(b, truth(probe), rtol=0.02)


def _equivalent_weights(x, center, bandwidth, degree, resolution):
    """The estimate at ``center`` is sum_j L_j y_j; L from the weighted least-squares solution."""
    delta = bandwidth / resolution
    b = np.floor((x - x.min()) / delta).astype(int)
    i = int(round((center - x.min()) / delta - 0.5))
    lag = b - i
    w = np.where(np.abs(lag) <= resolution - 1, np.clip(1 - np.abs(lag / resolution) ** 3, 0, None) ** 3, 0.0)
    vander = np.vander((x - center) / bandwidth, degree + 1, increasing=True)
    hat = np.linalg.solve(vander.T @ (w[:, None] * vander), vander.T * w)
    return 2 * hat[2] / bandwidth**2


@pytest.mark.parametrize("bandwidth", [200.0, 400.0])
def test_noise_gives_unbiased_estimates_with_the_predicted_spread(bandwidth):
    """200 noisy copies of a log-linear curve: mean curvature 0, sd = sigma * ||L|| at an interior point."""
    rng = np.random.default_rng(4)
    n_rep, sigma = 200, 0.1
    x = np.arange(1, 2001, dtype=float)
    y = 2 - 1e-4 * x + sigma * rng.standard_normal((n_rep, x.size))
    ids = np.repeat(np.arange(n_rep), x.size)
    centers, d2 = curvature_on_grid(ids, np.tile(x, n_rep), y.ravel(), n_rep, bandwidth=bandwidth)
    mid = centers.shape[1] // 2
    est = d2[:, mid]
    predicted_sd = sigma * np.linalg.norm(_equivalent_weights(x, centers[0, mid], bandwidth, 3, 10))
    assert abs(est.mean()) < 4 * predicted_sd / np.sqrt(n_rep)
    assert 0.8 < est.std(ddof=1) / predicted_sd < 1.2


def test_not_estimable_points_are_nan_and_bad_values_are_dropped():
    x = np.arange(0, 2000, 10)
    loss = np.exp(-x / 1000.0)
    loss_bad = loss.copy()
    loss_bad[5] = -1.0  # log undefined: dropped, not an error
    loss_bad[7] = np.nan
    est = loss_curvature(x, loss_bad, bandwidth=200)
    assert np.all(np.isfinite(est))
    np.testing.assert_allclose(est, 0.0, atol=1e-12)  # log-linear: zero curvature
    # Outside the logged range -> NaN; too few points -> NaN everywhere.
    assert np.isnan(loss_curvature(x, loss, at=[-100, 5000])).all()
    assert np.isnan(loss_curvature([1, 2, 3], [1.0, 0.9, 0.8])).all()
    # A logging gap wider than the bandwidth: NaN inside the gap, finite on both sides.
    xg = np.r_[np.arange(0, 1000, 5), np.arange(4000, 5000, 5)]
    est_gap = loss_curvature(xg, np.exp(-xg / 1000.0), bandwidth=200, at=[500, 2500, 4500])
    assert np.isfinite(est_gap[0]) and np.isnan(est_gap[1]) and np.isfinite(est_gap[2])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="same length"):
        loss_curvature([1, 2, 3], [1.0, 2.0])
    with pytest.raises(ValueError, match="bandwidth"):
        loss_curvature(np.arange(10), np.ones(10), bandwidth=-1)
    with pytest.raises(ValueError, match="degree"):
        loss_curvature(np.arange(10), np.ones(10), degree=1)


def test_batched_series_equal_one_at_a_time():
    rng = np.random.default_rng(5)
    xs, ys, ids = [], [], []
    for s in range(4):
        x = _uneven_steps(rng, 300 + 50 * s, 2000 + 500 * s).astype(float)
        xs.append(x)
        ys.append(np.log(0.3 + np.exp(-x / (300 + 100 * s))) + 0.02 * rng.standard_normal(x.size))
        ids.append(np.full(x.size, s))
    c_all, d_all = curvature_on_grid(
        np.concatenate(ids), np.concatenate(xs), np.concatenate(ys), 4, bandwidth=250.0
    )
    for s in range(4):
        c1, d1 = curvature_on_grid(np.zeros(xs[s].size, int), xs[s], ys[s], 1, bandwidth=250.0)
        m = c1.shape[1]
        np.testing.assert_allclose(c_all[s, :m], c1[0])
        np.testing.assert_allclose(d_all[s, :m], d1[0], rtol=1e-9, atol=1e-15)
        assert np.isnan(c_all[s, m:]).all()
