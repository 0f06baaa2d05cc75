"""`obsfeed import coat SRC OUT`: the Coat shopping ratings (Schnabel et al. 2016) as feedback logs (docs/data.md).

Coat is the standard MNAR benchmark: 290 users rated 24 coats each that they chose themselves (train.ascii,
missing not at random), and 16 coats each assigned uniformly at random (test.ascii, the unbiased test set).
Mapping to the input contract (issue 8):

* one impression per (user, item) cell, all 290 × 300: the units the observation model sees, rated or not;
  user = prompt (``prompt`` = the token ``user<u>``), item = response (``response`` = ``item<i>``), so the reward
  model's hashed tokens are ids, and ``train.factors`` > 0 makes it matrix factorisation with biases;
* a self-selected rating is a ``rating`` signal whose value is the rating rescaled to [0, 1], (r − 1) / 4
  (the config's label rule is ``rating = "value"``; predictions map back as 1 + 4·p);
* user and item features (one-hot in the source) become categorical columns, one per group
  (``user_gender``, ``item_color``, ...), plus ``crosses``: a text column of every user-feature × item-feature
  token (``u_gender_women_X_i_color_navy``: one word for the text hasher). A feature-only propensity needs
  those interactions: every user rated exactly 24 items, so plain concatenated features collapse to item
  popularity;
* ``logged_propensity``: the published covariate-based propensity of the cell (propensities.ascii), for the
  logged-propensity variant (``fit.propensity_column``);
* the random ratings are ``test.parquet`` (impression id, user, item, rating 1–5): never in the logs.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.sources import public_data
from pipelines.sources.simulator import write_signals
from schemas import impressions as imp
from schemas import signals as sig
from schemas.conform import conform
from schemas.errors import InputError

LOGGED_PROPENSITY = "logged_propensity"
CROSSES = "crosses"
SHAPE = (290, 300)
_START = np.datetime64("2026-11-01T00:00:00", "us")


def _matrix(path: Path, shape: tuple[int, int] | None, dtype: type = float) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"{path}: Coat file not found")
    try:
        m = np.loadtxt(path, dtype=dtype, ndmin=2)
    except ValueError as e:
        raise InputError(f"{path}: not a whitespace-separated matrix ({e})") from e
    if shape is not None and m.shape != shape:
        raise InputError(f"{path}: expected a {shape[0]} x {shape[1]} matrix, found {m.shape[0]} x {m.shape[1]}")
    return m


def _features(folder: Path, kind: str, n: int) -> tuple[dict[str, list[str]], list[list[str]]]:
    """One categorical column per feature group (``<kind>_<group>``), and each row's active ``group=value`` tokens."""
    map_file = folder / f"{kind}_features_map.txt"
    if not map_file.is_file():
        raise InputError(f"{map_file}: Coat file not found")
    names = [line.strip() for line in map_file.read_text().splitlines() if line.strip()]   # values have spaces
    onehot = _matrix(folder / f"{kind}_features.ascii", (n, len(names)), int)
    groups = list(dict.fromkeys(name.split(":")[0] for name in names))
    columns: dict[str, list[str]] = {f"{kind}_{g}": ["<none>"] * n for g in groups}
    tokens: list[list[str]] = [[] for _ in range(n)]
    for row, col in zip(*np.nonzero(onehot), strict=True):
        group, value = names[col].split(":", 1)
        columns[f"{kind}_{group}"][row] = value
        tokens[row].append(re.sub(r"\W", "_", f"{kind[0]}_{group}_{value}"))   # one \w+ token for the hasher
    return columns, tokens


def read_coat(src: Path | str) -> dict[str, Any]:
    """The Coat folder's matrices and features, shapes checked."""
    src = Path(src)
    feats = src / "user_item_features"
    users, user_tokens = _features(feats, "user", SHAPE[0])
    items, item_tokens = _features(feats, "item", SHAPE[1])
    return {"train": _matrix(src / "train.ascii", SHAPE, int), "test": _matrix(src / "test.ascii", SHAPE, int),
            "propensity": _matrix(src / "propensities.ascii", SHAPE), "users": users, "items": items,
            "user_tokens": user_tokens, "item_tokens": item_tokens}


def coat_logs(c: dict[str, Any]) -> dict[str, Any]:
    """Impressions (every cell), rating signals (the self-selected ratings) and the random test ratings."""
    n_users, n_items = SHAPE
    u, i = np.divmod(np.arange(n_users * n_items), n_items)
    ids = np.array([f"coat-u{a:03d}-i{b:03d}" for a, b in zip(u, i, strict=True)])
    ts = _START + (np.arange(u.size) * 1_000_000).astype("timedelta64[us]")
    columns = {imp.IMPRESSION_ID: ids, imp.TS: pa.array(ts, pa.timestamp("us", tz="UTC")),
               imp.USER_ID: [f"u{a}" for a in u], imp.PROMPT_ID: [f"coat-u{a:03d}" for a in u],
               imp.RESPONSE_ID: [f"i{b}" for b in i], imp.PROMPT: [f"user{a}" for a in u],
               imp.RESPONSE: [f"item{b}" for b in i], imp.MODEL_VERSION: ["coat"] * u.size,
               imp.POSITION: np.zeros(u.size, np.int32)}
    impressions = conform(pa.table(columns), imp.SCHEMA)
    extra = {**{k: [v[a] for a in u] for k, v in c["users"].items()},
             **{k: [v[b] for b in i] for k, v in c["items"].items()},
             CROSSES: [" ".join(f"{x}_X_{y}" for x in c["user_tokens"][a] for y in c["item_tokens"][b])
                       for a, b in zip(u, i, strict=True)],
             LOGGED_PROPENSITY: c["propensity"][u, i]}
    for name, values in extra.items():
        impressions = impressions.append_column(name, pa.array(values))
    rated = np.flatnonzero(c["train"][u, i] > 0)
    ratings = c["train"][u[rated], i[rated]]
    signals = conform(pa.table({
        sig.EVENT_ID: [f"{x}-rating" for x in ids[rated]], sig.IMPRESSION_ID: ids[rated],
        sig.TS: pa.array(ts[rated] + np.timedelta64(60, "s"), pa.timestamp("us", tz="UTC")),
        sig.TYPE: ["rating"] * rated.size, sig.VALUE: (ratings - 1) / 4.0,
    }), sig.SCHEMA)
    tu, ti = np.nonzero(c["test"])
    test = pa.table({imp.IMPRESSION_ID: [f"coat-u{a:03d}-i{b:03d}" for a, b in zip(tu, ti, strict=True)],
                     "user": tu.astype(np.int32), "item": ti.astype(np.int32),
                     imp.PROMPT: [f"user{a}" for a in tu], imp.RESPONSE: [f"item{b}" for b in ti],
                     "rating": c["test"][tu, ti].astype(np.int8)})
    counts = {"users": n_users, "items": n_items, "impressions": int(u.size), "train_ratings": int(rated.size),
              "test_ratings": int(tu.size), "train_rating_counts": np.bincount(ratings, minlength=6)[1:].tolist()}
    return {"impressions": impressions, "signals": signals, "test": test, "counts": counts}


def import_coat(src: Path | str, out: Path | str) -> dict[str, Any]:
    logs = coat_logs(read_coat(src))
    out = Path(out)
    (out / "impressions").mkdir(parents=True, exist_ok=True)
    pq.write_table(logs["impressions"], out / "impressions" / "part-00000.parquet", compression="zstd")
    write_signals(logs["signals"], out / "signals.jsonl.gz")
    pq.write_table(logs["test"], out / "test.parquet", compression="zstd")
    (out / "import.json").write_text(json.dumps({"source": "coat (Schnabel et al. 2016)", "label": "(rating - 1) / 4",
                                                 "counts": logs["counts"]}, indent=2) + "\n")
    return logs["counts"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help=f"the Coat folder, $OBSFEED_DATA/coat (now {public_data('coat')}; "
                        "docs/data.md)")
    parser.add_argument("out", type=Path, help="output folder (impressions/, signals.jsonl.gz, test.parquet)")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return import_coat(args.src, args.out)
