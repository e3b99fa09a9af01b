"""The answer log: every `ask` / `chat` / `eval` answer, appended to `data_dir()/answers.sqlite`.

Why SQLite: one file, no server, safe with several writers. The database runs in WAL mode with a busy timeout and
every write is one `BEGIN IMMEDIATE` transaction, so two `ask` processes finishing at the same moment both succeed
(one waits a few milliseconds for the other).

The schema is versioned with `PRAGMA user_version`; `MIGRATIONS[v]` brings a version v-1 database to v, inside
one transaction, so an old log is upgraded in place the first time a newer medrwr-edge opens it, and a log from a
newer medrwr-edge is refused rather than damaged.

Privacy: the log stores the question, the answer, the reasoning and the hashes of the input images, scrubbed by
evidence/privacy.py (no pixels, no patient identifiers, study dates cut to the year).
Logging is off with `MEDRWR_EDGE_NO_LOG=1` or a command's `--no-log`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from ..errors import InputError, MedrwrError
from ..paths import data_dir
from .privacy import scrub_record
from .record import EvidenceRecord, check_record_dict

LOG_FILE = "answers.sqlite"
NO_LOG_ENV = "MEDRWR_EDGE_NO_LOG"
COMMANDS = ("ask", "chat", "eval", "replay", "api")
BUSY_TIMEOUT_MS = 30_000


def log_path() -> Path:
    return data_dir() / LOG_FILE


def logging_enabled(no_log: bool = False) -> bool:
    """False when the command got `--no-log` or the environment says MEDRWR_EDGE_NO_LOG=1 (or true/yes/on)."""
    if no_log:
        return False
    return os.environ.get(NO_LOG_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


# ------------------------------------------------------------------------------------------- migrations


def _v1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE answers (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            logged TEXT NOT NULL,              -- UTC time the entry was written
            command TEXT NOT NULL,             -- ask | chat | eval | replay | api
            question TEXT NOT NULL,
            answer TEXT,
            letter TEXT,
            confidence REAL,
            status TEXT NOT NULL,
            model_name TEXT NOT NULL,
            model_sha256 TEXT NOT NULL,
            record_json TEXT NOT NULL          -- the full evidence record, images scrubbed (see scrub_record)
        )"""
    )
    conn.execute("CREATE INDEX answers_logged ON answers(logged)")


def _v2(conn: sqlite3.Connection) -> None:
    """Search columns for `logs --query`: the model's queries and the input image hashes, backfilled."""
    conn.execute("ALTER TABLE answers ADD COLUMN queries TEXT NOT NULL DEFAULT ''")
    conn.execute("ALTER TABLE answers ADD COLUMN image_sha256 TEXT NOT NULL DEFAULT ''")
    conn.execute("ALTER TABLE answers ADD COLUMN cdir_changed INTEGER")
    rows = conn.execute("SELECT id, record_json FROM answers").fetchall()
    for row_id, record_json in rows:
        try:
            record = json.loads(record_json)
        except ValueError:
            continue  # an unreadable old entry keeps empty search columns rather than blocking the upgrade
        conn.execute("UPDATE answers SET queries = ?, image_sha256 = ?, cdir_changed = ? WHERE id = ?",
                     (*_search_columns(record), row_id))


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _v1, 2: _v2}
SCHEMA_VERSION = max(MIGRATIONS)


def _search_columns(record: dict) -> tuple[str, str, Optional[int]]:
    steps = record.get("steps") or []
    queries = "\n".join(s.get("text", "") for s in steps if isinstance(s, dict) and s.get("type") == "query")
    images = " ".join(im.get("sha256", "") for im in record.get("images") or [] if isinstance(im, dict))
    cdir = next((s for s in steps if isinstance(s, dict) and s.get("type") == "cdir"), None)
    return queries, images, (int(bool(cdir.get("changed"))) if cdir else None)


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring the log to schema `target` (default: the latest); returns the version it was at."""
    (found,) = conn.execute("PRAGMA user_version").fetchone()
    if found > SCHEMA_VERSION:
        raise MedrwrError(
            f"the answer log uses schema version {found}, written by a newer medrwr-edge; this one reads up to "
            f"version {SCHEMA_VERSION} (upgrade medrwr-edge)"
        )
    if found >= target:
        return found
    conn.execute("BEGIN IMMEDIATE")  # another process may be migrating: re-read the version under the lock
    try:
        (found,) = conn.execute("PRAGMA user_version").fetchone()
        for version in range(found + 1, target + 1):
            MIGRATIONS[version](conn)
        conn.execute(f"PRAGMA user_version = {int(max(found, target))}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found


# ---------------------------------------------------------------------------------------------- the log


@dataclass
class LogEntry:
    id: int
    logged: str
    command: str
    question: str
    answer: Optional[str]
    letter: Optional[str]
    confidence: Optional[float]
    status: str
    model_name: str
    model_sha256: str
    queries: list[str] = field(default_factory=list)
    image_sha256: list[str] = field(default_factory=list)
    cdir_changed: Optional[bool] = None

    def to_dict(self) -> dict:
        return asdict(self)


_ENTRY_COLUMNS = ("id, logged, command, question, answer, letter, confidence, status, model_name, model_sha256, "
                  "queries, image_sha256, cdir_changed")


def _entry(row) -> LogEntry:
    (id_, logged, command, question, answer, letter, confidence, status, model_name, model_sha256, queries,
     images, cdir_changed) = row
    return LogEntry(id_, logged, command, question, answer, letter, confidence, status, model_name, model_sha256,
                    [q for q in queries.split("\n") if q], images.split(),
                    None if cdir_changed is None else bool(cdir_changed))


class AnswerLog:
    """An open answer log. `eval` keeps one open for a whole run; `append_record` opens one per answer."""

    def __init__(self, path: Optional[Union[str, os.PathLike]] = None):
        self.path = Path(path) if path is not None else log_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise MedrwrError(f"cannot open the answer log {self.path}: {e} (turn logging off with {{no_log}})",
                              names=("no_log",)) from None
        try:
            self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._set_wal()
            migrate(self.conn)
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise MedrwrError(
                f"the answer log {self.path} is damaged or not a SQLite database ({e}); move it aside to start a "
                "new log"
            ) from None
        except BaseException:
            self.conn.close()
            raise

    def _set_wal(self) -> None:
        # Switching to WAL needs a moment of exclusive access; a concurrent first open can see SQLITE_BUSY here
        # even with a busy timeout, so retry briefly. Once a database is in WAL mode this is a no-op.
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self.conn.execute("PRAGMA journal_mode = WAL").fetchone()
                self.conn.execute("PRAGMA synchronous = NORMAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def append(self, record: Union[EvidenceRecord, dict], command: str = "ask") -> int:
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}; one of {COMMANDS}")
        data = scrub_record(record)
        check_record_dict(data, "evidence record")
        model = data.get("model") or {}
        queries, images, cdir_changed = _search_columns(data)
        logged = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            cur = self.conn.execute(
                "INSERT INTO answers (logged, command, question, answer, letter, confidence, status, model_name, "
                "model_sha256, record_json, queries, image_sha256, cdir_changed) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (logged, command, data["question"], data.get("answer"), data.get("letter"), data.get("confidence"),
                 data.get("status", ""), str(model.get("name", "")), str(model.get("sha256", "")),
                 json.dumps(data, ensure_ascii=False), queries, images, cdir_changed),
            )
            self.conn.execute("COMMIT")
        except sqlite3.Error as e:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise MedrwrError(f"cannot write to the answer log {self.path}: {e} (turn logging off with {{no_log}})",
                              names=("no_log",)) from None
        return int(cur.lastrowid)

    def entries(self, n: Optional[int] = 20, query: Optional[str] = None) -> list[LogEntry]:
        """The newest `n` entries (all when n is None), newest first; `query` filters case-insensitively on the
        question, answer, the model's queries, and image sha256 (prefix)."""
        sql, args = f"SELECT {_ENTRY_COLUMNS} FROM answers", []
        if query:
            like = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            sql += (" WHERE question LIKE ? ESCAPE '\\' OR answer LIKE ? ESCAPE '\\' OR queries LIKE ? ESCAPE '\\'"
                    " OR (' ' || image_sha256) LIKE ? ESCAPE '\\'")
            args = [like, like, like, "% " + query.lower().replace("%", "").replace("_", "") + "%"]
        sql += " ORDER BY id DESC"
        if n is not None:
            sql += " LIMIT ?"
            args.append(int(n))
        return [_entry(r) for r in self.conn.execute(sql, args)]

    def record(self, log_id: int) -> dict:
        row = self.conn.execute("SELECT record_json FROM answers WHERE id = ?", (int(log_id),)).fetchone()
        if row is None:
            raise InputError(f"no answer with log id {log_id} in {self.path}")
        return json.loads(row[0])

    def count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM answers").fetchone()[0])

    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "AnswerLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def append_record(record: Union[EvidenceRecord, dict], command: str = "ask",
                  path: Optional[Union[str, os.PathLike]] = None) -> int:
    """Append one answer to the log; returns its log id (for `medrwr-edge replay LOG_ID`)."""
    with AnswerLog(path) as log:
        return log.append(record, command)


def log_if_enabled(record: Union[EvidenceRecord, dict], command: str = "ask",
                   no_log: bool = False) -> Optional[int]:
    """Append the answer unless logging is off (`no_log`: the command's --no-log; or MEDRWR_EDGE_NO_LOG): its log
    id, or None when it was not logged."""
    if not logging_enabled(no_log):
        return None
    return append_record(record, command)


@dataclass
class Logged:
    """What `finish_answer` did with an answer: its log id (None: logging off or failed) and why it failed."""

    log_id: Optional[int] = None
    error: Optional[MedrwrError] = None


def finish_answer(record: Union[EvidenceRecord, dict], command: str, no_log: bool = False) -> Logged:
    """After every answer (`ask`, `chat`, `serve`): append it to the answer log. An unwritable log must not cost the user
    the answer, so a failure is returned to the caller to report in its own words, never raised."""
    try:
        return Logged(log_if_enabled(record, command, no_log))
    except MedrwrError as e:
        return Logged(None, e)


def read_logged_record(log_id: int, path: Optional[Union[str, os.PathLike]] = None) -> dict:
    p = Path(path) if path is not None else log_path()
    if not p.exists():
        raise InputError(f"no answer log yet at {p}, so there is no log id {log_id}")
    with AnswerLog(p) as log:
        return log.record(log_id)


def purge_history_entries(history_id: str, path: Optional[Union[str, os.PathLike]] = None) -> int:
    """Delete every logged answer whose record searched patient history `history_id`; returns how many.

    Used by `medrwr-edge history delete` only. An answer that used a history names it in its record's packs list
    (role "patient-history", the opaque "history_id"); its reasoning may quote the history, so the whole entry
    goes. `secure_delete` overwrites the freed pages and the WAL is checkpointed and truncated, so the text does
    not linger in the database files either.
    """
    p = Path(path) if path is not None else log_path()
    if not history_id or not p.exists():
        return 0
    with AnswerLog(p) as log:
        conn = log.conn
        try:
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute("BEGIN IMMEDIATE")
            doomed = []
            for row_id, record_json in conn.execute(
                    "SELECT id, record_json FROM answers WHERE instr(record_json, ?) > 0", (history_id,)):
                try:
                    packs = json.loads(record_json).get("packs") or []
                except (ValueError, AttributeError):
                    doomed.append(row_id)  # unreadable, yet it names the history: remove rather than keep
                    continue
                if any(isinstance(pk, dict) and pk.get("history_id") == history_id for pk in packs):
                    doomed.append(row_id)
            conn.executemany("DELETE FROM answers WHERE id = ?", [(i,) for i in doomed])
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise MedrwrError(f"cannot remove the history's answers from the answer log {p}: {e}") from None
    return len(doomed)
