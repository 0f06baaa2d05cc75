"""`make bench`: run the benchmarks, print their figures and record them in RESULTS.md.

``python -m benchmarks [ingest|fit|estimators|trainer|losses|schedule|votes|all] [N_IMPRESSIONS]``: the ingest
benchmark (default N 1,000,000; the scaling run uses N/10), fit and score against a baseline commit's code
(default at 50k, 200k and 1M impressions), the estimator benchmark over simulator scenarios
(default N 200,000), the trainer's loader throughput (default N 200,000; plus a MiniLM-L6 row on the first 4,000
when obsfeed[minilm] is installed), every reward-model loss over 3 seeds
(default N 60,000), a simulated week run day by day against one run (default N 70,000), and mean vs latest vote
aggregation with three raters per reply over 3 seeds (default N 20,000).
``python -m benchmarks realdata`` (``make bench-real``, not part of ``all``): the public datasets in
$OBSFEED_DATA (``pipelines.sources.public_data``, docs/data.md) through the pipeline, over 5 seeds, and HH-RLHF
fine-tuning MiniLM-L6 on 3 of them (skipped when obsfeed[minilm] is not installed).
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_estimators import bench_estimators, clean_table, estimators_table, stabilised_table
from benchmarks.bench_fit import SIZES, bench_fit, fit_table
from benchmarks.bench_ingest import bench_ingest, compare
from benchmarks.bench_realdata import backbone_table, bench_coat, bench_hh, coat_table, hh_table
from benchmarks.bench_schedule import bench_schedule, schedule_table
from benchmarks.bench_trainer import bench_losses, bench_throughput, losses_table, throughput_table
from benchmarks.bench_votes import bench_votes, votes_table

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BASELINE_NOTE = "the baseline commit (OBSFEED_BENCH_BASELINE)"
BEGIN, END = "<!-- ingest:begin -->", "<!-- ingest:end -->"
EST_BEGIN, EST_END = "<!-- estimators:begin -->", "<!-- estimators:end -->"
BENCHES = ("ingest", "fit", "estimators", "trainer", "losses", "schedule", "votes")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=RESULTS.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def ingest_table(small: dict, large: dict, figures: dict) -> str:
    """The RESULTS.md block for the ingest benchmark: what was measured in this run, nothing else."""
    rows = [
        ("time, Beam / polars (1 process; Beam's import in the baseline's process taken off)",
         f"{figures['time_ratio_beam_over_polars']:.3f}", "≤ 1.5 (stretch 1.2)"),
        ("time, Beam / polars with Beam's import in the baseline (as measured before 2026-12-03)",
         f"{figures['time_ratio_with_beam_import_in_baseline']:.3f}", "—"),
        ("Beam's import, share of the baseline's process", f"{figures['beam_import_share_of_baseline_process']:.0%}",
         "(taken off the baseline)"),
        ("time, Beam without its units gate / polars", f"{figures['time_ratio_without_units_gate']:.3f}",
         "(the baseline has no gate)"),
        ("units gate (Arrow on every row, GX import + a 20,000-row sample), share of Beam time",
         f"{figures['units_gate_share_of_beam_time']:.0%}", "≤ 10%"),
        ("peak RSS, Beam / polars", f"{figures['rss_ratio_beam_over_polars']:.2f}", "—"),
        ("scaling, Beam t(N) / t(N/10)", f"{figures['scaling_beam_t_large_over_t_small']:.2f}", "≤ 11"),
        ("scaling, polars t(N) / t(N/10)", f"{figures['scaling_polars_t_large_over_t_small']:.2f}", "—"),
        ("peak RSS growth, Beam RSS(N) / RSS(N/10)", f"{figures['rss_growth_beam_large_over_small']:.2f}",
         "flat (1.0 = constant)"),
        ("peak RSS growth, polars RSS(N) / RSS(N/10)", f"{figures['rss_growth_polars_large_over_small']:.2f}", "—"),
        ("Beam input events per second (impressions + signals)", f"{figures['beam_events_per_s']:,.0f}", "—"),
    ]
    lines = [
        BEGIN,
        f"Measured {dt.date.today().isoformat()} at commit `{_commit()}`: N = {large['impressions']:,} impressions"
        f" + {large['signals']:,} signal events ({large['input_rows']:,} input rows, {large['units']:,} units);"
        f" N/10 = {small['impressions']:,} + {small['signals']:,}.",
        "",
        "| figure | this run | target |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        END,
    ]
    return "\n".join(lines)


def record(block: str, begin: str = BEGIN, end: str = END) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def main(argv: list[str]) -> int:
    which = argv[0] if argv and not argv[0].isdigit() else "all"
    n = int(argv[-1]) if argv and argv[-1].isdigit() else None
    if which not in (*BENCHES, "all", "realdata"):
        print(f"unknown benchmark {which!r}: choose {', '.join(BENCHES)}, all or realdata", file=sys.stderr)
        return 2
    if which == "realdata":
        run_realdata()
        return 0
    if which in ("ingest", "all"):
        run_ingest(n or 1_000_000)
    if which in ("fit", "all"):
        run_fit((n,) if n else SIZES)
    if which in ("estimators", "all"):
        run_estimators(n or 200_000)
    if which in ("trainer", "all"):
        run_trainer(n or 200_000)
    if which in ("losses", "all"):
        run_losses(n or 60_000)
    if which in ("schedule", "all"):
        run_schedule(n or 70_000)
    if which in ("votes", "all"):
        run_votes(n or 20_000)
    return 0


def record_block(tag: str, context: str, rows: list[str]) -> None:
    """Print ``rows`` and record them in RESULTS.md between ``<!-- tag:begin/end -->``, under a dated line naming
    the commit and ``context`` (what was measured)."""
    print("\n".join(rows))
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    record("\n".join([begin, f"Measured {dt.date.today().isoformat()} at commit `{_commit()}`: {context}", "", *rows,
                       end]), begin, end)


def run_realdata() -> None:
    print("real-data benchmark: Coat, 2 propensity variants x 5 training seeds", flush=True)
    record_block("coat", "configs/coat.toml, trained on the 6,960 self-selected ratings (early stopping on 10% of "
                 "them), tested on the 4,640 uniformly random ratings; the pipeline once per propensity variant, "
                 "then training seeds 0-4; mean ± sd over the seeds.", coat_table(bench_coat()))
    print("real-data benchmark: HH-RLHF harmless-base (semi-synthetic feedback), seeds 0-4; MiniLM-L6 on seeds 0-2",
          flush=True)
    hh = bench_hh()
    record_block("hh-rlhf", "harmless-base test pairs, 80% of pairs logged with simulated selection (α 0.5, longer "
                 "answers rated more) and flips (ρ 0.2/0.1), 10% of units audited; metrics on the 20% held-out "
                 "pairs, mean ± sd over seeds 0-4 (each seed redraws selection, flips, audit and split).",
                 hh_table(hh))
    t = hh["transformer"]
    if t is None:
        print("HH-RLHF transformer block not run (MiniLM-L6 not installed): its RESULTS.md record is left as it was")
        return
    seeds = ", ".join(map(str, t["seeds"]))
    record_block("hh-rlhf-transformer", f"the hashed block's runs of seeds {seeds} (same logs, fit and score "
                 "stages, test pairs); their train stage again with naive and causalrm_dr fine-tuning "
                 "sentence-transformers/all-MiniLM-L6-v2 (obsfeed[minilm]) on a seeded random "
                 f"{t['share']:.0%} of each seed's training prompts (all their units), batch {t['batch_size']}, the "
                 "trainer's transformer defaults otherwise (lr 5e-5, linear decay, 10% warmup, clipping 1.0), "
                 "calibrated on the audit of those units; the oracle (naive loss on r*) on the same units; on CPU "
                 "(2 cores). Sizes chosen for time only. Cells: mean ± sd over the seeds, and in brackets the "
                 "seed-paired difference from the same backbone's naive with its Student-t 95% CI; the hashed rows "
                 "are the block above.", backbone_table(hh))


def run_fit(sizes: tuple[int, ...]) -> None:
    print(f"fit/score benchmark: this commit against {BASELINE_NOTE} at {', '.join(f'{n:,}' for n in sizes)} "
          "impressions", flush=True)
    result = bench_fit(sizes)
    record_block("fit", f"the default simulator world at each size, ingested once; fit and score each run in a "
                 f"fresh process (`obsfeed run --stages fit`, then `score`) on copies of the ingested run, with this "
                 f"commit's code and with commit `{result['baseline']}`'s (a git worktree), default config with "
                 "`model_version` and `user_segment` as categorical features; wall_s and peak_rss_mb from each "
                 "stage's manifest record. Ratio = this commit / baseline (lower is faster).", fit_table(result))


def run_trainer(n: int) -> None:
    print(f"trainer benchmark: streaming loader vs in-memory tensors, {n:,} impressions", flush=True)
    result = bench_throughput(n)
    record_block("trainer", f"{result['train_rows']:,} training rows (rated units of {n:,} impressions), median of "
                 f"{result['rounds']} alternating measurements of {result['epochs']} epochs each, ips loss, linear "
                 f"model over {2**18:,} hashed features.{_transformer_context(result['transformer'])}",
                 throughput_table(result))


def _transformer_context(t: dict | None) -> str:
    if t is None:
        return " Transformer row not measured (MiniLM-L6 not installed)."
    return (f" Transformer row: {t['train_rows']:,} training rows (rated units of the first {t['impressions']:,} "
            f"impressions; of its {t['cache_rows']:,} cached rows, {t['truncated']['prompt_truncated']:,} lost prompt "
            f"and {t['truncated']['response_truncated']:,} response tokens to max_length {t['max_length']}), "
            f"median of {t['rounds']} alternating measurements of "
            f"{t['epochs']} epoch each, ips loss, MiniLM-L6 with its top {t['trainable_layers']} layers and the head "
            "trained; tokens/s counts real (unpadded) tokens.")


def run_schedule(n: int) -> None:
    print(f"schedule benchmark: {n:,} impressions over 7 days, once as one run and twice day by day", flush=True)
    results = [bench_schedule(n, late=late) for late in (1, 3)]
    record_block("schedule", f"{n:,} simulated impressions spread over 7 days ({results[0]['units']:,} units); "
                 "ingest, fit and score each way, for late windows of 1 and 3 days; the union of the days' units "
                 "checked equal to the single run's each time.", schedule_table(results))


def _tree_commit() -> str:
    """The commit, or "working tree on top of" it when tracked files differ from it (what was measured)."""
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=RESULTS.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        dirty = ""
    return f"working tree on top of {_commit()}" if dirty else _commit()


def run_votes(n: int) -> None:
    print(f"votes benchmark: three raters per observed reply, {n:,} impressions, seeds 0-2, latest vs mean",
          flush=True)
    result = bench_votes(n)
    rows = votes_table(result)
    print("\n".join(rows))
    observed = ", ".join(f"{s['observed']:,}" for s in result["per_seed"])
    begin, end = "<!-- votes:begin -->", "<!-- votes:end -->"
    record("\n".join([begin, f"Measured {dt.date.today().isoformat()}, commit: {_tree_commit()}. Scenario "
                       f"`three_raters` ({result['raters']} raters on every observed reply, each with their own "
                       f"leaning and noise), {n:,} impressions ({observed} observed units), simulation and training "
                       "seeds 0, 1, 2; ingest, fit, score and train (ips, naive baseline) once per aggregate on the "
                       "same logs; R² of the reward model against reward_true over every unit (`obsfeed evaluate`).",
                       "", *rows, end]), begin, end)


def run_losses(n: int) -> None:
    print(f"loss benchmark: default scenario, {n:,} impressions, seeds 0-2 (ingest, fit, score, train)", flush=True)
    result = bench_losses(n)
    record_block("losses", f"default scenario (α 0.5, ρ 0.2/0.1), {n:,} impressions, simulation and training seeds "
                 f"0, 1, 2; metrics on the validation prompts' units "
                 f"({', '.join(f'{u:,}' for u in result['val_units'])}) against reward_true; mean ± sd over the seeds.",
                 losses_table(result))


def run_estimators(n: int) -> None:
    print(f"estimator benchmark: simulator scenarios at {n:,} impressions (ingest, fit, score, evaluate)", flush=True)
    results = bench_estimators(n)
    rows = ["Mean clean reward E[r*] (reward_true over all units; fit.noise = \"auto\", the simulator's 2% random "
            "audit): bias of each estimate and its share of the naive bias.", "", *clean_table(results), "",
            "Selection and confounding diagnostics (biases here against the mean *label*, the secondary figure).", "",
            *estimators_table(results), "",
            "Weight stabilisers and DR variants (weights.stabilize = \"monotone\", Switch-DR at score.switch_tau, "
            "shrinkage at score.shrink_lambda): bias of the mean label against the mean label, and its share of the "
            "naive bias against E[r*] after the semicolon.", "", *stabilised_table(results)]
    print("\n".join(rows))
    record("\n".join([EST_BEGIN, f"Measured {dt.date.today().isoformat()} at commit `{_commit()}`.", "", *rows,
                       EST_END]), EST_BEGIN, EST_END)
    print(f"recorded in {RESULTS}")


def run_ingest(n: int) -> None:
    print(f"ingest benchmark: {n:,} and {n // 10:,} simulated impressions "
          "(Beam with the default local runner vs polars in one process)", flush=True)
    small = bench_ingest(n // 10)
    large = bench_ingest(n)
    figures = compare(small, large)
    for k, v in figures.items():
        print(f"  {k:<40} {v:,.3f}")
    record(ingest_table(small, large, figures))
    print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
