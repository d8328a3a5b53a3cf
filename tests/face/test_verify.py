import numpy as np
import pytest

from danlu.errors import DanluError
from danlu.face.verify import make_pairs, read_pairs
from danlu.tasks.verification import ten_fold


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


def test_a_pairs_file_shorter_than_its_first_line_says_is_refused(tmp_path):
    """`2 3` promises 2 folds of 3 same + 3 different pairs: a file cut after one fold used to score as '1 folds,
    accuracy 0.5 +- 0' with a threshold of 0; now it is one line naming the file and both counts."""
    root = _folder(tmp_path / "faces", {"ann": 3, "bob": 2})
    fold = "ann 1 2\n" * 3 + "ann 1 bob 1\n" * 3
    (tmp_path / "p.txt").write_text("2 3\n" + fold)
    with pytest.raises(DanluError, match=r"p.txt: 6 pairs, but line 1 says 2 folds of 3 same \+ 3 different pairs; "
                                         r"expected 12 pairs"):
        read_pairs(tmp_path / "p.txt", root)
    (tmp_path / "p.txt").write_text("2 3\n" + fold * 2)
    assert len(read_pairs(tmp_path / "p.txt", root)[0]) == 12
