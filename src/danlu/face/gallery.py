"""A face gallery: identities and their embeddings in one SQLite file, searched by a matrix product on the device.

    g = Gallery("staff.sqlite", fingerprint=run.fingerprint, create=True, info={...})   # enroll side
    g.add("Ada Lovelace", "ada/1.jpg", embedding)      # again with the same (name, source): updated, not duplicated
    matches = Gallery("staff.sqlite").identify(emb, top=5)    # [[(name, cosine), ...] per query], best first

Every query is parameterized (names are stored and returned verbatim, quotes and SQL included). The file is in WAL
mode, so readers (identify, a web server's threads) never block on, or see half of, an enrollment. The gallery
records the fingerprint of the model and preprocessing that made its embeddings; opening it with another refuses.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from danlu.errors import DanluError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identities (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS embeddings (
    id INTEGER PRIMARY KEY,
    identity_id INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    source TEXT NOT NULL,
    vector BLOB NOT NULL,
    UNIQUE (identity_id, source)
);
"""


class Gallery:
    """One gallery file. `fingerprint`: the model + preprocessing about to use it (refused when the gallery holds
    another's embeddings); `create`: make the file if missing, recording `fingerprint` and `info`."""

    def __init__(self, path: Union[str, Path], *, fingerprint: Optional[str] = None, create: bool = False,
                 info: Optional[dict[str, Any]] = None):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise DanluError(f"--gallery {self.path}: no such gallery; expected a file made by `danlu face enroll`")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock, self._cache = threading.Lock(), None
        try:
            with self._connect() as conn:
                if create:
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.executescript(_SCHEMA)
                    if fingerprint is not None:
                        conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", ("fingerprint", fingerprint))
                    for k, v in (info or {}).items():
                        conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (k, json.dumps(v)))
                    conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('version', '0')")
                self.meta = {k: v for k, v in conn.execute("SELECT key, value FROM meta")}
        except sqlite3.DatabaseError as e:
            raise DanluError(f"--gallery {self.path}: not a face gallery ({e}); expected a file made by "
                             f"`danlu face enroll`") from None
        if "fingerprint" not in self.meta:
            raise DanluError(f"--gallery {self.path}: not a face gallery (no fingerprint); expected a file made by "
                             f"`danlu face enroll`")
        if fingerprint is not None and self.meta["fingerprint"] != fingerprint:
            made = json.loads(self.meta.get("run", "null")) or "another run"
            raise DanluError(f"--gallery {self.path}: made with another model or preprocessing ({made}, fingerprint "
                             f"{self.meta['fingerprint'][:12]}); this run's fingerprint is {fingerprint[:12]}; expected "
                             f"a gallery enrolled with this run (enroll again into a new --gallery file)")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection for one unit of work: committed when the block ends, rolled back on error, then closed."""
        conn = sqlite3.connect(str(self.path), timeout=30)
        try:
            conn.execute("PRAGMA foreign_keys=ON")
            with conn:
                yield conn
        finally:
            conn.close()

    def info(self, key: str) -> Any:
        v = self.meta.get(key)
        return v if key == "fingerprint" or v is None else json.loads(v)

    def add(self, name: str, source: str, vector: Union[torch.Tensor, np.ndarray]) -> str:
        """Store one embedding of `name` from `source` (e.g. its file); 'added', or 'updated' when that (name, source)
        was enrolled before."""
        return self.add_many([(name, source, vector)])[0]

    def add_many(self, rows: list[tuple[str, str, Any]]) -> list[str]:
        """Several embeddings in one transaction; 'added' / 'updated' for each."""
        out = []
        with self._lock, self._connect() as conn:  # one transaction: readers see all of it or none
            for name, source, vector in rows:
                blob = np.asarray(torch.as_tensor(vector, dtype=torch.float32).cpu(), np.float32).tobytes()
                conn.execute("INSERT INTO identities(name) VALUES (?) ON CONFLICT(name) DO NOTHING", (name,))
                (ident,) = conn.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone()
                known = conn.execute("SELECT 1 FROM embeddings WHERE identity_id = ? AND source = ?",
                                     (ident, source)).fetchone()
                conn.execute("INSERT INTO embeddings(identity_id, source, vector) VALUES (?, ?, ?) "
                             "ON CONFLICT(identity_id, source) DO UPDATE SET vector = excluded.vector",
                             (ident, source, blob))
                out.append("updated" if known else "added")
            conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'version'")
        return out

    def identities(self) -> list[tuple[str, int]]:
        """[(name, number of embeddings)] in name order."""
        with self._connect() as conn:
            return [(n, c) for n, c in conn.execute(
                "SELECT i.name, COUNT(e.id) FROM identities i LEFT JOIN embeddings e ON e.identity_id = i.id "
                "GROUP BY i.id ORDER BY i.name")]

    def _vectors(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(names (I,), identity of each embedding (M,), embeddings (M, D)), reloaded only when the gallery changed."""
        with self._lock, self._connect() as conn:
            conn.execute("BEGIN")  # one snapshot for the version and the rows (WAL: readers never block)
            version = conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
            if self._cache is not None and self._cache[0] == version:
                return self._cache[1]
            names = [n for (n,) in conn.execute("SELECT name FROM identities ORDER BY id")]
            index = {n: k for k, n in enumerate(names)}
            rows = conn.execute("SELECT i.name, e.vector FROM embeddings e JOIN identities i ON i.id = e.identity_id "
                                "ORDER BY e.id").fetchall()
            conn.rollback()
        who = torch.tensor([index[n] for n, _ in rows], dtype=torch.long)
        vecs = torch.from_numpy(np.stack([np.frombuffer(b, np.float32) for _, b in rows])) if rows else \
            torch.zeros(0, 0)
        self._cache = (version, (names, who, vecs))
        return names, who, vecs

    def identify(self, emb: torch.Tensor, top: int = 5, device: Union[str, torch.device, None] = None
                 ) -> list[list[tuple[str, float]]]:
        """For each query embedding (Q, D): the `top` identities by their best cosine similarity, best first.
        One matrix product on `device` (default: the queries' device)."""
        names, who, vecs = self._vectors()
        if len(vecs) == 0:
            raise DanluError(f"--gallery {self.path}: holds no embeddings; enroll identities first")
        emb = torch.as_tensor(emb, dtype=torch.float32)
        emb = emb[None] if emb.dim() == 1 else emb
        if emb.shape[1] != vecs.shape[1]:
            raise DanluError(f"--gallery {self.path}: holds {vecs.shape[1]}-d embeddings; got {emb.shape[1]}-d")
        dev = torch.device(device) if device is not None else emb.device
        sim = emb.to(dev) @ vecs.to(dev).T  # (Q, M) cosine: both sides unit length
        best = torch.full((len(emb), len(names)), -2.0, device=dev)
        best = best.scatter_reduce(1, who.to(dev).expand(len(emb), -1), sim, reduce="amax")  # (Q, I) per identity
        k = min(top, len(names))
        vals, idx = best.topk(k, dim=1)
        return [[(names[i], round(float(v), 6)) for v, i in zip(vr.tolist(), ir.tolist())]
                for vr, ir in zip(vals.cpu(), idx.cpu())]
