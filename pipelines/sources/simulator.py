"""`obsfeed simulate`: raw logs with known ground truth (docs/evaluation.md#simulator).

The world it simulates, per impression x (a response to a prompt, shown to a user):

* text carries quality: each response mixes neutral words with "good" and "bad" words, drawn according to
  a latent quality that depends on the model version; the true reward is a function of the text alone,
  ``reward_true = sigmoid(b + c * (n_good - n_bad) / n_words)``, and the clean label
  ``r* ~ Bernoulli(reward_true)`` (``label_clean``);
* verbosity bias and rater leaning: the label a user gives is drawn from ``reward_true + verbosity * z_len +
  rater_leaning * leaning(segment)`` (clipped), with the same uniform draw as r*, so that longer answers get
  more thumbs-up than they deserve and "power" users, who rate most, are harsher than "casual" ones (the
  leanings average to zero over the population, so the population's label still follows reward_true);
* noise: that label is flipped 1→0 with probability ρ01 and 0→1 with ρ10 (``label_noisy``);
* several raters: with ``raters_per_impression`` = k > 1, k − 1 other users (drawn at random, distinct per
  impression) also vote on every observed impression, each with their own segment's leaning and their own
  uniform draw and flip (the same model, independent noise; not coupled with r*), and every signal then names
  its rater in ``user_id``. The impression's user stays the first rater, whose label is ``label_noisy``; the
  truth (``reward_true``, ``label_clean``, selection) does not change with k, and k = 1 writes exactly the
  single-rater logs (no ``user_id`` column in the signals);
* selection: feedback is given with ``propensity_true = p0 * alpha**(1 - reward_true) * exp(length_selection *
  z_len - 0.3 * position + segment effect)``. The CausalRM protocol writes α^(1−r*); we use the reward
  ``reward_true`` = E[r*|x] in its place, so that selection is ignorable given x (what any x-based
  propensity model can identify) while still favouring good responses as α < 1;
* audit: a uniformly random ``gold_share`` of the impressions, observed or not, gets a ``gold`` signal whose
  value is the clean label r* (an annotation team's verdict), for audited flip rates and PPI estimates;
* a logged policy: with ``log_propensity`` the impressions carry ``logged_propensity`` = propensity_true, as
  logs of a randomised feedback prompt would (for ``fit.propensity_column``);
* dirt: duplicated impressions, replayed signal events, orphan signals, signals before their impression,
  unknown signal types and rows missing a required field, in known numbers.

Everything is drawn from one seeded ``numpy.random.Generator``: the same arguments give identical files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import impressions as imp
from schemas import signals as sig
from schemas import truth as tr
from schemas.conform import conform

SEGMENT = "user_segment"
LOGGED_PROPENSITY = "logged_propensity"
_SEGMENTS = np.array(["casual", "regular", "power"])
_SEGMENT_SHARE = np.array([0.5, 0.35, 0.15])
_SEGMENT_EFFECT = np.array([-0.8, 0.0, 0.8])       # log-odds-ish effect on giving feedback at all
_SEGMENT_LEANING = np.array([0.15, 0.0, -0.5])     # effect on the label given; zero mean over the population
_VERSIONS = np.array(["v1", "v2", "v3"])
_VERSION_QUALITY = np.array([-0.3, 0.0, 0.4])
_START = np.datetime64("2026-11-01T00:00:00", "us")


@dataclass(frozen=True)
class Scenario:
    """Knobs of the simulated world; see the module docstring for what each one does."""

    n_impressions: int = 20_000
    seed: int = 0
    responses_per_prompt: int = 4
    impressions_per_user: int = 20
    alpha: float = 0.5
    p0: float = 0.45
    length_selection: float = 0.35
    verbosity: float = 0.06
    rater_leaning: float = 1.0
    rho01: float = 0.2
    rho10: float = 0.1
    quality_scale: float = 7.0
    sentiment_share: float = 0.3
    dirty_share: float = 0.005
    implicit_rate: float = 1.0
    gold_share: float = 0.02
    log_propensity: bool = False
    raters_per_impression: int = 1

    def __post_init__(self) -> None:
        if self.n_impressions < self.responses_per_prompt:
            raise ValueError(f"n_impressions must be >= responses_per_prompt, got {self.n_impressions}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.rho01 + self.rho10 >= 1:
            raise ValueError(f"flip rates must sum to < 1, got {self.rho01} + {self.rho10}")
        if not 0 <= self.gold_share <= 1:
            raise ValueError(f"gold_share must be in [0, 1], got {self.gold_share}")
        if not 0 <= self.implicit_rate <= 1 / 0.35:      # the click probability 0.35 * rate must stay ≤ 1
            raise ValueError(f"implicit_rate must be in [0, {1 / 0.35:.2f}], got {self.implicit_rate}")
        n_users = self.n_impressions // self.responses_per_prompt * self.responses_per_prompt \
            // self.impressions_per_user
        if not 1 <= self.raters_per_impression <= max(1, n_users):
            raise ValueError(f"raters_per_impression must be in [1, number of users = {max(1, n_users)}], got "
                             f"{self.raters_per_impression}")


SCENARIOS: dict[str, Scenario] = {
    "default": Scenario(),
    "strong_selection": Scenario(alpha=0.1),
    "no_confounding": Scenario(length_selection=0.0, verbosity=0.0, rater_leaning=0.0),
    "clean": Scenario(rho01=0.0, rho10=0.0, dirty_share=0.0),
    "three_raters": Scenario(raters_per_impression=3),
}


def _vocabulary() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neutral, good and bad pseudo-words; fixed (independent of the seed) so that runs share a language."""
    rng = np.random.default_rng(12345)
    syllables = np.array([c + v for c in "bdfgklmnprstvz" for v in "aeiou"])
    words = np.unique(["".join(rng.choice(syllables, size=rng.integers(2, 4))) for _ in range(3000)])
    words = rng.permutation(words)
    return words[300:2300], words[:150], words[150:300]


@dataclass(frozen=True)
class SimulatedLogs:
    impressions: pa.Table
    signals: pa.Table
    truth: pa.Table


def simulate(scenario: Scenario) -> SimulatedLogs:
    """Draw impressions, signals and ground truth for ``scenario`` (pure: no I/O)."""
    s = scenario
    rng = np.random.default_rng(s.seed)
    neutral, good, bad = _vocabulary()
    k = s.responses_per_prompt
    n_prompts = s.n_impressions // k
    n = n_prompts * k
    n_users = max(1, n // s.impressions_per_user)

    # Who sees what, when.
    user_of_prompt = rng.integers(0, n_users, size=n_prompts)
    segment_of_user = rng.choice(len(_SEGMENTS), size=n_users, p=_SEGMENT_SHARE)
    prompt_idx = np.repeat(np.arange(n_prompts), k)
    position = np.tile(np.arange(k, dtype=np.int32), n_prompts)
    user = user_of_prompt[prompt_idx]
    segment = segment_of_user[user]
    prompt_ts = _START + (rng.random(n_prompts) * 86_400e6).astype("timedelta64[us]")
    ts = prompt_ts[prompt_idx] + (position * 2_000_000).astype("timedelta64[us]")
    version = rng.integers(0, len(_VERSIONS), size=n)

    # Text: prompts are neutral topic words; responses carry quality through good/bad words.
    prompt_len = rng.integers(6, 16, size=n_prompts)
    prompt_words = rng.choice(neutral, size=prompt_len.sum())
    prompts = np.array([" ".join(w) for w in np.split(prompt_words, np.cumsum(prompt_len)[:-1])], dtype=object)
    length = np.clip(np.round(rng.lognormal(np.log(35), 0.5, size=n)), 5, 250).astype(np.int64)
    quality = rng.normal(_VERSION_QUALITY[version], 1.0)
    word_owner = np.repeat(np.arange(n), length)
    is_sentiment = rng.random(word_owner.size) < s.sentiment_share
    is_good = rng.random(word_owner.size) < 1 / (1 + np.exp(-1.5 * quality[word_owner]))
    words = rng.choice(neutral, size=word_owner.size).astype(object)
    pos_mask, neg_mask = is_sentiment & is_good, is_sentiment & ~is_good
    words[pos_mask] = rng.choice(good, size=pos_mask.sum())
    words[neg_mask] = rng.choice(bad, size=neg_mask.sum())
    responses = np.array([" ".join(w) for w in np.split(words, np.cumsum(length)[:-1])], dtype=object)
    score = np.bincount(word_owner, weights=pos_mask.astype(float) - neg_mask, minlength=n) / length
    reward_true = 1 / (1 + np.exp(-s.quality_scale * score))

    # Labels: one uniform draw couples r* and the verbosity-biased label; then flips.
    z_len = (np.log(length) - np.log(35)) / 0.5
    u = rng.random(n)
    label_clean = (u < reward_true).astype(np.int8)
    leaning = s.rater_leaning * _SEGMENT_LEANING[segment]
    raw_perceived = reward_true + s.verbosity * z_len + leaning
    perceived = np.clip(raw_perceived, 0.001, 0.999)
    # z_len = (log length − log 35) / 0.5, so d perceived / d log length = verbosity / 0.5 where not clipped;
    # the flips scale every change in P(label = 1) by (1 − ρ01 − ρ10).
    length_effect = ((1 - s.rho01 - s.rho10) * s.verbosity / 0.5
                     * ((raw_perceived > 0.001) & (raw_perceived < 0.999)))
    label_biased = u < perceived
    flip = rng.random(n)
    label_noisy = np.where(label_biased, flip >= s.rho01, flip < s.rho10).astype(np.int8)

    # Selection into feedback.
    log_p = (np.log(s.p0) + (1 - reward_true) * np.log(s.alpha) + s.length_selection * z_len
             - 0.3 * position + _SEGMENT_EFFECT[segment])
    propensity = np.clip(np.exp(log_p), 0.005, 0.95)
    observed = (rng.random(n) < propensity).astype(np.int8)
    extra = _extra_raters(rng, s, user, segment_of_user, reward_true + s.verbosity * z_len, n_users)

    impression_id = np.array([f"i{j:09d}" for j in range(n)], dtype=object)
    impressions = pa.table({
        imp.IMPRESSION_ID: impression_id,
        imp.TS: pa.array(ts, imp.TIMESTAMP),
        imp.USER_ID: np.array([f"u{j:07d}" for j in user], dtype=object),
        imp.PROMPT_ID: np.array([f"p{j:08d}" for j in prompt_idx], dtype=object),
        imp.RESPONSE_ID: np.array([f"r{j:09d}" for j in range(n)], dtype=object),
        imp.PROMPT: prompts[prompt_idx],
        imp.RESPONSE: responses,
        imp.MODEL_VERSION: _VERSIONS[version],
        imp.POSITION: pa.array(position, pa.int32()),
        SEGMENT: _SEGMENTS[segment],
        **({LOGGED_PROPENSITY: propensity} if s.log_propensity else {}),
    })
    truth = pa.table({
        imp.IMPRESSION_ID: impression_id,
        tr.REWARD_TRUE: reward_true,
        tr.PROPENSITY_TRUE: propensity,
        tr.LABEL_CLEAN: label_clean,
        tr.LABEL_NOISY: label_noisy,
        tr.OBSERVED_TRUE: observed,
        tr.LENGTH_EFFECT_TRUE: length_effect,
    })
    user_ids = np.array([f"u{j:07d}" for j in user], dtype=object) if extra else None
    signals = _signals(rng, impression_id, ts, observed, label_noisy, reward_true, s.implicit_rate,
                       users=user_ids, extra=extra)
    impressions, signals = _add_dirt(rng, impressions, signals, s.dirty_share)
    signals = pa.concat_tables([signals, _gold(rng, impression_id, ts, label_clean, s.gold_share, signals.schema)])
    return SimulatedLogs(impressions, signals, conform(truth, tr.SCHEMA))


def _extra_raters(rng: np.random.Generator, s: Scenario, user: np.ndarray, segment_of_user: np.ndarray,
                  biased_reward: np.ndarray, n_users: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(user ids, given labels) of the raters after the impression's own user, one pair per extra rater: other
    users, distinct within an impression, whose label is drawn like the first rater's (their segment's leaning,
    then flips) with their own uniform draws. Empty for one rater per impression: then no draw is made."""
    extra: list[tuple[np.ndarray, np.ndarray]] = []
    offsets = [np.zeros(user.size, dtype=np.int64)]          # 0: the impression's user
    for _ in range(s.raters_per_impression - 1):
        off = rng.integers(1, n_users, size=user.size)
        while (clash := np.any([off == o for o in offsets], axis=0)).any():
            off[clash] = rng.integers(1, n_users, size=int(clash.sum()))
        offsets.append(off)
        rater = (user + off) % n_users
        perceived = np.clip(biased_reward + s.rater_leaning * _SEGMENT_LEANING[segment_of_user[rater]], 0.001, 0.999)
        biased, flip = rng.random(user.size) < perceived, rng.random(user.size)
        extra.append((np.array([f"u{j:07d}" for j in rater], dtype=object),
                      np.where(biased, flip >= s.rho01, flip < s.rho10).astype(np.int8)))
    return extra


def _signals(rng: np.random.Generator, impression_id: np.ndarray, ts: np.ndarray, observed: np.ndarray,
             label: np.ndarray, reward: np.ndarray, implicit_rate: float = 1.0, *, users: np.ndarray | None = None,
             extra: list[tuple[np.ndarray, np.ndarray]] = ()) -> pa.Table:
    """Signal events: the deciding thumbs on observed units, mind changes, and implicit signals (their
    probabilities scaled by ``implicit_rate``, which changes the volume of events but not the labels). With
    ``users`` (the impressions' user ids), every signal names its rater in ``user_id``, and each of ``extra``'s
    (user ids, labels) votes on the observed units as the impression's user does, mind changes included."""
    n = impression_id.size
    parts = []

    def add(idx: np.ndarray, delay: np.ndarray, types: np.ndarray | str, value: np.ndarray | None = None,
            who: np.ndarray | None = None) -> None:
        parts.append({
            sig.IMPRESSION_ID: impression_id[idx],
            sig.TS: ts[idx] + (delay * 1e6).astype("timedelta64[us]"),
            sig.TYPE: np.broadcast_to(np.asarray(types, dtype=object), (n,))[idx],
            sig.VALUE: np.full(idx.size, np.nan) if value is None else value[idx],
            **({sig.RATER: (users if who is None else who)[idx]} if users is not None else {}),
        })

    def sometimes(p: np.ndarray | float, mean_delay_s: float) -> tuple[np.ndarray, np.ndarray]:
        idx = np.flatnonzero(rng.random(n) < p)
        return idx, 1.0 + rng.exponential(mean_delay_s, size=idx.size)

    def vote(given: np.ndarray, who: np.ndarray | None) -> None:
        """The deciding vote; on 5% of the observed units an earlier, opposite one the rater changed."""
        final_delay = 2.0 + rng.exponential(120.0, size=voted.size)
        add(voted, final_delay, np.where(given == 1, "upvote", "downvote").astype(object), who=who)
        changed = rng.random(voted.size) < 0.05
        add(voted[changed], final_delay[changed] * rng.uniform(0.1, 0.9, size=changed.sum()),
            np.where(given == 1, "downvote", "upvote").astype(object), who=who)

    voted = np.flatnonzero(observed == 1)
    vote(label, None)
    k = implicit_rate
    add(*sometimes(k * 0.35, 30.0), "click")                        # implicit, no label
    add(*sometimes(k * (label == 1) * 0.25, 60.0), "copy")          # implicit, weak evidence of a good answer
    add(*sometimes(k * 0.15 * (1 - reward), 40.0), "regenerate")    # implicit, weak evidence of a poor one
    dwell_idx, dwell_delay = sometimes(k * 0.2, 5.0)
    add(dwell_idx, dwell_delay, "dwell", rng.exponential(30.0, size=n))
    for who, given in extra:                                  # the other raters of the observed units
        vote(given, who)
    cols = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    m = len(cols[sig.TYPE])
    return pa.table({
        sig.EVENT_ID: np.array([f"e{j:010d}" for j in range(m)], dtype=object),
        sig.IMPRESSION_ID: cols[sig.IMPRESSION_ID],
        sig.TS: pa.array(cols[sig.TS], imp.TIMESTAMP),
        sig.TYPE: cols[sig.TYPE],
        sig.VALUE: pa.array(cols[sig.VALUE], pa.float64(), from_pandas=True),
        **({sig.RATER: pa.array(cols[sig.RATER], pa.string())} if users is not None else {}),
    })


def _gold(rng: np.random.Generator, impression_id: np.ndarray, ts: np.ndarray, label_clean: np.ndarray,
          share: float, schema: pa.Schema) -> pa.Table:
    """Audit events: r* of a uniformly random ``share`` of the impressions, a day or so after them. Drawn
    last, so that the other draws do not depend on ``share``."""
    idx = np.flatnonzero(rng.random(impression_id.size) < share)
    delay = ((1.0 + rng.exponential(1.0, size=idx.size)) * 86_400e6).astype("timedelta64[us]")
    return pa.table({
        sig.EVENT_ID: np.array([f"g{j:010d}" for j in range(idx.size)], dtype=object),
        sig.IMPRESSION_ID: impression_id[idx],
        sig.TS: pa.array(ts[idx] + delay, imp.TIMESTAMP),
        sig.TYPE: np.full(idx.size, "gold", dtype=object),
        sig.VALUE: pa.array(label_clean[idx].astype(float), pa.float64()),
        **({sig.RATER: pa.nulls(idx.size, pa.string())} if sig.RATER in schema.names else {}),   # no user's vote
    }, schema=schema)


def _add_dirt(rng: np.random.Generator, impressions: pa.Table, signals: pa.Table,
              share: float) -> tuple[pa.Table, pa.Table]:
    """Append rows that ingest must deduplicate or quarantine, in known numbers."""
    n_imp, n_sig = impressions.num_rows, signals.num_rows
    k_imp, k_sig = int(round(share * n_imp)), int(round(share * n_sig))
    if k_imp == 0 and k_sig == 0:
        return impressions, signals
    # Impressions: exact duplicates one second later (the first by ts wins), and rows missing user_id.
    dup = impressions.take(rng.choice(n_imp, size=k_imp, replace=False))
    dup = dup.set_column(1, imp.TS, pa.array(dup[imp.TS].to_numpy() + np.timedelta64(1, "s"), imp.TIMESTAMP))
    missing = impressions.take(rng.choice(n_imp, size=k_imp, replace=False))
    missing = missing.set_column(0, imp.IMPRESSION_ID,
                                 pa.array([f"x{j:09d}" for j in range(k_imp)], pa.string()))
    missing = missing.set_column(2, imp.USER_ID, pa.nulls(k_imp, pa.string()))
    # Signals: replays, orphans, time travel, unknown types, missing event ids (all carry no label).
    replay = signals.take(rng.choice(n_sig, size=k_sig, replace=False))
    base = signals.take(rng.choice(n_sig, size=4 * k_sig, replace=True)).to_pydict()
    base[sig.TYPE] = ["click"] * (4 * k_sig)
    base[sig.EVENT_ID] = [f"z{j:010d}" for j in range(4 * k_sig)]
    for j in range(k_sig):                                               # orphans
        base[sig.IMPRESSION_ID][j] = f"gone{j:07d}"
    imp_ts = dict(zip(impressions[imp.IMPRESSION_ID].to_pylist(), impressions[imp.TS].to_pylist(), strict=True))
    for j in range(k_sig, 2 * k_sig):                                    # before their impression
        base[sig.TS][j] = imp_ts[base[sig.IMPRESSION_ID][j]] - dt.timedelta(minutes=1)
    for j in range(2 * k_sig, 3 * k_sig):                                # unknown type
        base[sig.TYPE][j] = "thumbs_sideways"
    for j in range(3 * k_sig, 4 * k_sig):                                # missing event id
        base[sig.EVENT_ID][j] = None
    bad = pa.table(base, schema=signals.schema)
    impressions = pa.concat_tables([impressions, dup, missing])
    signals = pa.concat_tables([signals, replay, bad])
    return (impressions.take(rng.permutation(impressions.num_rows)),
            signals.take(rng.permutation(signals.num_rows)))


def spread_over_days(logs: SimulatedLogs, n_days: int) -> SimulatedLogs:
    """The same logs over ``n_days`` consecutive days: each prompt (with its responses and their signals)
    moves to day hash(prompt_id) mod n_days. For scheduled runs (``obsfeed run --date``); the signals keep
    their delays, so the audits a day or more later reach into the next days, as late signals do."""
    prompts = logs.impressions[imp.PROMPT_ID].to_numpy(zero_copy_only=False)
    day_of_prompt = {p: int(hashlib.sha256(p.encode()).hexdigest(), 16) % n_days for p in set(prompts)}
    days = np.array([day_of_prompt[p] for p in prompts])
    day_of_id = dict(zip(logs.impressions[imp.IMPRESSION_ID].to_pylist(), days.tolist(), strict=True))
    signal_days = np.array([day_of_id.get(i, 0) for i in logs.signals[sig.IMPRESSION_ID].to_pylist()])
    return SimulatedLogs(_shift_days(logs.impressions, days), _shift_days(logs.signals, signal_days), logs.truth)


def _shift_days(table: pa.Table, days: np.ndarray) -> pa.Table:
    shifted = pc.add(table[imp.TS].combine_chunks(), pa.array(days.astype("int64") * 86_400_000_000,
                                                              pa.int64()).cast(pa.duration("us")))
    return table.set_column(table.schema.get_field_index(imp.TS), imp.TS, shifted)


def write_signals(signals: pa.Table, path: Path) -> None:
    """Signals as the input contract's JSON Lines (gzip, reproducible bytes): ISO timestamps with Z, null for a
    missing value."""
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        for row in signals.to_pylist():
            ts = row[sig.TS]
            row[sig.TS] = None if ts is None else ts.isoformat().replace("+00:00", "Z")
            if row[sig.VALUE] is not None and np.isnan(row[sig.VALUE]):
                row[sig.VALUE] = None
            f.write((json.dumps(row, separators=(",", ":")) + "\n").encode())


def write(logs: SimulatedLogs, out: Path, *, scenario: Scenario, n_impression_files: int = 2) -> dict[str, str]:
    """Write the logs in the input contract: impressions as Parquet parts, signals as JSON Lines (gzip)."""
    out = Path(out)
    (out / "impressions").mkdir(parents=True, exist_ok=True)
    for old in (out / "impressions").glob("part-*.parquet"):
        old.unlink()
    n = logs.impressions.num_rows
    bounds = np.linspace(0, n, n_impression_files + 1).astype(int)
    for j in range(n_impression_files):
        part = logs.impressions.slice(bounds[j], bounds[j + 1] - bounds[j])
        pq.write_table(part, out / "impressions" / f"part-{j:05d}.parquet", compression="zstd")
    write_signals(logs.signals, out / "signals.jsonl.gz")
    pq.write_table(logs.truth, out / "truth.parquet", compression="zstd")
    (out / "scenario.json").write_text(json.dumps(asdict(scenario), indent=2) + "\n")
    return {"impressions": str(out / "impressions"), "signals": str(out / "signals.jsonl.gz"),
            "truth": str(out / "truth.parquet")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder for impressions/, signals.jsonl.gz, truth.parquet")
    parser.add_argument("--impressions", type=int, default=None, help="number of impressions")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="default")
    parser.add_argument("--alpha", type=float, default=None, help="override the scenario's selection strength")
    parser.add_argument("--raters", type=int, default=None,
                        help="override the scenario's raters per observed impression (raters_per_impression)")


def main(args: argparse.Namespace) -> dict[str, object]:
    scenario = SCENARIOS[args.scenario]
    overrides = {k: v for k, v in (("n_impressions", args.impressions), ("seed", args.seed),
                                    ("alpha", args.alpha), ("raters_per_impression", args.raters))
                 if v is not None}
    scenario = replace(scenario, **overrides)
    logs = simulate(scenario)
    paths = write(logs, args.out, scenario=scenario)
    return {"impression rows": logs.impressions.num_rows, "signal rows": logs.signals.num_rows,
            "true units": logs.truth.num_rows, **paths}
