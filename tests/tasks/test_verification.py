"""The verification task: LFW's protocol figures (thresholds, ROC, TAR at FAR), and how a face run's summary and its
last test event agree."""
import numpy as np
import pytest

from danlu.tasks.verification import best_threshold, roc, scores, tar_at_far


def test_best_threshold_and_tar_at_far():
    assert best_threshold([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == (0.5, 1.0)
    assert best_threshold([0.3, 0.3, 0.3], [True, True, False]) == (pytest.approx(-0.7), pytest.approx(2 / 3))
    sim = np.array([0.9, 0.8, 0.7, 0.6, 0.85, 0.2, 0.1, 0.0])
    same = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    assert tar_at_far(sim, same, 0.0) == 0.25  # only 0.9 is above the impostor at 0.85
    assert tar_at_far(sim, same, 0.25) == 1.0
    r = scores(np.r_[sim, sim], np.r_[same, same])
    assert {"accuracy_mean", "accuracy_std", "tar_at_far_1e-3", "tar_at_far_1e-2", "roc_auc"} <= r.keys()
    # by hand: of the 16 (same, different) pairings, the same pair scores higher in 4 + 3 + 3 + 3 = 13
    assert r["roc_auc"] == pytest.approx(13 / 16)


def _mann_whitney_auc(sim, same):
    """P(a same pair scores above a different pair), ties counting one half: the ROC's area, computed directly."""
    pos, neg = sim[same][:, None], sim[~same][None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


@pytest.mark.parametrize("seed", range(4))
def test_roc_auc_agrees_with_scikit_learn_and_mann_whitney(seed):
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(seed)
    same = rng.random(300) < 0.4
    sim = np.round(rng.normal(same * 0.8, 0.5), 1)  # rounded to 0.1: many ties between same and different pairs
    r = scores(sim, same)
    assert r["roc_auc"] == pytest.approx(roc_auc_score(same, sim), abs=1e-12)
    assert r["roc_auc"] == pytest.approx(_mann_whitney_auc(sim, same), abs=1e-12)
    far, tar, _ = roc(sim, same)
    skfar, sktar, _ = roc_curve(same, sim, drop_intermediate=False)
    assert np.allclose(far, skfar) and np.allclose(tar, sktar)  # the same curve, point for point
    for target in (1e-2, 0.1, 0.5):  # the highest TAR among the points with FAR <= target
        assert tar_at_far(sim, same, target) == pytest.approx(sktar[skfar <= target].max())
