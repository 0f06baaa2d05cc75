"""Real-data benchmarks (issue 8): public datasets through the whole pipeline, scored on held-out truth.

The datasets are read from ``$OBSFEED_DATA/coat`` and ``$OBSFEED_DATA/hh-rlhf`` (``pipelines.sources.public_data``;
docs/data.md says where to get them).

Coat (``obsfeed import coat``): the pipeline (ingest, fit, score) runs once per propensity variant on the
self-selected ratings (the feature-interaction propensity that obsfeed fits, and the published propensities
through ``fit.propensity_column``); the train stage then runs for 5 training seeds (initialisation, batch order,
which ratings validate). Each model scores the uniformly random ratings (test.parquet), which no stage reads:
MSE and MAE on 1–5 (prediction 1 + 4·p), AUC and NDCG@5 with rating ≥ 4 as relevant (users with no such
rating left out of NDCG).

HH-RLHF semi-synthetic (``obsfeed import hh-rlhf``): per seed, the import draws selection, flips, the audit and the
train/test split of pairs; the pipeline (ingest, fit, score, train with every loss) runs on the logged part; each
reward model then scores the held-out pairs' responses. An oracle, the same model trained with the naive loss on
every training unit's true label r*, is the ceiling. Metrics on the test pairs: pairwise accuracy (chosen scored
above rejected), and pointwise MSE (Brier) and ECE of P(r* = 1) against r* over both responses of each pair,
for each model as trained and as calibrated on the audit (configs/hh_rlhf.toml: ``train.calibrate = "gold"``).

HH-RLHF with a transformer (``TRANSFORMER_SEEDS``, when the ``obsfeed[minilm]`` package is installed): on the same
runs (logs, fit and score stages, test pairs), the train stage again with naive and causalrm_dr fine-tuning
MiniLM-L6 (``TRANSFORMER_TRAIN``) on a seeded random ``TRANSFORMER_SHARE`` of the training prompts (a copy of the
run whose pointwise dataset keeps only those prompts' units), and the oracle on the same units' true labels. The
sizes are chosen for time alone (the block within 25 minutes on 2 CPU cores), never on the test pairs.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.bench_estimators import CACHE
from benchmarks.bench_trainer import mean_sd, minilm_folder
from estimators.diagnostics import expected_calibration_error, ndcg_at_k
from estimators.reward.model import (
    load_reward_model,
    load_reward_models,
    model_record,
    predict_logits,
    reward_model_dirs,
    score,
)
from estimators.reward.trainer import fit_reward_model
from pipelines.orchestration.cli import main as cli
from pipelines.sources import public_data
from pipelines.sources.coat import LOGGED_PROPENSITY, import_coat
from pipelines.sources.hh_rlhf import HHSettings, import_hh_rlhf
from schemas import run_dir as rd
from schemas import truth as tr
from schemas import units as un
from schemas.config import TrainConfig, load_config
from schemas.run_dir import RunDir
from schemas.storage import parquet_files

ROOT = Path(__file__).resolve().parents[1]
HH_LOSSES = ("naive", "ips", "dr", "causalrm_dr", "bt")
T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
"""Student t quantiles (0.975) by number of seeds, for the CI of a seed-paired difference."""


def pair_metrics(model, test) -> dict[str, float]:
    """Pairwise accuracy (ties count ½) and pointwise MSE / ECE vs r* on held-out pairs; for a model calibrated
    on the audit (``train.calibrate = "gold"``), also ``raw_mse`` / ``raw_ece`` with its output map undone."""
    out = _pair_metrics(model, test)
    raw = copy.deepcopy(model)
    raw.scale.fill_(1.0)
    raw.shift.fill_(0.0)
    unmapped = _pair_metrics(raw, test)
    return {**out, "raw_mse": unmapped["mse"], "raw_ece": unmapped["ece"]}


def _pair_metrics(model, test) -> dict[str, float]:
    prompts = test.column("prompt").to_pylist()
    s_c = score(model, prompts, test.column("chosen").to_pylist())
    s_r = score(model, prompts, test.column("rejected").to_pylist())
    return _metrics_of(s_c, s_r)


def _metrics_of(s_c: np.ndarray, s_r: np.ndarray) -> dict[str, float]:
    """The pair metrics of P(r* = 1) predicted for the chosen (r* = 1) and rejected (r* = 0) responses."""
    pred, truth = np.concatenate([s_c, s_r]), np.concatenate([np.ones(s_c.size), np.zeros(s_r.size)])
    return {"pair_accuracy": float(np.mean((s_c > s_r) + 0.5 * (s_c == s_r))),
            "mse": float(np.mean((pred - truth) ** 2)), "ece": expected_calibration_error(pred, truth),
            "mean_prediction": float(pred.mean())}


def _oracle(data: Path, cfg) -> Any:
    """The same model and settings, trained with the naive loss on every training unit's true label."""
    return _fit_oracle(data, cfg)[0]


def _fit_oracle(data: Path, cfg, prompts: set[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """The oracle and its training metrics, on the units of ``prompts`` only when given."""
    units = (pl.read_parquet(data / "impressions" / "part-00000.parquet")
             .join(pl.read_parquet(data / "truth.parquet"), on=un.IMPRESSION_ID))
    if prompts is not None:
        units = units.filter(pl.col(un.PROMPT_ID).is_in(sorted(prompts)))
    table = units.select(un.PROMPT_ID, un.PROMPT, un.RESPONSE,
                         pl.lit(1, dtype=pl.Int8).alias(un.OBSERVED),
                         pl.col(tr.LABEL_CLEAN).cast(pl.Float64).alias(un.LABEL)).to_arrow()
    return fit_reward_model(table, loss="naive", cfg=cfg.train, progress=False)


def hh_seed(seed: int, work: Path, transformer: Path | None = None) -> dict[str, Any]:
    """The hashed block's metrics for ``seed``; with ``transformer`` (a backbone folder) also the transformer
    block's on the same run, under ``"transformer"``."""
    data = CACHE / f"hh-rlhf-seed{seed}"
    counts = import_hh_rlhf(public_data("hh-rlhf"), data, HHSettings(seed=seed))
    cfg_path = work / "hh.toml"
    text = (ROOT / "configs" / "hh_rlhf.toml").read_text().replace("../data/hh-rlhf", str(data))
    cfg_path.write_text(text.replace("seed = 0", f"seed = {seed}"))
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    print(f"  seed {seed}: {counts['observed']:,} rated of {counts['units']:,} units, "
          f"{counts['test_pairs']:,} test pairs", flush=True)
    if cli(["run", str(cfg_path), str(run), "--stages", "ingest,fit,score,train"]) != 0:
        raise RuntimeError(f"hh-rlhf seed {seed}: the pipeline failed")
    test = pq.read_table(data / "test_pairs.parquet")
    models = load_reward_models(RunDir(run).path(rd.REWARD_MODEL))
    result = {loss: pair_metrics(models[loss], test) for loss in HH_LOSSES}
    result["oracle"] = pair_metrics(_oracle(data, load_config(cfg_path)), test)
    if transformer is not None:
        result["transformer"] = transformer_seed(seed, RunDir(run), data, test, transformer, work)
    return result


TRANSFORMER_SEEDS = (0, 1, 2)
"""The hashed block's first three seeds (fixed in advance, not picked)."""
TRANSFORMER_LOSSES = ("naive", "causalrm_dr")
TRANSFORMER_TRAIN = {"max_length": 128, "trainable_layers": 2, "epochs": 1, "batch_size": 16}
"""Sized for time on 2 CPU cores (one seed measured first), not on the test pairs: pairs cut to 128 tokens
(prompts lose their start), the top 2 of MiniLM-L6's 6 layers and the head trained, one epoch; learning rate,
schedule, warmup and clipping are the trainer's transformer defaults (5e-5, linear, 10%, 1.0)."""
TRANSFORMER_SHARE = 0.25
"""Share of each seed's training prompts (all their units, rated or not) the transformer block trains on."""


def subsample_run(run: RunDir, target: Path, share: float, seed: int) -> set[str]:
    """A copy of ``run`` (its hashed reward models left out) whose pointwise dataset keeps only the units of a
    seeded random ``share`` of its prompts; returns those prompts. The fit stage's outputs stay as fitted on the
    whole logs: only the train stage sees fewer units."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run.root, target, ignore=shutil.ignore_patterns(rd.REWARD_MODEL, rd.LOCK, rd.SUCCESS))
    files = parquet_files(target / rd.POINTWISE)
    prompts = sorted(set().union(*(pq.read_table(f, columns=[un.PROMPT_ID]).column(0).to_pylist() for f in files)))
    rng = np.random.default_rng([seed, 18])
    keep = sorted(prompts[i] for i in rng.choice(len(prompts), size=round(share * len(prompts)), replace=False))
    for f in files:
        table = pq.read_table(f)
        ids = table.column(un.PROMPT_ID).cast(pa.string())
        pq.write_table(table.filter(pc.is_in(ids, pa.array(keep, type=pa.string()))), f)
    return set(keep)


def transformer_config(run: RunDir, folder: Path, seed: int) -> None:
    """Rewrite ``run``'s frozen config so that its train stage fine-tunes ``folder`` with ``TRANSFORMER_TRAIN``
    for ``TRANSFORMER_LOSSES`` (still calibrated on the audit, ``train.calibrate = "gold"``)."""
    cfg = load_config(run.config_path)
    train = TrainConfig.model_validate({**cfg.train.model_dump(), **TRANSFORMER_TRAIN, "backbone": str(folder),
                                        "loss": TRANSFORMER_LOSSES[1], "baselines": list(TRANSFORMER_LOSSES[:1]),
                                        "seed": seed})
    run.config_path.write_text(cfg.model_copy(update={"train": train}).to_toml())


def transformer_seed(seed: int, run: RunDir, data: Path, test, folder: Path, work: Path) -> dict[str, Any]:
    """Naive and causalrm_dr through the train stage on a subsample of ``run``, and the oracle, all fine-tuned
    from ``folder``; their metrics on the test pairs, the training throughput and the block's wall time."""
    started = time.perf_counter()
    sub = RunDir(work / "run-transformer")
    prompts = subsample_run(run, sub.root, TRANSFORMER_SHARE, seed)
    transformer_config(sub, folder, seed)
    if cli(["train", str(sub.root)]) != 0:
        raise RuntimeError(f"hh-rlhf seed {seed}: the transformer train stage failed")
    result: dict[str, Any] = {}
    for directory in reward_model_dirs(sub.path(rd.REWARD_MODEL)):
        record, metrics = model_record(directory), json.loads((directory / rd.REWARD_METRICS).read_text())
        model = load_reward_model(directory)
        result[record["loss"]] = {**saved_pair_metrics(model, record["calibration"], test),
                                  **_throughput(metrics)}
    oracle, metrics = _fit_oracle(data, load_config(sub.config_path), prompts)
    result["oracle"] = {**saved_pair_metrics(oracle, {"scale": 1.0, "shift": 0.0}, test), **_throughput(metrics)}
    shutil.rmtree(sub.root, ignore_errors=True)
    result["prompts"], result["wall_s"] = len(prompts), time.perf_counter() - started
    print(f"  seed {seed}, MiniLM-L6 on {len(prompts):,} prompts: " + ", ".join(
        f"{k} {result[k]['pair_accuracy']:.3f}" for k in (*TRANSFORMER_LOSSES, "oracle")) + " pair accuracy",
        flush=True)
    return result


def _throughput(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"n_train": metrics["n_train"], "samples_per_s": metrics["samples_per_s"],
            "tokens_per_s": metrics["tokens_per_s"], "truncated": metrics["truncated"],
            "epochs_run": metrics["epochs_run"]}


def saved_pair_metrics(model, calibration: dict[str, float], test) -> dict[str, float]:
    """``pair_metrics`` for a model whose audit calibration s' = a·s + b is already in its output (a saved
    transformer folds it into its head): ``raw_*`` with it undone, from one scoring pass."""
    prompts = test.column("prompt").to_pylist()
    s_c = predict_logits(model, prompts, test.column("chosen").to_pylist())
    s_r = predict_logits(model, prompts, test.column("rejected").to_pylist())
    a, b = calibration["scale"], calibration["shift"]

    def p(s: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-s))

    out = _metrics_of(p(s_c), p(s_r))
    raw = _metrics_of(p((s_c - b) / a), p((s_r - b) / a))
    return {**out, "raw_mse": raw["mse"], "raw_ece": raw["ece"], "calibration_scale": a, "calibration_shift": b}


def quiet_work_dir(name: str) -> Path:
    """A scratch folder under the benchmark cache, with Beam's and the libraries' chatter off and a hash key set
    (the pipeline runs in-process, many times)."""
    logging.disable(logging.WARNING)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("OBSFEED_HASH_KEY", "benchmark-key-not-secret")
    work = CACHE / name
    work.mkdir(parents=True, exist_ok=True)
    return work


def bench_hh(seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
             transformer_seeds: tuple[int, ...] = TRANSFORMER_SEEDS) -> dict[str, Any]:
    """The hashed block over ``seeds``; the transformer block on the runs of ``transformer_seeds`` (a subset of
    ``seeds``), under ``"transformer"`` (None when MiniLM is not installed or no seed is asked for)."""
    work = quiet_work_dir("hh-work")
    folder = minilm_folder() if transformer_seeds else None
    if transformer_seeds and folder is None:
        print("  transformer block skipped: MiniLM-L6 is not installed (pip install -c constraints.txt -e "
              "'.[minilm]'); the hashed block runs alone", flush=True)
    per_seed = [hh_seed(seed, work, folder if seed in transformer_seeds else None) for seed in seeds]
    shutil.rmtree(work, ignore_errors=True)
    summary = mean_sd(per_seed, (*HH_LOSSES, "oracle"), ("pair_accuracy", "raw_mse", "mse", "raw_ece", "ece"))
    transformer = [s.pop("transformer") for s in per_seed if "transformer" in s]
    return {"seeds": list(seeds), "per_seed": per_seed, "summary": summary,
            "mse_diffs": {name: paired_ci([s["causalrm_dr"][a] - s["naive"][b] for s in per_seed])
                          for name, (a, b) in MSE_DIFFS.items()},
            "transformer": {"seeds": [s for s in seeds if s in transformer_seeds], "per_seed": transformer,
                            "wall_s": sum(t["wall_s"] for t in transformer), "share": TRANSFORMER_SHARE,
                            **TRANSFORMER_TRAIN} if transformer else None}


MSE_DIFFS = {"causalrm_dr − naive, both as trained": ("raw_mse", "raw_mse"),
             "causalrm_dr calibrated on the audit − naive as trained": ("mse", "raw_mse"),
             "causalrm_dr − naive, both calibrated on the audit": ("mse", "mse")}
"""Seed-paired MSE differences reported (the first key of each pair is causalrm_dr's metric, the second naive's)."""


def paired_ci(diffs: list[float]) -> dict[str, float]:
    """Mean and Student-t 95% CI of seed-paired differences."""
    d = np.asarray(diffs, dtype=float)
    half = T_975[d.size] * d.std(ddof=1) / np.sqrt(d.size)
    return {"mean": float(d.mean()), "ci_low": float(d.mean() - half), "ci_high": float(d.mean() + half)}


def hh_table(result: dict[str, Any]) -> list[str]:
    lines = ["| model | pairwise accuracy | MSE vs r*, as trained | MSE, calibrated on the audit | ECE, as trained "
             "| ECE, calibrated |", "|---|---|---|---|---|---|"]
    for name, m in result["summary"].items():
        label = "oracle (all true labels)" if name == "oracle" else name
        lines.append(f"| {label} | " + " | ".join(
            f"{m[k][0]:.{3 if k == 'pair_accuracy' else 4}f} ± {m[k][1]:.{3 if k == 'pair_accuracy' else 4}f}"
            for k in ("pair_accuracy", "raw_mse", "mse", "raw_ece", "ece")) + " |")
    lines += ["", "Seed-paired MSE differences (95% CI):", ""]
    lines += [f"- {name}: {d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
              for name, d in result["mse_diffs"].items()]
    return lines


BACKBONE_MODELS = ("naive", "causalrm_dr", "oracle")
BACKBONE_METRICS = {"pair accuracy": ("pair_accuracy", 3), "MSE vs r*, as trained": ("raw_mse", 4),
                    "MSE vs r*, calibrated on the audit": ("mse", 4)}
"""The backbone comparison's columns: label → (metric key, decimals); each with its seed-paired CI vs naive."""


def backbone_rows(name: str, per_seed: list[dict[str, Any]], seeds: list[int], trained_on: str) -> list[str]:
    """One backbone's rows of ``backbone_table``: mean ± sd over the seeds, and model − naive per seed with its
    Student-t 95% CI."""
    rows = []
    for model in BACKBONE_MODELS:
        label = "oracle (all true labels)" if model == "oracle" else model
        cells = []
        for key, digits in BACKBONE_METRICS.values():
            values = [s[model][key] for s in per_seed]
            cell = f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"
            if model != "naive":
                d = paired_ci([s[model][key] - s["naive"][key] for s in per_seed])
                cell += f" ({d['mean']:+.{digits}f} [{d['ci_low']:+.{digits}f}, {d['ci_high']:+.{digits}f}])"
            cells.append(cell)
        rows.append(f"| {name} | {trained_on} | {', '.join(map(str, seeds))} | {label} | " + " | ".join(cells) + " |")
    return rows


def backbone_table(result: dict[str, Any]) -> list[str]:
    """The hashed and the transformer backbone side by side on HH-RLHF; each metric's seed-paired difference
    from naive (the same backbone's, same seeds) with its 95% CI in brackets. The oracle is not calibrated."""
    t = result["transformer"]
    head = " | ".join(f"{label} (− naive [95% CI])" for label in BACKBONE_METRICS)
    lines = [f"| backbone | trained on | seeds | model | {head} |", "|---|---|---|---|---|---|---|"]
    lines += backbone_rows("hashed n-grams (configs/hh_rlhf.toml)", result["per_seed"], result["seeds"],
                           "every training unit")
    lines += backbone_rows(f"MiniLM-L6, top {t['trainable_layers']} layers, max_length {t['max_length']}, "
                           f"{t['epochs']} epoch", t["per_seed"], t["seeds"],
                           f"{t['share']:.0%} of the training prompts")
    tp = [t["per_seed"][i][m] for i in range(len(t["per_seed"])) for m in BACKBONE_MODELS]
    lines += ["", f"MiniLM-L6 training: {np.mean([x['samples_per_s'] for x in tp]):.1f} samples/s, "
              f"{np.mean([x['tokens_per_s'] for x in tp]):,.0f} tokens/s (mean over its {len(tp)} fits); "
              f"training units per seed (naive, causalrm_dr, oracle): " + "; ".join(
                  ", ".join(f"{s[m]['n_train']:,}" for m in BACKBONE_MODELS) for s in t["per_seed"])
              + f"; block wall time {t['wall_s'] / 60:.1f} min."]
    return lines


COAT_LOSSES = ("naive", "ips", "snips", "dr", "causalrm_ips", "causalrm_dr")
COAT_VARIANTS = {"feature-interaction propensity (fitted)": "",
                 "published propensity (logged)": f'propensity_column = "{LOGGED_PROPENSITY}"'}


def coat_metrics(model, test) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    pred = 1 + 4 * score(model, test.column("prompt").to_pylist(), test.column("response").to_pylist())
    rating = test.column("rating").to_numpy().astype(float)
    relevant = rating >= 4
    return {"mse": float(np.mean((pred - rating) ** 2)), "mae": float(np.mean(np.abs(pred - rating))),
            "auc": float(roc_auc_score(relevant, pred)),
            "ndcg5": ndcg_at_k(test.column("user").to_numpy(), pred, relevant.astype(int), k=5)}


def coat_variant(fit_extra: str, work: Path, seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    data = CACHE / "coat"
    if not (data / "test.parquet").exists():
        import_coat(public_data("coat"), data)
    text = (ROOT / "configs" / "coat.toml").read_text().replace("../data/coat", str(data))
    text = text.replace("[fit]\n", f"[fit]\n{fit_extra}\n", 1)
    cfg_path = work / "coat.toml"
    cfg_path.write_text(text)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    if cli(["run", str(cfg_path), str(run), "--stages", "ingest,fit,score"]) != 0:
        raise RuntimeError("coat: the pipeline failed")
    test = pq.read_table(data / "test.parquet")
    frozen = RunDir(run).config_path.read_text()
    per_seed = []
    for seed in seeds:
        train_part = frozen[frozen.index("[train]"):]
        RunDir(run).config_path.write_text(frozen.replace(train_part, train_part.replace("seed = 0", f"seed = {seed}")))
        if cli(["train", str(run)]) != 0:
            raise RuntimeError(f"coat seed {seed}: the train stage failed")
        models = load_reward_models(RunDir(run).path(rd.REWARD_MODEL))
        per_seed.append({loss: coat_metrics(models[loss], test) for loss in COAT_LOSSES})
        print(f"  seed {seed}: " + ", ".join(f"{k} {v['mse']:.3f}" for k, v in per_seed[-1].items()), flush=True)
    return per_seed


def bench_coat(seeds: tuple[int, ...] = (0, 1, 2, 3, 4)) -> dict[str, Any]:
    work = quiet_work_dir("coat-work")
    out = {}
    for name, fit_extra in COAT_VARIANTS.items():
        print(f"  coat, {name}", flush=True)
        per_seed = coat_variant(fit_extra, work, seeds)
        out[name] = mean_sd(per_seed, COAT_LOSSES, ("mse", "mae", "auc", "ndcg5"))
    shutil.rmtree(work, ignore_errors=True)
    return {"seeds": list(seeds), "summary": out}


def coat_table(result: dict[str, Any]) -> list[str]:
    lines = ["| propensity | loss | MSE (1–5) | MAE | AUC | NDCG@5 |", "|---|---|---|---|---|---|"]
    for variant, by_loss in result["summary"].items():
        for loss, m in by_loss.items():
            lines.append(f"| {variant} | {loss} | {m['mse'][0]:.3f} ± {m['mse'][1]:.3f} "
                         f"| {m['mae'][0]:.3f} ± {m['mae'][1]:.3f} | {m['auc'][0]:.3f} ± {m['auc'][1]:.3f} "
                         f"| {m['ndcg5'][0]:.3f} ± {m['ndcg5'][1]:.3f} |")
    return lines
