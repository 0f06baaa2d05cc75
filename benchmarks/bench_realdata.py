"""Real-data benchmarks (issue 8): public datasets through the whole pipeline, scored on held-out truth.

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
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from benchmarks.bench_estimators import CACHE
from benchmarks.bench_trainer import mean_sd
from estimators.diagnostics import expected_calibration_error, ndcg_at_k
from estimators.reward.model import score
from estimators.reward.trainer import fit_reward_model
from pipelines.cli import main as cli
from pipelines.import_coat import LOGGED_PROPENSITY, import_coat
from pipelines.import_hh_rlhf import HHSettings, import_hh_rlhf
from pipelines.train import load_models
from schemas import truth as tr
from schemas import units as un
from schemas.config import load_config
from schemas.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
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
    pred, truth = np.concatenate([s_c, s_r]), np.concatenate([np.ones(s_c.size), np.zeros(s_r.size)])
    return {"pair_accuracy": float(np.mean((s_c > s_r) + 0.5 * (s_c == s_r))),
            "mse": float(np.mean((pred - truth) ** 2)), "ece": expected_calibration_error(pred, truth),
            "mean_prediction": float(pred.mean())}


def _oracle(data: Path, cfg) -> Any:
    """The same model and settings, trained with the naive loss on every training unit's true label."""
    units = (pl.read_parquet(data / "impressions" / "part-00000.parquet")
             .join(pl.read_parquet(data / "truth.parquet"), on=un.IMPRESSION_ID))
    table = units.select(un.PROMPT_ID, un.PROMPT, un.RESPONSE,
                         pl.lit(1, dtype=pl.Int8).alias(un.OBSERVED),
                         pl.col(tr.LABEL_CLEAN).cast(pl.Float64).alias(un.LABEL)).to_arrow()
    model, _ = fit_reward_model(table, loss="naive", cfg=cfg.train, progress=False)
    return model


def hh_seed(seed: int, work: Path) -> dict[str, Any]:
    data = CACHE / f"hh-rlhf-seed{seed}"
    counts = import_hh_rlhf(SHARED_DATA / "hh-rlhf", data, HHSettings(seed=seed))
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
    models = load_models(RunDir(run))
    result = {loss: pair_metrics(models[loss], test) for loss in HH_LOSSES}
    result["oracle"] = pair_metrics(_oracle(data, load_config(cfg_path)), test)
    return result


def quiet_work_dir(name: str) -> Path:
    """A scratch folder under the benchmark cache, with Beam's and the libraries' chatter off and a hash key set
    (the pipeline runs in-process, many times)."""
    logging.disable(logging.WARNING)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("OBSFEED_HASH_KEY", "benchmark-key-not-secret")
    work = CACHE / name
    work.mkdir(parents=True, exist_ok=True)
    return work


def bench_hh(seeds: tuple[int, ...] = (0, 1, 2, 3, 4)) -> dict[str, Any]:
    work = quiet_work_dir("hh-work")
    per_seed = [hh_seed(seed, work) for seed in seeds]
    shutil.rmtree(work, ignore_errors=True)
    summary = mean_sd(per_seed, (*HH_LOSSES, "oracle"), ("pair_accuracy", "raw_mse", "mse", "raw_ece", "ece"))
    return {"seeds": list(seeds), "per_seed": per_seed, "summary": summary,
            "mse_diffs": {name: paired_ci([s["causalrm_dr"][a] - s["naive"][b] for s in per_seed])
                          for name, (a, b) in MSE_DIFFS.items()}}


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
        import_coat(SHARED_DATA / "coat", data)
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
        models = load_models(RunDir(run))
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
