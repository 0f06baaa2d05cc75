"""Sensitivity to hidden confounding (robustness values, E-values) and the placebo check."""

import doctest
import json
import math
from pathlib import Path

import numpy as np
import pytest
from econml.dml import LinearDML
from sklearn.linear_model import Ridge

import estimators.sensitivity
from estimators.confounding import ConfounderEffect, saved_effects
from estimators.sensitivity import (
    e_value,
    e_value_ci,
    permute_within_strata,
    stratified_flag,
    weighted_minus_naive,
    weighted_vs_naive_ratio,
)
from pipelines.orchestration.cli import main
from pipelines.report import render
from schemas import run_dir as rd
from tests.conftest import config_text, module_hash_key


def _planted(r: float, n: int, seed: int = 0, theta: float = 0.0):
    """Y = θ·T + 0.5·W1 + β·U + e, T = W0 + γ·U + v, U, e, v ~ N(0, 1), with U unobserved. By hand:
    Var(T | W) = γ² + 1, Var(T | W, U) = 1, so U's partial R² with T is c_t = γ²/(γ² + 1); U's part of the
    outcome left after the short regression on (T, W) is β·(U − E[U | T, W]) with variance β²/(γ² + 1) against
    a residual variance of β²/(γ² + 1) + 1, so c_y = β²/(β² + γ² + 1). γ² = r/(1 − r) and β² = r/(1 − r)² make
    both r. The short regression's θ is off by the omitted-variable bias β·γ/(γ² + 1) = r/√(1 − r), and with one
    linear confounder the long-story-short bound |ρ|·√(c_y·c_t/(1 − c_t))·S is attained (ρ = 1; S = 1 here)."""
    gamma, beta = math.sqrt(r / (1 - r)), math.sqrt(r) / (1 - r)
    rng = np.random.default_rng(seed)
    W, U = rng.normal(size=(n, 4)), rng.normal(size=n)
    T = W[:, 0] + gamma * U + rng.normal(size=n)
    Y = theta * T + 0.5 * W[:, 1] + beta * U + rng.normal(size=n)
    return Y, T, W, beta * gamma / (gamma**2 + 1)


def test_robustness_value_is_the_closed_form_from_the_residuals():
    """EconML's RV (binary search) against the closed form from the DML residuals Ỹ, T̃: θ = E[Ỹ·T̃]/E[T̃²],
    σ² = E[(Ỹ − θ·T̃)²], ν² = 1/E[T̃²]; with c_y = c_t = r the bias bound is r/√(1 − r)·σν, which equals |θ| at
    r = (−k + √(k² + 4k))/2, k = θ²/(σ²ν²). The wrapper reports the same number (same nuisances and folds)."""
    Y, T, W, _ = _planted(0.1, n=4000, seed=1, theta=0.05)
    est = LinearDML(model_y=Ridge(alpha=1.0), model_t=Ridge(alpha=1.0), cv=3, random_state=0).fit(
        Y, T, X=None, W=W, cache_values=True)
    y_res, t_res = (np.ravel(a) for a in est.residuals_[:2])
    theta = np.mean(y_res * t_res) / np.mean(t_res**2)
    sigma2, nu2 = np.mean((y_res - theta * t_res) ** 2), 1 / np.mean(t_res**2)
    k = theta**2 / (sigma2 * nu2)
    by_hand = (-k + math.sqrt(k * k + 4 * k)) / 2
    ours = ConfounderEffect(random_state=0).fit(Y, T, W).to_dict()
    assert ours["effect"] == pytest.approx(theta, rel=1e-9) and ours["sensitivity"]["theta"] == pytest.approx(theta)
    # EconML bisects until the bound is within 1e-6 of 0, then returns the next midpoint: good to ~1e-5
    assert ours["rv_estimate"] == pytest.approx(by_hand, abs=1e-4)
    # RV(CI): the strength at which the 95% CI widened by the bound reaches 0; smaller than RV(estimate)
    assert 0 < ours["rv_ci"] < ours["rv_estimate"]
    lo, _ = est.sensitivity_interval(alpha=0.05, c_y=ours["rv_ci"], c_t=ours["rv_ci"], rho=1.0, interval_type="ci")
    assert abs(lo) < 1e-4


def test_robustness_value_recovers_a_planted_confounders_strength():
    """No effect of T at all; an unobserved U with partial R² r = 0.1 with both T and Y makes the DML estimate
    the hand-computed OVB r/√(1 − r), and the robustness value (the strength that explains it away) is r."""
    r = 0.1
    Y, T, W, bias = _planted(r, n=10_000, seed=0)
    e = ConfounderEffect(benchmark=r, random_state=0).fit(Y, T, W).to_dict()
    se = (e["ci_high"] - e["ci_low"]) / (2 * 1.96)
    assert bias == pytest.approx(r / math.sqrt(1 - r))
    assert abs(e["effect"] - bias) < 4 * se                     # confounded by exactly the OVB
    assert e["ci_low"] > 0                                       # ... and significant: the CI alone is fooled
    assert abs(e["rv_estimate"] - r) < 4 * se                    # d RV / d θ < 1 here, so 4 se of θ bound it
    bench = e["sensitivity"]["benchmark"]
    assert (bench["c_y"], bench["c_t"]) == (r, r)
    assert abs(bench["theta_low"]) < 4 * se                      # the bound at the true strength reaches θ = 0
    assert bench["ci_low"] < 0 < bench["ci_high"]
    assert e["rv_ci"] < e["rv_estimate"]


def test_sensitivity_is_refused_with_weights_and_given_for_the_causal_forest():
    Y, T, W, _ = _planted(0.1, n=2000, seed=2, theta=0.3)
    weighted = ConfounderEffect(random_state=0).fit(Y, T, W, sample_weight=np.linspace(0.5, 2, Y.size)).to_dict()
    assert weighted["rv_estimate"] is None and weighted["rv_ci"] is None
    assert not weighted["sensitivity"]["supported"] and "sample weights" in weighted["sensitivity"]["reason"]
    forest = ConfounderEffect(model="causal_forest_dml", n_estimators=48, random_state=0).fit(Y, T, W).to_dict()
    sens = forest["sensitivity"]
    assert sens["supported"] and 0 < forest["rv_ci"] < forest["rv_estimate"] < 1
    assert sens["benchmark"]["theta_low"] < sens["theta"] < sens["benchmark"]["theta_high"]
    with pytest.raises(ValueError, match="benchmark"):
        ConfounderEffect(benchmark=1.0).fit(Y, T, W)


def test_e_value_hand_cases():
    assert e_value(2.0) == pytest.approx(2 + math.sqrt(2)) == pytest.approx(3.41421356)
    assert e_value(0.5) == pytest.approx(e_value(2.0))           # below 1: the E-value of 1/RR
    assert e_value(1.0) == 1.0
    assert e_value(3.9) == pytest.approx(3.9 + math.sqrt(3.9 * 2.9))
    assert e_value_ci(1.5, 2.5) == pytest.approx(e_value(1.5))   # the limit closer to 1
    assert e_value_ci(0.3, 0.8) == pytest.approx(e_value(0.8))
    assert e_value_ci(0.9, 1.3) == 1.0 and e_value_ci(1.0, 1.3) == 1.0    # the CI includes 1
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            e_value(bad)
    with pytest.raises(ValueError):
        e_value_ci(1.5, 1.2)
    assert doctest.testmod(estimators.sensitivity).failed == 0


def test_weighted_vs_naive_ratio_hand_case_and_refusals():
    # weighted (3·1 + 1·1)/6 = 2/3, naive 1/2: RR = 4/3 and E = 4/3 + √(4/3 · 1/3) = 2
    out = weighted_vs_naive_ratio(np.array([1.0, 0, 1, 0]), np.array([3.0, 1, 1, 1]))
    assert (out["weighted"], out["naive"], out["rr"]) == pytest.approx((2 / 3, 0.5, 4 / 3))
    assert out["e_value"] == pytest.approx(2.0)
    assert out["ci_low"] < out["rr"] < out["ci_high"] and out["e_value_ci"] == 1.0      # 4 units: CI wide
    with pytest.raises(ValueError, match="positive mean labels"):
        weighted_vs_naive_ratio(np.zeros(5), np.ones(5))
    with pytest.raises(ValueError, match="one length"):
        weighted_vs_naive_ratio(np.ones(5), np.ones(4))


def test_delta_method_ci_of_the_ratio_and_the_difference_cover_at_the_nominal_rate():
    """500 samples of 400 units from one population with known weights: each CI covers the population's
    RR (and weighted − naive difference) about 95% of the time (binomial sd of the rate 1%)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=200_000)
    p_y, w_x = 1 / (1 + np.exp(-(0.3 + x))), np.exp(0.5 * x)
    true_rr = (np.sum(w_x * p_y) / w_x.sum()) / p_y.mean()
    true_d = np.sum(w_x * p_y) / w_x.sum() - p_y.mean()
    cover_rr = cover_d = 0
    for _ in range(500):
        i = rng.integers(0, x.size, 400)
        y = (rng.random(400) < p_y[i]).astype(float)
        r, d = weighted_vs_naive_ratio(y, w_x[i]), weighted_minus_naive(y, w_x[i])
        cover_rr += r["ci_low"] <= true_rr <= r["ci_high"]
        cover_d += d["ci_low"] <= true_d <= d["ci_high"]
    assert 0.92 <= cover_rr / 500 <= 0.98 and 0.92 <= cover_d / 500 <= 0.98, (cover_rr, cover_d)


def test_placebo_helpers_keep_each_stratum():
    rng = np.random.default_rng(0)
    strata = np.repeat([0, 1, 2], [10, 20, 30])
    values = np.arange(60)
    out = permute_within_strata(values, strata, rng)
    assert not np.array_equal(out, values)
    for s in range(3):
        assert sorted(out[strata == s]) == sorted(values[strata == s])
    flag = stratified_flag(strata, 0.3, rng)
    assert [int(flag[strata == s].sum()) for s in range(3)] == [3, 6, 9]
    with pytest.raises(ValueError, match="share"):
        stratified_flag(strata, 1.0, rng)


@pytest.fixture(scope="module")
def fitted_run(sim_small: Path, tmp_path_factory):
    """ingest + fit of the small simulation, with no ground truth named in the run's config."""
    root = tmp_path_factory.mktemp("placebo")
    text = "\n".join(line for line in config_text(sim_small, fit={"confounder_controls": 5}).splitlines()
                     if not line.startswith("truth ="))
    (root / "cfg.toml").write_text(text + "\n")
    with module_hash_key():
        assert main(["run", str(root / "cfg.toml"), str(root / "run"), "--stages", "ingest,fit"]) == 0
    return root / "run"


def test_fit_writes_robustness_values_and_the_selection_e_value(fitted_run: Path):
    doc = json.loads((fitted_run / rd.MODELS / "confounding.json").read_text())
    (length,) = saved_effects(doc)
    assert length["treatment"] == "response_length" and length["sensitivity"]["supported"]
    assert 0 <= length["rv_ci"] <= length["rv_estimate"] < 1
    ev = doc["selection_evalue"]
    assert ev["supported"] and ev["rr"] == pytest.approx(ev["weighted"] / ev["naive"])
    assert ev["e_value"] == pytest.approx(e_value(ev["rr"])) and 1 <= ev["e_value_ci"] <= ev["e_value"]
    manifest = json.loads((fitted_run / rd.MANIFEST).read_text())
    assert manifest["stages"]["fit"]["diagnostics"]["selection_evalue"] == ev
    assert saved_effects([length]) == [length]                    # runs fitted before: a bare list


def test_report_shows_robustness_values_and_the_e_value(fitted_run: Path):
    manifest = json.loads((fitted_run / rd.MANIFEST).read_text())
    page = render(manifest, {}, {})
    assert "RV(estimate→0)" in page and "RV(CI→0)" in page and "E-value of the selection correction" in page
    assert "Sensitivity bounds at a benchmark confounder" in page
    ev = manifest["stages"]["fit"]["diagnostics"]["selection_evalue"]
    assert f"<td>{ev['e_value']:.4g}</td>" in page
    diag = manifest["stages"]["fit"]["diagnostics"]
    new_keys = ("rv_estimate", "rv_ci", "sensitivity")
    old = [{k: v for k, v in e.items() if k not in new_keys} for e in diag["confounders"]]
    diag.update(confounders=old, selection_evalue=None)           # a manifest from before: no RVs, no E-value
    page = render(manifest, {}, {})
    assert "RV(CI→0)" in page and "<td>—</td><td>—</td>" in page and "E-value" not in page


def test_placebo_effects_collapse_to_zero_without_ground_truth(fitted_run: Path, capsys):
    """A shuffled treatment has no effect and a selection that depends on nothing leaves weighting nothing to
    correct: both within noise of 0 (|estimate| < 4 se: a fixed seed, judged by the estimate's own noise)."""
    assert main(["evaluate", str(fitted_run)]) == 2                 # the truth part keeps its error
    assert "ground truth not found" in capsys.readouterr().err
    assert main(["evaluate", str(fitted_run), "--placebo"]) == 0
    out = capsys.readouterr().out
    assert "placebo check" in out and "shuffled response_length" in out and "placebo selection" in out
    p = json.loads((fitted_run / rd.EVALUATION).read_text())["placebo"]
    (c,) = p["confounders"]
    assert c["n"] == p["observed"] > 500 and abs(c["effect"]) < 4 * c["se"], c
    assert c["zero_inside"] == (c["ci_low"] <= 0 <= c["ci_high"])
    s = p["selection"]
    assert s["n_selected"] > 100 and abs(s["difference"]) < 4 * s["se"], s
    # nothing about the flag generalises out of fold (below 0.5 is expected: with a fixed count per stratum, a
    # fold's training share of the flag is low where its own is high)
    assert s["propensity_auc"] < 0.6, s
    assert p["strata"] == ["model_version", "user_segment"] and p["n_strata"] > 1
    assert main(["evaluate", str(fitted_run), "--placebo", "--truth", str(fitted_run / "nope.parquet")]) == 2
