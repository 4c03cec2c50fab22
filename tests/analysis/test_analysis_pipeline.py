"""End to end on a synthetic store: the planted construction effect is found, unaffected signals are not."""

from __future__ import annotations

import numpy as np

from dynamics.analysis import compare, correlate, delta_m, features
from tests.analysis.analysis_synthetic import make_runset


def test_planted_fisher_se_difference_and_score_link_are_found():
    rs = make_runset(n_models=6, n_seeds=3, n_steps=120, seed=1)
    feats = features(rs)
    res = compare(feats, by="construction", pair_on=("model", "seed"), groups=("DMAX", "IMAX"), n_boot=0)
    res = res.set_index("feature")
    se = res.loc["fisher_se/all/mean"]
    assert se["paired"] and se["n_pairs"] == 18
    assert se["p_holm"] < 0.01 and se["diff"] < -0.2 and se["rank_biserial"] == -1.0
    # Losses and cosines do not depend on the construction in this store.
    unaffected = res[res.index.str.startswith(("loss/", "grad_cosine/"))]
    assert len(unaffected) > 50 and (unaffected["p_bh"] > 0.05).all()
    # The score rises with IMAX, so it falls with the Fisher SE; a loss statistic is unrelated.
    cor = correlate(feats, features=["fisher_se/all/mean", "loss/cls/late"], n_boot=0, n_perm=0).set_index(
        "feature"
    )
    assert cor.loc["fisher_se/all/mean", "r"] < -0.5 and cor.loc["fisher_se/all/mean", "p_value"] < 1e-3
    assert cor.loc["loss/cls/late", "p_value"] > 0.01
    dm = delta_m(feats, by="construction", baseline="DMAX", pair_on=("model", "seed"))
    assert len(dm) == 18 and np.mean(dm["delta_m"]) > 3  # +0.03 on ~0.6 = +5%
