import sqlite3
import threading

import pytest
import torch
import torch.nn.functional as F

from danlu.errors import DanluError
from danlu.face.gallery import Gallery

FP = "a" * 64


def _unit(*v):
    return F.normalize(torch.tensor(v, dtype=torch.float32), dim=0)


def test_enroll_identify_round_trip_and_update_not_duplicate(tmp_path):
    g = Gallery(tmp_path / "g.sqlite", fingerprint=FP, create=True, info={"model": "m"})
    assert g.add("ann", "ann/1.png", _unit(1, 0, 0)) == "added"
    assert g.add_many([("bob", "bob/1.png", _unit(0, 1, 0)), ("bob", "bob/2.png", _unit(0, 1, 0.2))]) == ["added"] * 2
    assert g.add("ann", "ann/1.png", _unit(1, 0.1, 0)) == "updated"  # the same file again: updated
    assert g.identities() == [("ann", 1), ("bob", 2)]
    reader = Gallery(tmp_path / "g.sqlite")
    result = reader.identify(torch.stack([_unit(0.9, 0.1, 0), _unit(0, 1, 0.1)]), top=2)
    assert [r[0][0] for r in result] == ["ann", "bob"] and len(result[0]) == 2
    assert result[0][0][1] == pytest.approx(float(_unit(0.9, 0.1, 0) @ _unit(1, 0.1, 0)), abs=1e-5)
    g.add("cy", "cy/1.png", _unit(0, 0, 1))
    assert reader.identify(_unit(0, 0, 1), top=1) == [[("cy", 1.0)]]  # the reader sees the new identity
    assert reader.info("model") == "m"


@pytest.mark.parametrize("name", ["O'Brien", 'say "cheese"', "x'); DROP TABLE identities; --", "Robert\\\"; --"])
def test_names_with_quotes_and_sql_are_stored_verbatim(tmp_path, name):
    g = Gallery(tmp_path / "g.sqlite", fingerprint=FP, create=True)
    g.add(name, f"{name}/1.png", _unit(1, 0))
    g.add("other", "o/1.png", _unit(0, 1))
    assert g.identities() == sorted([(name, 1), ("other", 1)])
    assert g.identify(_unit(1, 0), top=1)[0][0][0] == name
    with sqlite3.connect(tmp_path / "g.sqlite") as conn:  # the tables are all still there
        assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")} >= {
            "meta", "identities", "embeddings"}


def test_a_gallery_of_another_model_is_refused(tmp_path):
    Gallery(tmp_path / "g.sqlite", fingerprint=FP, create=True, info={"run": "runs/a"}).add("ann", "1", _unit(1, 0))
    with pytest.raises(DanluError, match="made with another model") as e:
        Gallery(tmp_path / "g.sqlite", fingerprint="b" * 64)
    assert "runs/a" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DanluError, match="no such gallery"):
        Gallery(tmp_path / "none.sqlite")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(DanluError, match="not a face gallery"):
        Gallery(tmp_path / "junk.sqlite")


def test_readers_while_enrolling(tmp_path):
    g = Gallery(tmp_path / "g.sqlite", fingerprint=FP, create=True)
    g.add("seed", "s", _unit(1, 0, 0))
    errors, done = [], threading.Event()

    def read():
        r = Gallery(tmp_path / "g.sqlite", fingerprint=FP)
        while not done.is_set():
            try:
                names = [n for n, _ in r.identify(_unit(1, 0, 0), top=50)[0]]
                assert len(names) == len(set(names)) and "seed" in names
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                return

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for k in range(40):
        g.add_many([(f"p{k}", f"p{k}/{j}", _unit(0, 1, j)) for j in range(3)])
    done.set()
    for t in threads:
        t.join()
    assert not errors and len(g.identities()) == 41
