import numpy as np
import pytest

from danlu.errors import DanluError
from danlu.face.verify import best_threshold, make_pairs, read_pairs, roc, scores, tar_at_far, ten_fold


def _folder(root, counts):
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i:02d}.png").write_bytes(b"x")  # only listed, never decoded here
    return root


def test_lfw_protocol_on_a_hand_made_pairs_file(tmp_path):
    """10 folds of 2 pairs (header '10 1': 1 same + 1 different per fold). Known similarities: every same pair 0.9
    and every different pair 0.1, except fold 3 whose different pair scores 0.95 and fold 7 whose same pair scores
    0.05. Training on the other 9 folds always gives a threshold between 0.1 and 0.9 (0.5 exactly: the midpoint),
    so folds 3 and 7 score 1/2 and the others 2/2."""
    root = _folder(tmp_path / "faces", {"ann": 3, "bob": 3, "cy": 2})
    lines = ["10\t1"]
    for k in range(10):
        lines += ["ann\t1\t2" if k % 2 else "bob\t2\t3", "ann\t3\tcy\t2"]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    pairs, fold_of = read_pairs(tmp_path / "pairs.txt", root)
    assert len(pairs) == 20 and list(fold_of) == [k for k in range(10) for _ in range(2)]
    assert pairs[0] == (root / "bob" / "01.png", root / "bob" / "02.png", True)
    assert pairs[1] == (root / "ann" / "02.png", root / "cy" / "01.png", False)
    same = np.array([p[2] for p in pairs])
    sim = np.where(same, 0.9, 0.1)
    sim[7] = 0.95  # fold 3's different pair
    sim[14] = 0.05  # fold 7's same pair
    r = ten_fold(sim, same, fold_of=fold_of)
    assert r["fold_accuracies"] == [1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0]
    assert r["fold_thresholds"] == [0.5] * 10
    assert r["accuracy_mean"] == pytest.approx(0.9) and r["accuracy_std"] == pytest.approx(0.2)


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


def test_make_pairs_is_balanced_seeded_and_readable(tmp_path):
    root = _folder(tmp_path / "faces", {"a": 4, "b": 3, "c": 5, "d": 1})
    text, info = make_pairs(root, n=2, folds=5, seed=3)
    assert text == make_pairs(root, n=2, folds=5, seed=3)[0] != make_pairs(root, n=2, folds=5, seed=4)[0]
    pairs, fold_of = read_pairs_text(tmp_path, text, root)
    same = [p[2] for p in pairs]
    assert info["per_fold"] == 2 and len(pairs) == 20 and sum(same) == 10
    assert len(set(pairs)) == 20 and all(a != b for a, b, _ in pairs)
    assert [same[i] for i in range(4)] == [True, True, False, False] and fold_of.max() == 4
    text, info = make_pairs(root, n=100, folds=5)  # 6 + 3 + 10 = 19 same pairs: 3 per fold
    assert info["per_fold"] == 3 and text.startswith("5\t3\n")


def read_pairs_text(tmp_path, text, root):
    (tmp_path / "p.txt").write_text(text)
    return read_pairs(tmp_path / "p.txt", root)


@pytest.mark.parametrize("line, match", [("ann 1 9", "image 9 of 'ann' does not exist; expected 1..3"),
                                         ("zed 1 2", "identity 'zed' has no folder"),
                                         ("ann 1 2 3 4 5", "6 fields"), ("ann one 2", "not a number")])
def test_bad_pairs_lines_are_named(tmp_path, line, match):
    root = _folder(tmp_path / "faces", {"ann": 3, "bob": 2})
    (tmp_path / "p.txt").write_text("ann 1 2\n" * 12 + line + "\n")
    with pytest.raises(DanluError, match=match) as e:
        read_pairs(tmp_path / "p.txt", root)
    assert "line 13" in str(e.value)
