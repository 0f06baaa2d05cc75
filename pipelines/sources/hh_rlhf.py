"""`obsfeed import hh-rlhf SRC OUT`: Anthropic HH-RLHF preference pairs as semi-synthetic feedback logs (docs/data.md).

Each pair becomes one prompt (the dialogue up to its final Assistant turn) with two responses, the final
Assistant turns: chosen (r* = 1) and rejected (r* = 0). What users *would* have logged is then simulated as in
the CausalRM protocol, so that the truth is known while the text is real:

* selection: feedback is given with ``p = p0 · α^(1−r*) · exp(length_selection · z_len)``, z_len the
  standardised log word count of the response (longer answers get rated more: the verbosity confounding of
  the observation), capped at 0.95;
* noise: the given thumb is r* flipped 1→0 with probability ρ01 and 0→1 with ρ10;
* audit: a random ``gold_share`` of the units, rated or not, carries a ``gold`` signal with r* (an annotation
  team's verdict, for the audited flip rates);
* split by pair: ``test_share`` of the pairs never enter the logs; they are ``test_pairs.parquet``, the
  held-out set the benchmark scores.

Writes the input contract (``impressions/part-00000.parquet``, ``signals.jsonl.gz``), ``truth.parquet`` for the
logged units, ``test_pairs.parquet`` and ``import.json`` (settings and counts). Seeded: the same arguments give
identical files.
"""

from __future__ import annotations

import argparse
import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.sources import public_data
from pipelines.sources.simulator import write_signals
from schemas import impressions as imp
from schemas import signals as sig
from schemas import truth as tr
from schemas.conform import conform
from schemas.errors import InputError

SOURCE_FILE = "harmless-base-test.jsonl.gz"
TURN = "\n\nAssistant:"
TEST_COLUMNS = ("pair_id", "prompt", "chosen", "rejected")
_START = np.datetime64("2026-11-01T00:00:00", "us")


@dataclass(frozen=True)
class HHSettings:
    """The simulated feedback on top of the real pairs; defaults follow issue 8 and docs/evaluation.md."""

    seed: int = 0
    alpha: float = 0.5
    p0: float = 0.45
    length_selection: float = 0.5
    rho01: float = 0.2
    rho10: float = 0.1
    gold_share: float = 0.1
    test_share: float = 0.2
    users: int = 500

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.rho01 + self.rho10 >= 1:
            raise ValueError(f"flip rates must sum to < 1, got {self.rho01} + {self.rho10}")
        if not 0 < self.test_share < 1 or not 0 <= self.gold_share <= 1:
            raise ValueError("test_share must be in (0, 1) and gold_share in [0, 1]")


def split_dialogue(text: str) -> tuple[str, str]:
    """(prompt, final Assistant turn) of an HH-RLHF transcript."""
    i = text.rfind(TURN)
    if i < 0:
        raise ValueError("no Assistant turn")
    return text[:i].strip(), text[i + len(TURN):].strip()


def read_pairs(path: Path | str, limit: int | None = None) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Pairs as {prompt, chosen, rejected}, and counts: lines read, pairs kept, and why any were skipped.

    The prompt is the chosen transcript's; in the few pairs whose transcripts differ before the final turn
    (5 of 2,312 in harmless-base test) the rejected response still answers its own, slightly different,
    dialogue: they are kept and counted as ``prefix_differs``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: HH-RLHF file not found")
    pairs: list[dict[str, str]] = []
    counts = {"lines": 0, "pairs": 0, "prefix_differs": 0, "skipped_malformed": 0, "skipped_identical": 0}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and counts["lines"] >= limit:
                break
            counts["lines"] += 1
            try:
                row = json.loads(line)
                prompt, chosen = split_dialogue(row["chosen"])
                rejected_prompt, rejected = split_dialogue(row["rejected"])
            except (ValueError, KeyError, TypeError):
                counts["skipped_malformed"] += 1
                continue
            if chosen == rejected:
                counts["skipped_identical"] += 1
                continue
            counts["prefix_differs"] += prompt != rejected_prompt
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    counts["pairs"] = len(pairs)
    if not pairs:
        raise InputError(f"{path}: no usable pairs")
    return pairs, counts


def semi_synthetic(pairs: list[dict[str, str]], s: HHSettings) -> dict[str, Any]:
    """Impressions, signals, truth and held-out test pairs (pure: no I/O)."""
    rng = np.random.default_rng(s.seed)
    n_pairs = len(pairs)
    test = rng.random(n_pairs) < s.test_share
    train_ids = np.flatnonzero(~test)
    # two units per training pair: chosen then rejected
    pair_of = np.repeat(train_ids, 2)
    r_star = np.tile([1, 0], train_ids.size)
    responses = [pairs[p]["chosen" if r else "rejected"] for p, r in zip(pair_of, r_star, strict=True)]
    n = pair_of.size
    log_words = np.log(np.maximum([len(t.split()) for t in responses], 1))
    z_len = (log_words - log_words.mean()) / max(log_words.std(), 1e-9)
    propensity = np.minimum(s.p0 * s.alpha ** (1 - r_star) * np.exp(s.length_selection * z_len), 0.95)
    observed = rng.random(n) < propensity
    flip = np.where(r_star == 1, rng.random(n) < s.rho01, rng.random(n) < s.rho10)
    noisy = np.where(flip, 1 - r_star, r_star)
    gold = rng.random(n) < s.gold_share
    chosen_first = rng.random(train_ids.size) < 0.5
    position = np.where(r_star == 1, np.repeat(~chosen_first, 2), np.repeat(chosen_first, 2)).astype(np.int32)
    ts = _START + (np.arange(n) * 60_000_000).astype("timedelta64[us]")
    ids = np.array([f"hh{p:05d}-{'c' if r else 'r'}" for p, r in zip(pair_of, r_star, strict=True)])
    impressions = conform(pa.table({
        imp.IMPRESSION_ID: ids, imp.TS: pa.array(ts, pa.timestamp("us", tz="UTC")),
        imp.USER_ID: [f"hh-user-{p % s.users}" for p in pair_of],
        imp.PROMPT_ID: [f"hh{p:05d}" for p in pair_of], imp.RESPONSE_ID: ids,
        imp.PROMPT: [pairs[p]["prompt"] for p in pair_of], imp.RESPONSE: responses,
        imp.MODEL_VERSION: ["hh-rlhf"] * n, imp.POSITION: position,
    }), imp.SCHEMA)
    rated, audited = np.flatnonzero(observed), np.flatnonzero(gold)
    event_ids = [f"{ids[i]}-thumb" for i in rated] + [f"{ids[i]}-gold" for i in audited]
    signals = conform(pa.table({
        sig.EVENT_ID: event_ids,
        sig.IMPRESSION_ID: np.concatenate([ids[rated], ids[audited]]),
        sig.TS: pa.array(np.concatenate([ts[rated] + np.timedelta64(30, "s"), ts[audited] + np.timedelta64(1, "D")]),
                         pa.timestamp("us", tz="UTC")),
        sig.TYPE: ["upvote" if noisy[i] else "downvote" for i in rated] + ["gold"] * audited.size,
        sig.VALUE: np.concatenate([np.full(rated.size, np.nan), r_star[audited].astype(float)]),
    }), sig.SCHEMA)
    truth = conform(pa.table({
        tr.IMPRESSION_ID: ids, tr.REWARD_TRUE: r_star.astype(float), tr.PROPENSITY_TRUE: propensity,
        tr.LABEL_CLEAN: r_star.astype(np.int8), tr.LABEL_NOISY: noisy.astype(np.int8),
        tr.OBSERVED_TRUE: observed.astype(np.int8),
        tr.LENGTH_EFFECT_TRUE: np.full(n, np.nan),      # real labels: the verbosity effect is not known
    }), tr.SCHEMA)
    test_ids = np.flatnonzero(test)
    test_pairs = pa.table({"pair_id": [f"hh{p:05d}" for p in test_ids],
                           "prompt": [pairs[p]["prompt"] for p in test_ids],
                           "chosen": [pairs[p]["chosen"] for p in test_ids],
                           "rejected": [pairs[p]["rejected"] for p in test_ids]})
    counts = {"train_pairs": int(train_ids.size), "test_pairs": int(test_ids.size), "units": int(n),
              "observed": int(observed.sum()), "gold": int(gold.sum()),
              "mean_propensity": float(propensity.mean()),
              "observed_positive_share": float(noisy[observed].mean()) if observed.any() else None}
    return {"impressions": impressions, "signals": signals, "truth": truth, "test_pairs": test_pairs,
            "counts": counts}


def write(result: dict[str, Any], out: Path, *, settings: HHSettings, source_counts: dict[str, int]) -> None:
    out = Path(out)
    (out / "impressions").mkdir(parents=True, exist_ok=True)
    pq.write_table(result["impressions"], out / "impressions" / "part-00000.parquet", compression="zstd")
    write_signals(result["signals"], out / "signals.jsonl.gz")
    pq.write_table(result["truth"], out / "truth.parquet", compression="zstd")
    pq.write_table(result["test_pairs"], out / "test_pairs.parquet", compression="zstd")
    (out / "import.json").write_text(json.dumps({"source": "hh-rlhf harmless-base test", "settings": asdict(settings),
                                                 "source_counts": source_counts, "counts": result["counts"]},
                                                indent=2) + "\n")


def import_hh_rlhf(src: Path | str, out: Path | str, settings: HHSettings = HHSettings(),
                   limit: int | None = None) -> dict[str, Any]:
    """Read ``src`` (the folder holding harmless-base-test.jsonl.gz, or the file itself) and write OUT."""
    src = Path(src)
    pairs, source_counts = read_pairs(src / SOURCE_FILE if src.is_dir() else src, limit=limit)
    result = semi_synthetic(pairs, settings)
    write(result, Path(out), settings=settings, source_counts=source_counts)
    return {**source_counts, **result["counts"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help=f"folder with {SOURCE_FILE}, $OBSFEED_DATA/hh-rlhf (now "
                        f"{public_data('hh-rlhf')}; docs/data.md), or the file")
    parser.add_argument("out", type=Path, help="output folder (impressions/, signals.jsonl.gz, truth.parquet, ...)")
    defaults = HHSettings()
    for name in ("seed", "alpha", "rho01", "rho10", "length_selection", "gold_share", "test_share"):
        default = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--limit", type=int, default=None, help="read only the first N lines")


def main(args: argparse.Namespace) -> dict[str, Any]:
    names = ("seed", "alpha", "rho01", "rho10", "length_selection", "gold_share", "test_share")
    try:
        settings = HHSettings(**{k: getattr(args, k) for k in names})
    except ValueError as e:
        raise InputError(f"import hh-rlhf: {e}") from e
    return import_hh_rlhf(args.src, args.out, settings, limit=args.limit)
