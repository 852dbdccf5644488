"""Crash-safe store of teacher answers: one SQLite row per answer, committed on arrival.

SQLite commits are atomic, so a ``kill -9`` at any instant leaves every answer that was
committed readable and none half-written. Keys hash *what was asked* (model, messages,
sampling settings, variant slot), never credentials or endpoints.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any


def request_key(payload: dict[str, Any]) -> str:
    """Stable key of a teacher request (a JSON-able dict without secrets)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


_SCHEMA = "CREATE TABLE answers (key TEXT PRIMARY KEY, texts TEXT NOT NULL, cost REAL NOT NULL)"


class NotACache(RuntimeError):
    """The path holds something other than an answer cache; it is left untouched."""


class AnswerCache:
    """``key → (texts, cost)``; every ``put`` is durable when it returns."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        if path.is_dir():
            raise NotACache(f"--cache {path} is a directory; pass a file path")
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            tables = [
                name
                for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            columns = [c[1] for c in self._db.execute("PRAGMA table_info(answers)")]
            if tables not in ([], ["answers"]) or (tables and columns != ["key", "texts", "cost"]):
                self._db.close()
                raise NotACache(
                    f"--cache {path} is an SQLite database of something else (tables "
                    f"{sorted(tables)}); it was not touched. Pass another --cache path"
                )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            if not tables:
                self._db.execute(_SCHEMA)
        except sqlite3.DatabaseError as err:
            self._db.close()
            raise NotACache(
                f"--cache {path} is not an answer cache ({err}); it was not touched. Pass "
                "another --cache path, or remove the file if it is yours to lose"
            ) from None

    def get(self, key: str) -> tuple[list[str], float] | None:
        row = self._db.execute("SELECT texts, cost FROM answers WHERE key = ?", (key,)).fetchone()
        return (json.loads(row[0]), row[1]) if row else None

    def put(self, key: str, texts: list[str], cost: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO answers VALUES (?, ?, ?)", (key, json.dumps(texts), cost)
        )

    def close(self) -> None:
        self._db.close()
