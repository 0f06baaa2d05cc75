"""Pseudonymised user ids: the keyed hash every output carries instead of the raw id (DESIGN §2).

One place computes it, so that units and quarantine records name a user the same way and no output, not
even a rejected row, keeps the raw id.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import os
import re

import polars as pl

from schemas.errors import ConfigError


def pseudonymise(user_ids: pl.Series, key: bytes | None) -> pl.Series:
    """Keyed HMAC-SHA256 of each user id (hex, 128 bits); plain SHA-256 only when explicitly unkeyed."""
    def one(u: str) -> str:
        if key is None:
            return hashlib.sha256(u.encode()).hexdigest()[:32]
        return hmac.new(key, u.encode(), hashlib.sha256).hexdigest()[:32]

    uniq = user_ids.unique()
    mapping = dict(zip(uniq.to_list(), [None if u is None else one(u) for u in uniq.to_list()], strict=True))
    return user_ids.replace_strict(mapping, return_dtype=pl.String)


def key_from_env(key_env: str | None) -> bytes | None:
    """The HMAC key for user ids from the environment variable ``key_env`` (None = explicitly unkeyed)."""
    if key_env is None:
        return None
    key = os.environ.get(key_env)
    if not key:
        raise ConfigError(f"privacy: environment variable {key_env} is not set; set it to a secret key "
                          "or set privacy.allow_unkeyed = true (user ids are then only hashed, not pseudonymised)")
    return key.encode()


_JSON_USER = re.compile(r'"user_id"\s*:\s*("(?:[^"\\]|\\.)*"|[^\s,}\]]+)')


def pseudonym(user_id: str, key: bytes | None) -> str:
    """The pseudonym of one user id, as :func:`pseudonymise` gives it."""
    return pseudonymise(pl.Series([user_id], dtype=pl.String), key)[0]


def redact_json_text(text: str, key: bytes | None, column: str = "user_id") -> str:
    """Raw text of a JSON record that could not be parsed, with each ``"user_id": value`` replaced by
    ``"user_hash": "<pseudonym>"`` (a string value is hashed as the text it holds, anything else as written)."""
    pattern = _JSON_USER if column == "user_id" else re.compile(
        rf'"{re.escape(column)}"\s*:\s*("(?:[^"\\]|\\.)*"|[^\s,}}\]]+)')

    def hashed(m: re.Match[str]) -> str:
        raw = m.group(1)
        if raw.startswith('"'):
            try:
                raw = json.loads(raw)
            except ValueError:
                raw = raw[1:-1]
        return f'"user_hash": "{pseudonym(str(raw), key)}"'

    return pattern.sub(hashed, text)


def redact_csv_text(text: str, header: list[str], key: bytes | None, delimiter: str = ",",
                    column: str = "user_id") -> str:
    """Raw text of a CSV row that could not be read, with the field that may hold the user id replaced by its
    pseudonym. With the header's number of fields that is the user-id column; with k fields too many (or too
    few) it is any of the k + 1 fields the id could have shifted to, so a raw id never survives."""
    if column not in header:
        return text
    fields = next(csv.reader(io.StringIO(text), delimiter=delimiter), [])
    if not fields:
        return text
    at, shift = header.index(column), len(fields) - len(header)
    lo, hi = (at, at + shift) if shift >= 0 else (at + shift, at)
    for i in range(max(lo, 0), min(hi, len(fields) - 1) + 1):
        fields[i] = pseudonym(fields[i], key)
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="").writerow(fields)
    return out.getvalue()
