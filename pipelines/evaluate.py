"""`obsfeed evaluate`: metrics of a finished run against ground truth (the simulator's truth.parquet).

What "truth" means for each figure:

* propensity: the simulator's ``propensity_true`` and the realised observed flag;
* mean label: the population mean of the label users *would* give if every unit were rated
  (``label_noisy`` over all units). That is what selection correction (IPS, SNIPS, DR) targets;
* clean reward: the population mean of ``reward_true`` = E[r*], what the clean-reward targets
  (``target_noise_corrected``) and the audit's estimates (PPI, calibrated DR) target: every mean's bias against
  it, as a share of the naive bias;
* reward model: predictions P(label=1|x) vs ``reward_true`` (MSE, MAE, R²), and pairwise accuracy within a
  prompt (share of response pairs with different true rewards that the model orders correctly).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from estimators import weights as W
from estimators.confounding import saved_effects
from estimators.diagnostics import auc, expected_calibration_error, pairwise_accuracy, regression_metrics
from estimators.features import RESPONSE_LENGTH
from estimators.fitted import fitted_clip
from schemas import pointwise
from schemas import run_dir as rd
from schemas import truth as tr
from schemas import units as un
from schemas.config import Config, ScoreConfig, WeightsConfig
from schemas.errors import InputError
from schemas.run_dir import RunDir
from schemas.storage import atomic_write_text, read_dataset


def mean_label_estimates(d: pl.DataFrame) -> dict[str, float]:
    o = d[un.OBSERVED].to_numpy()
    label = np.nan_to_num(d[un.LABEL].to_numpy().astype(float))
    obs = o == 1
    n = len(o)
    est = {
        "true": float(d[tr.LABEL_NOISY].mean()),
        "naive": float(label[obs].mean()),
        "ips": float(np.sum(label * d[pointwise.WEIGHT_IPS].to_numpy()) / n),
        "snips": float(np.average(label[obs], weights=d[pointwise.WEIGHT_SNIPS].to_numpy()[obs])),
        "dr": float(d[pointwise.TARGET_DR].mean()),
        "true_clean_reward": float(d[tr.REWARD_TRUE].mean()),
    }
    est["bias"] = {k: est[k] - est["true"] for k in ("naive", "ips", "snips", "dr")}
    # Standard errors given the fitted nuisances (influence functions): is a bias within noise?
    w = d[pointwise.WEIGHT_SNIPS].to_numpy()[obs]
    dr = d[pointwise.TARGET_DR].to_numpy()
    est["se"] = {"naive": float(label[obs].std(ddof=1) / np.sqrt(obs.sum())),
                 "snips": float(np.sqrt(np.sum(w**2 * (label[obs] - est["snips"]) ** 2)) / w.sum()),
                 "dr": float(dr.std(ddof=1) / np.sqrt(n))}
    return est


def clean_reward_estimates(d: pl.DataFrame, noise: dict[str, Any] | None) -> dict[str, Any]:
    """Each estimate of the mean clean reward E[r*] (the simulator's ``reward_true`` over all units) and its bias
    as a share of the naive bias: what a clean-reward target is for. The selection-only estimates (SNIPS of
    the label, DR) are listed too: they target the mean *label*, so against E[r*] they keep the label's noise
    and verbosity bias."""
    o = d[un.OBSERVED].to_numpy() == 1
    label = np.nan_to_num(d[un.LABEL].to_numpy().astype(float))
    true = float(d[tr.REWARD_TRUE].mean())
    est: dict[str, float] = {
        "naive": float(label[o].mean()),
        "snips": float(np.average(label[o], weights=d[pointwise.WEIGHT_SNIPS].to_numpy()[o])),
        "dr": float(d[pointwise.TARGET_DR].mean()),
        "noise_corrected": float(d[pointwise.TARGET_NOISE_CORRECTED].mean()),
        "deconfounded": float(d[pointwise.TARGET_DECONFOUNDED].mean()),
    }
    for name, v in ((noise or {}).get("mean_reward") or {}).items():
        est[name] = float(v["estimate"])                  # the fit stage's audit estimates: PPI, calibrated DR
    naive_bias = est["naive"] - true
    return {"true": true, "method": (noise or {}).get("method"), "estimates": est,
            "bias": {k: v - true for k, v in est.items()},
            "share_of_naive": {k: abs(v - true) / abs(naive_bias) if naive_bias else float("nan")
                               for k, v in est.items()}}


def stabilised_estimates(d: pl.DataFrame, score: ScoreConfig, weights: WeightsConfig, clip: float) -> dict[str, Any]:
    """The mean label with the stabilised weights (``weight_stabilized``, self-normalised, ``weights.stabilize``)
    beside clipping and SNIPS, and every DR variant (standard, Switch-DR at ``score.switch_tau``, shrinkage at
    ``score.shrink_lambda``) rebuilt from the logging weights o / max(p̂, clip) (``clip``: the floor fit chose) and
    the imputation: bias against the mean label (what selection correction targets) and against E[r*], each also
    as a share of the naive bias, with the stabilised weights' ESS share, max and tail index."""
    o = d[un.OBSERVED].to_numpy() == 1
    label = np.nan_to_num(d[un.LABEL].to_numpy().astype(float))
    p, imputed = d[pointwise.PROPENSITY].to_numpy(), d[pointwise.IMPUTED].to_numpy()
    w_log = W.clipped(o.astype(float), p, clip)
    w_stab, w_snips = d[pointwise.WEIGHT_STABILIZED].to_numpy(), d[pointwise.WEIGHT_SNIPS].to_numpy()
    ips_clipped = label * d[pointwise.WEIGHT_CLIPPED].to_numpy()                # IPS with the clip: Σ w·r / n
    est = {"naive": float(label[o].mean()), "clipped": float(ips_clipped.mean()),
           "snips": float(np.average(label[o], weights=w_snips[o])),
           "stabilized": float(np.average(label[o], weights=w_stab[o]))}

    def ratio_se(w: np.ndarray, mean: float) -> float:        # a self-normalised mean's influence-function se
        return float(np.sqrt(np.sum(w**2 * (label[o] - mean) ** 2)) / w.sum())

    se = {"clipped": float(ips_clipped.std(ddof=1) / np.sqrt(label.size)),
          "snips": ratio_se(w_snips[o], est["snips"]), "stabilized": ratio_se(w_stab[o], est["stabilized"])}
    for variant in ("standard", "switch", "shrink"):
        w = W.dr_weights(w_log, variant=variant, tau=score.switch_tau, lam=score.shrink_lambda)
        dr = W.dr_pseudo_outcome(label, o.astype(float), w, imputed)
        est[f"dr_{variant}"] = float(dr.mean())
        se[f"dr_{variant}"] = float(dr.std(ddof=1) / np.sqrt(dr.size))
    truths = {"label": float(d[tr.LABEL_NOISY].mean()), "reward": float(d[tr.REWARD_TRUE].mean())}
    out: dict[str, Any] = {"stabilize": weights.stabilize, "switch_tau": score.switch_tau,
                           "shrink_lambda": score.shrink_lambda, "estimates": est, "se": se, "true": truths}
    for ref, true in truths.items():
        naive = est["naive"] - true
        out[f"bias_{ref}"] = {k: v - true for k, v in est.items()}
        out[f"share_of_naive_{ref}"] = {k: abs(v - true) / abs(naive) if naive else float("nan")
                                        for k, v in est.items()}
    tail = W.hill_tail_index(w_stab[o])
    out["weights"] = {"ess_share": W.kish_ess(w_stab[o]) / max(1, int(o.sum())), "max": float(w_stab[o].max()),
                      "tail_index": tail if np.isfinite(tail) else None,
                      "switched": int(np.sum(o & (w_log > score.switch_tau)))}
    return out


def execute(run: RunDir, cfg: Config, *, truth: Path | None = None, placebo: bool = False) -> dict[str, Any]:
    """Metrics vs ground truth, plus the placebo check with ``placebo``. With ``placebo`` and no truth named
    (no ``--truth``, no ``[input].truth``) only the placebo check runs: it needs none. A truth that is named
    but missing or incomplete is an InputError either way."""
    truth_path = Path(truth) if truth else (Path(cfg.input.truth) if cfg.input.truth else None)
    if placebo and truth_path is None:
        result = {"placebo": run_placebo(run, cfg)}
        atomic_write_text(run.path(rd.EVALUATION), json.dumps(result, indent=2) + "\n")
        return result
    if truth_path is None or not truth_path.exists():
        raise InputError(f"{truth_path or '[input].truth'}: ground truth not found (pass --truth PATH)")
    truth_t = pl.read_parquet(truth_path)
    missing = [c for c in (tr.REWARD_TRUE, tr.PROPENSITY_TRUE, tr.LABEL_NOISY) if c not in truth_t.columns]
    if missing:
        raise InputError(f"{truth_path}: required column '{missing[0]}' is missing")
    points = pl.from_arrow(read_dataset(run.path(rd.POINTWISE)))
    d = points.join(truth_t, on=un.IMPRESSION_ID, how="inner")
    if d.height != points.height:
        raise InputError(f"{truth_path}: {points.height - d.height} units have no ground truth")
    o = d[un.OBSERVED].to_numpy()
    observed_d = d.filter(pl.col(un.OBSERVED) == 1)
    p_hat, p_true = d[pointwise.PROPENSITY].to_numpy(), d[tr.PROPENSITY_TRUE].to_numpy()
    result: dict[str, Any] = {
        "units": d.height,
        "propensity": {
            "auc": auc(p_hat, o), "auc_true": auc(p_true, o), "ece": expected_calibration_error(p_hat, o),
            "ece_true": expected_calibration_error(p_true, o), "mae_vs_true": float(np.mean(np.abs(p_hat - p_true))),
            "corr_vs_true": float(np.corrcoef(p_hat, p_true)[0, 1]),
        },
        "mean_label": mean_label_estimates(d),
        "flip_rates": {
            "estimated": (noise := _estimated_flip_rates(run)),
            "true": _true_flip_rates(truth_path),
            "clean_vs_given": {"rho01": _rate(d, tr.LABEL_CLEAN, 1, tr.LABEL_NOISY, 0),
                               "rho10": _rate(d, tr.LABEL_CLEAN, 0, tr.LABEL_NOISY, 1)},
            # what an audit of observed units measures: selection changes who is in it
            "clean_vs_given_observed": {"rho01": _rate(observed_d, tr.LABEL_CLEAN, 1, tr.LABEL_NOISY, 0),
                                        "rho10": _rate(observed_d, tr.LABEL_CLEAN, 0, tr.LABEL_NOISY, 1)},
        },
        "mean_reward": _mean_reward(noise, d),
        "clean_reward": clean_reward_estimates(d, noise),
        "stabilised": stabilised_estimates(d, cfg.score, cfg.weights, fitted_clip(run.path(rd.MODELS))),
        "confounders": _confounders(run, d),
        "reward": {},
    }
    reward_dir = run.path(rd.REWARD_MODEL)
    if reward_dir.exists():
        from estimators.reward.model import load_reward_models, numeric_inputs, predict_reward

        r_true = d[tr.REWARD_TRUE].to_numpy()
        prompts, responses = d[un.PROMPT].to_list(), d[un.RESPONSE].to_list()
        group = d[un.PROMPT_ID].to_numpy()
        for loss, model in load_reward_models(reward_dir).items():
            numeric = {c: d[c].to_numpy() for c in numeric_inputs(model)}
            pred = predict_reward(model, prompts, responses, columns=numeric)
            result["reward"][loss] = {**regression_metrics(pred, r_true),
                                      "pairwise_accuracy": pairwise_accuracy(group, pred, r_true),
                                      "mean_prediction": float(pred.mean()), "mean_true": float(r_true.mean())}
        main = cfg.train.loss
        if main in result["reward"]:
            result["reward"] = {**result["reward"][main], "loss": main, "by_loss": result["reward"]}
    if placebo:
        result["placebo"] = run_placebo(run, cfg)
    atomic_write_text(run.path(rd.EVALUATION), json.dumps(result, indent=2) + "\n")
    return result


def _confounders(run: RunDir, d: pl.DataFrame) -> list[dict[str, Any]]:
    """The fitted confounder effects beside the simulated one (response length: the average verbosity effect
    over the observed units, from truth.parquet), and whether the 95% CI covers it."""
    path = run.path(rd.MODELS) / rd.CONFOUNDING
    out = []
    for e in saved_effects(json.loads(path.read_text())) if path.exists() else []:
        row = {k: e[k] for k in ("treatment", "model", "effect", "ci_low", "ci_high")}
        row.update({k: e[k] for k in ("rv_estimate", "rv_ci") if k in e})      # absent in runs fitted before
        if e["treatment"] == RESPONSE_LENGTH and tr.LENGTH_EFFECT_TRUE in d.columns:
            true = float(d.filter(pl.col(un.OBSERVED) == 1)[tr.LENGTH_EFFECT_TRUE].mean())
            if np.isfinite(true):                          # NaN: real labels, the true effect is unknown
                row.update(true=true, covered=e["ci_low"] <= true <= e["ci_high"])
        out.append(row)
    return out


def _estimated_flip_rates(run: RunDir) -> dict[str, Any] | None:
    """The flip rates the fit stage estimated (None for a run fitted before they were)."""
    path = run.path(rd.MODELS) / rd.NOISE
    return json.loads(path.read_text()) if path.exists() else None


def _mean_reward(noise: dict[str, Any] | None, d: pl.DataFrame) -> dict[str, Any] | None:
    """The audit's estimates of the mean true label (PPI and audit-only) beside the simulated one (r* over all
    units), when the run had gold labels."""
    if not noise or not noise.get("mean_reward") or tr.LABEL_CLEAN not in d.columns:
        return None
    true = float(d[tr.LABEL_CLEAN].mean())
    return {"true": true, **{k: {**v, "covered": v["ci_low"] <= true <= v["ci_high"]}
                             for k, v in noise["mean_reward"].items()}}


def _true_flip_rates(truth_path: Path) -> dict[str, float] | None:
    """The simulated flip rates, from the scenario file the simulator writes beside truth.parquet."""
    scenario = truth_path.parent / "scenario.json"
    if not scenario.exists():
        return None
    s = json.loads(scenario.read_text())
    return {"rho01": s["rho01"], "rho10": s["rho10"]}


def _rate(d: pl.DataFrame, given: str, given_value: int, event: str, event_value: int) -> float:
    sub = d.filter(pl.col(given) == given_value)
    return float((sub[event] == event_value).mean()) if sub.height else float("nan")


def print_evaluation(result: dict[str, Any]) -> None:
    if "propensity" not in result:                       # --placebo without ground truth
        _print_placebo(result)
        return
    p, m = result["propensity"], result["mean_label"]
    print(f"evaluation vs ground truth ({result['units']} units)")
    print(f"  propensity: AUC {p['auc']:.3f} (true propensity's AUC {p['auc_true']:.3f}), "
          f"ECE {p['ece']:.4f}, mean |p̂ - p| {p['mae_vs_true']:.3f}")
    print(f"  mean label: true {m['true']:.4f}  " + "  ".join(
        f"{k} {m[k]:.4f} (bias {m['bias'][k]:+.4f})" for k in ("naive", "ips", "snips", "dr")))
    for c in result.get("confounders", []):
        true = f", simulated {c['true']:.4f} ({'inside' if c['covered'] else 'OUTSIDE'} the CI)" if "true" in c else ""
        print(f"  confounder {c['treatment']} ({c['model']}): effect {c['effect']:.4f} "
              f"[{c['ci_low']:.4f}, {c['ci_high']:.4f}]{true}")
    by_loss = result["reward"].get("by_loss", {})
    if by_loss:
        first = next(iter(by_loss.values()))
        print(f"  {'reward model':<14}{'MSE':>9}{'MAE':>9}{'R2':>9}{'pair acc':>10}"
              f"{'mean pred (true ' + format(first['mean_true'], '.3f') + ')':>26}")
        for loss, r in by_loss.items():
            acc = r["pairwise_accuracy"]
            print(f"  {loss:<14}{r['mse']:>9.4f}{r['mae']:>9.4f}{r['r2']:>9.3f}"
                  f"{(f'{acc:.3f}' if acc is not None else 'n/a'):>10}{r['mean_prediction']:>26.3f}")
    fr, cv, est = (result["flip_rates"][k] for k in ("true", "clean_vs_given", "estimated"))
    if fr:
        print(f"  flip rates: simulated rho01 {fr['rho01']:.3f}, rho10 {fr['rho10']:.3f} (clean vs given label, "
              f"with verbosity and rater leaning: {cv['rho01']:.3f}, {cv['rho10']:.3f})"
              + (f"; estimated ({est['method']}) {est['rho01']:.3f}, {est['rho10']:.3f}" if est else ""))
    cr = result.get("clean_reward")
    if cr:
        print(f"  mean clean reward E[r*] {cr['true']:.4f} (noise: {cr['method']}): " + "  ".join(
            f"{k} {v:.4f} ({cr['share_of_naive'][k]:.0%} of naive bias)" for k, v in cr["estimates"].items()))
    mr = result.get("mean_reward")
    if mr:
        print(f"  mean true label {mr['true']:.4f}: " + ", ".join(
            f"{k} {v['estimate']:.4f} [{v['ci_low']:.4f}, {v['ci_high']:.4f}]" for k, v in mr.items() if k != "true"))
    _print_placebo(result)


def _print_placebo(result: dict[str, Any]) -> None:
    if "placebo" in result:
        print_placebo(result["placebo"])


def run_placebo(run: RunDir, cfg: Config) -> dict[str, Any]:
    """`obsfeed evaluate RUN --placebo` (``estimators.placebo``): both placebos on the run's units, with the floor
    and the confounder effects the fit stage saved (a run not fitted yet: the floor the config would give)."""
    from estimators.placebo import placebo_check

    path = run.path(rd.MODELS) / rd.CONFOUNDING
    effects = saved_effects(json.loads(path.read_text())) if path.exists() else []
    clip = fitted_clip(run.path(rd.MODELS)) if run.path(rd.WEIGHTS_FILE).exists() else None
    return placebo_check(read_dataset(run.path(rd.UNITS)), cfg.fit, cfg.weights, clip=clip, fitted_effects=effects)


def print_placebo(p: dict[str, Any]) -> None:
    print(f"placebo check (seed {p['seed']}, randomised within {p['n_strata']} strata of "
          f"{', '.join(p['strata']) or 'no categorical feature'}; should be 0 within noise)")
    for c in p["confounders"]:
        if "error" in c:
            print(f"  shuffled {c['treatment']}: not fitted ({c['error']})")
            continue
        fitted = f" (fitted effect {c['fitted_effect']:.4f})" if "fitted_effect" in c else ""
        print(f"  shuffled {c['treatment']} ({c['model']}): effect {c['effect']:.4f} [{c['ci_low']:.4f}, "
              f"{c['ci_high']:.4f}], 0 {'inside' if c['zero_inside'] else 'OUTSIDE'} the CI{fitted}")
    s = p["selection"]
    if "error" in s:
        print(f"  placebo selection: not fitted ({s['error']})")
    else:
        print(f"  placebo selection ({s['n_selected']} of {p['observed']} observed units, propensity AUC "
              f"{s['propensity_auc']:.3f}): weighted − naive mean label {s['difference']:+.4f} "
              f"[{s['ci_low']:+.4f}, {s['ci_high']:+.4f}], 0 {'inside' if s['zero_inside'] else 'OUTSIDE'} the CI")
