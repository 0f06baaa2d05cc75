"""Pseudonymised user ids: the keyed hash every output carries instead of the raw id (docs/input-contract.md).

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


class Pseudonyms:
    """Pseudonyms already computed for one key, as a table (``frame``: user id ``u`` → pseudonym ``h``): a DoFn
    keeps one across the buckets it processes, since a user's impressions fall in every bucket (at 1M impressions,
    50k users were hashed 350k times without it). A table, so that finding a bucket's new users and mapping its
    rows back are joins, not a Python loop over every user of every bucket. Emptied when it would grow past
    ``max_users``, so that memory stays bounded."""

    def __init__(self, max_users: int = 1_000_000):
        self.max_users = max_users
        self.frame = pl.DataFrame(schema={"u": pl.String, "h": pl.String})

    def __len__(self) -> int:
        return self.frame.height


def pseudonymise(user_ids: pl.Series, key: bytes | None, known: Pseudonyms | None = None) -> pl.Series:
    """Keyed HMAC-SHA256 of each user id (hex, 128 bits); plain SHA-256 only when explicitly unkeyed. ``known``:
    pseudonyms computed before with the same key, looked up instead of recomputed (and added to)."""
    def one(u: str) -> str:
        if key is None:
            return hashlib.sha256(u.encode()).hexdigest()[:32]
        return hmac.new(key, u.encode(), hashlib.sha256).hexdigest()[:32]

    def hashed(users: pl.Series) -> pl.DataFrame:
        return pl.DataFrame({"u": users, "h": pl.Series([one(u) for u in users.to_list()], dtype=pl.String)})

    user_ids = user_ids.cast(pl.String)                       # an all-null column may come typed as null
    uniq = user_ids.drop_nulls().unique().alias("u")          # each user hashed once (null: null)
    if known is None:
        mapping = hashed(uniq)
    else:
        looked_up = uniq.to_frame().join(known.frame, on="u", how="left")    # this bucket's users only
        seen, new = looked_up.filter(pl.col("h").is_not_null()), looked_up.filter(pl.col("h").is_null())["u"]
        if len(known) + len(new) > known.max_users:                         # new users would overflow it
            known.frame, seen, new = known.frame.clear(), seen.clear(), uniq
        added = hashed(new)
        known.frame = pl.concat([known.frame, added], rechunk=known.frame.n_chunks() >= 64)
        mapping = pl.concat([seen, added])
    return (user_ids.to_frame("u").join(mapping, on="u", how="left", maintain_order="left")["h"]
            .alias(user_ids.name))


def key_from_env(key_env: str | None) -> bytes | None:
    """The HMAC key for user ids from the environment variable ``key_env`` (None = explicitly unkeyed)."""
    if key_env is None:
        return None
    key = os.environ.get(key_env)
    if not key:
        raise ConfigError(f"privacy: environment variable {key_env} is not set; set it to a secret key "
                          "or set privacy.allow_unkeyed = true (user ids are then only hashed, not pseudonymised)")
    return key.encode()


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SCALAR = re.compile(r"[-+\w.]+")
_LOOSE_KEY = r"{}(?:_|\\u005[fF]|\\x5[fF])?{}"


def pseudonym(user_id: str, key: bytes | None) -> str:
    """The pseudonym of one user id, as :func:`pseudonymise` gives it."""
    return pseudonymise(pl.Series([user_id], dtype=pl.String), key)[0]


def redact_json_text(text: str, key: bytes | None, column: str = "user_id") -> str:
    """Raw text of a JSON record that could not be parsed, with each ``"user_id": value`` replaced by
    ``"user_hash": "<pseudonym>"`` (a string value is hashed as the text it holds, a number as written).

    What cannot be redacted for sure is withheld whole (its pseudonym and length stand in for it): a value that
    is not a complete string or a scalar (an object, a list, a string cut off), or the key spelled another way
    (``"user\\u005fid"``, ``'user_id'``)."""
    head, _, tail = column.partition("_")
    loose = re.compile(_LOOSE_KEY.format(re.escape(head), re.escape(tail)) if tail else re.escape(column), re.I)
    key_at = re.compile(rf'"{re.escape(column)}"\s*:\s*')
    out, pos = [], 0
    for m in key_at.finditer(text):
        value = _STRING.match(text, m.end()) or _SCALAR.match(text, m.end())
        if value is None:                              # an object, a list, a string cut off
            return _withheld(text, key)
        raw = value.group()
        if raw.startswith('"'):
            try:
                raw = json.loads(raw)
            except ValueError:
                return _withheld(text, key)
        out += [text[pos:m.start()], f'"user_hash": "{pseudonym(str(raw), key)}"']
        pos = value.end()
    redacted = "".join([*out, text[pos:]])
    return _withheld(text, key) if loose.search(redacted) else redacted


def _withheld(text: str, key: bytes | None) -> str:
    return f"<withheld: {len(text)} characters that may hold a raw user id; pseudonym {pseudonym(text, key)}>"


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
