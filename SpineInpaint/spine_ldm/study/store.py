"""Crash-safe, append-only answer store for reader studies (stdlib sqlite3).

Design
------
- One SQLite file per study (``answers.sqlite``), WAL journal, ``synchronous=FULL``;
  every answer is written in its own ``BEGIN IMMEDIATE`` transaction, so a process killed
  (even with SIGKILL) loses at most the answer being written and never corrupts the file.
- Append-only: changing an answer inserts a new row; readers of the store take the newest
  row per (reader, case) ("last wins"); the whole history is kept for audit.
- Readers are identified by a random token created by the organizer. Only
  ``sha256(token)`` is stored. Every reader-facing query takes a ``reader_id`` and filters
  on it, so one reader can never see or change another reader's answers.
- Organizer-only functions (``all_latest``, ``export_rows``) are not reachable from a
  reader token; the web app never calls them.
- Private files: the database is created 600 (SQLite gives its ``-wal`` / ``-shm`` files the same
  mode); :func:`private_dir` and :func:`write_private_text` create the study's folders 700 and
  files 600 (answers, tokens' hashes and the truth key are nobody else's business).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import InputError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS readers (
    reader_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    token_hash  TEXT NOT NULL UNIQUE,
    seed        INTEGER NOT NULL,
    created     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    row_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    reader_id   INTEGER NOT NULL REFERENCES readers(reader_id),
    case_id     TEXT NOT NULL,
    values_json TEXT NOT NULL,
    complete    INTEGER NOT NULL,
    seconds     REAL,
    client      TEXT NOT NULL DEFAULT '',
    created     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_reader_case ON answers(reader_id, case_id, row_id);
CREATE TABLE IF NOT EXISTS views (
    row_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    reader_id   INTEGER NOT NULL REFERENCES readers(reader_id),
    case_id     TEXT NOT NULL,
    opened      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS views_reader_case ON views(reader_id, case_id, row_id);
"""


def private_dir(path: str | Path) -> Path:
    """Create ``path`` (and missing parents) readable by the owner only (700); an existing folder keeps its mode."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
    return path


def write_private_text(path: str | Path, text: str) -> Path:
    """Write a text file readable and writable by the owner only (600), also when it already existed."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)
        fh = os.fdopen(fd, "w", encoding="utf-8", newline="")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        fh.write(text)
    return path


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def hash_token(token: str) -> str:
    """sha256 hex of a reader token (tokens are 192-bit random, so a fast hash is enough)."""
    return hashlib.sha256(str(token).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Reader:
    reader_id: int
    name: str
    seed: int


@dataclass(frozen=True)
class Answer:
    row_id: int
    reader_id: int
    case_id: str
    values: dict
    complete: bool
    seconds: float | None
    client: str
    created: str

    def public(self) -> dict:
        """What the reader may see of their own answer."""
        return {"case_id": self.case_id, "values": dict(self.values), "complete": self.complete,
                "seconds": self.seconds, "created": self.created}


class AnswerStore:
    """Thread-safe handle on the study's answer database (one sqlite connection per thread)."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise InputError(f"answer store {self.path} does not exist; create the study first")
        private_dir(self.path.parent)
        if not self.path.exists():  # 600 from the start; SQLite creates -wal / -shm with the same mode
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
        self._local = threading.local()
        con = self._con()
        with con:
            con.executescript(_SCHEMA)
            con.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # -- connection -----------------------------------------------------------------
    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=True)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("PRAGMA busy_timeout=30000")
            self._local.con = con
        return con

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    def _write(self, sql: str, params: Iterable[Any]) -> int:
        con = self._con()
        con.execute("BEGIN IMMEDIATE")
        try:
            cur = con.execute(sql, tuple(params))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return int(cur.lastrowid)

    # -- readers --------------------------------------------------------------------
    def add_reader(self, name: str, seed: int | None = None) -> tuple[Reader, str]:
        """Create a reader; returns (reader, token). The token is shown once and never stored."""
        name = str(name).strip()
        if not name or len(name) > 100:
            raise InputError(f"reader name must be 1-100 characters, got {len(name)}")
        if self.reader_by_name(name) is not None:
            raise InputError(f"reader {name!r} already exists in {self.path}")
        token = secrets.token_urlsafe(24)
        if seed is None:
            seed = secrets.randbelow(2**31)
        rid = self._write("INSERT INTO readers(name, token_hash, seed, created) VALUES (?,?,?,?)",
                          (name, hash_token(token), int(seed), _now()))
        return Reader(rid, name, int(seed)), token

    def authenticate(self, token: str | None) -> Reader | None:
        """Reader for a token, or None. Constant-time compare on the hash."""
        if not token or not isinstance(token, str) or len(token) > 200:
            return None
        h = hash_token(token)
        row = self._con().execute("SELECT reader_id, name, seed, token_hash FROM readers WHERE token_hash = ?",
                                  (h,)).fetchone()
        if row is None or not hmac.compare_digest(row[3], h):
            return None
        return Reader(int(row[0]), row[1], int(row[2]))

    def reader_by_name(self, name: str) -> Reader | None:
        row = self._con().execute("SELECT reader_id, name, seed FROM readers WHERE name = ?", (name,)).fetchone()
        return Reader(int(row[0]), row[1], int(row[2])) if row else None

    def readers(self) -> list[Reader]:
        rows = self._con().execute("SELECT reader_id, name, seed FROM readers ORDER BY reader_id").fetchall()
        return [Reader(int(r[0]), r[1], int(r[2])) for r in rows]

    # -- answers (reader-scoped) --------------------------------------------------------
    def record_view(self, reader_id: int, case_id: str) -> None:
        self._write("INSERT INTO views(reader_id, case_id, opened) VALUES (?,?,?)", (int(reader_id), str(case_id), _now()))

    def last_view(self, reader_id: int, case_id: str) -> str | None:
        row = self._con().execute(
            "SELECT opened FROM views WHERE reader_id = ? AND case_id = ? ORDER BY row_id DESC LIMIT 1",
            (int(reader_id), str(case_id))).fetchone()
        return row[0] if row else None

    def submit(self, reader_id: int, case_id: str, values: dict, complete: bool, seconds: float | None = None,
               client: str = "") -> int:
        """Append one answer row (one transaction). Returns its row id."""
        if seconds is not None:
            seconds = float(seconds)
            if not (0.0 <= seconds < 1e7):
                raise InputError(f"seconds must be in [0, 1e7), got {seconds}")
        return self._write(
            "INSERT INTO answers(reader_id, case_id, values_json, complete, seconds, client, created) "
            "VALUES (?,?,?,?,?,?,?)",
            (int(reader_id), str(case_id), json.dumps(values, sort_keys=True), int(bool(complete)), seconds,
             str(client)[:40], _now()))

    @staticmethod
    def _answer(row) -> Answer:
        return Answer(int(row[0]), int(row[1]), row[2], json.loads(row[3]), bool(row[4]),
                      None if row[5] is None else float(row[5]), row[6], row[7])

    _COLS = "row_id, reader_id, case_id, values_json, complete, seconds, client, created"

    def latest_answers(self, reader_id: int) -> dict[str, Answer]:
        """Newest answer per case of ONE reader."""
        rows = self._con().execute(
            f"SELECT {self._COLS} FROM answers WHERE reader_id = ? AND row_id IN "
            "(SELECT MAX(row_id) FROM answers WHERE reader_id = ? GROUP BY case_id)",
            (int(reader_id), int(reader_id))).fetchall()
        return {r[2]: self._answer(r) for r in rows}

    def history(self, reader_id: int, case_id: str) -> list[Answer]:
        rows = self._con().execute(
            f"SELECT {self._COLS} FROM answers WHERE reader_id = ? AND case_id = ? ORDER BY row_id",
            (int(reader_id), str(case_id))).fetchall()
        return [self._answer(r) for r in rows]

    # -- organizer only ---------------------------------------------------------------
    def all_latest(self) -> list[Answer]:
        """Newest answer per (reader, case), all readers. Organizer only (report/export)."""
        rows = self._con().execute(
            f"SELECT {self._COLS} FROM answers WHERE row_id IN "
            "(SELECT MAX(row_id) FROM answers GROUP BY reader_id, case_id) ORDER BY reader_id, row_id").fetchall()
        return [self._answer(r) for r in rows]

    def all_rows(self) -> list[Answer]:
        rows = self._con().execute(f"SELECT {self._COLS} FROM answers ORDER BY row_id").fetchall()
        return [self._answer(r) for r in rows]

    def integrity_check(self) -> str:
        return str(self._con().execute("PRAGMA integrity_check").fetchone()[0])
