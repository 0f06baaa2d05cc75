"""Flip rates that are identified or refused: their intervals (coverage, bootstrap behaviour), the identification
rule on hand cases, what fit and train do with rates that are not identified, fixed rates, and a small simulated
log end to end (few rated units, no audit: no silent correction)."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from estimators.noise import (
    FlipRates,
    anchor_flip_rates,
    audit_flip_rates,
    bootstrap_quantiles,
    identify,
    noise_model,
    unidentified_warning,
    wilson_interval,
)
from pipelines import train
from pipelines.orchestration.cli import main
from pipelines.sources.simulator import SCENARIOS, simulate, write
from schemas import run_dir as rd
from schemas.config import FitConfig, parse_config
from schemas.errors import ConfigError
from schemas.run_dir import RunDir
from tests.conftest import HASH_KEY_ENV, config_text

RULE = {"min_tail_units": 20, "max_ci_width": 0.1, "max_sum": 0.8}
GRID = [(n, p) for n in (20, 50, 150) for p in (0.05, 0.1, 0.2, 0.4)]


def _wald(k, n, level=0.95):
    p, z = k / n, stats.norm.ppf(0.5 + level / 2)
    half = z * np.sqrt(p * (1 - p) / n)
    return p - half, p + half


def _coverage_ok(interval, rng, draws=20_000) -> tuple[bool, np.ndarray]:
    """Coverage of ``interval`` over binomial draws at each (n, p) of GRID: every cell at least 0.91 and their
    mean within 0.015 of 0.95 (Monte Carlo se of a cell: 0.0015)."""
    cover = []
    for n, p in GRID:
        lo, hi = interval(rng.binomial(n, p, size=draws), n)
        cover.append(np.mean((lo <= p) & (p <= hi)))
    cover = np.array(cover)
    return bool(cover.min() >= 0.91 and abs(cover.mean() - 0.95) <= 0.015), cover


def test_audit_rate_intervals_cover_at_the_nominal_level_where_wald_does_not():
    rng = np.random.default_rng(0)
    ok, cover = _coverage_ok(wilson_interval, rng)
    assert ok, cover
    wald_ok, wald_cover = _coverage_ok(_wald, rng)
    assert not wald_ok and wald_cover.min() < 0.8, wald_cover     # the tolerance fails a wrong interval


def test_audited_flip_rate_intervals_cover_the_simulated_rates():
    """Through audit_flip_rates: 1,000 audits of 150 units, r* ~ Bernoulli(0.5), flips (0.2, 0.1)."""
    rng = np.random.default_rng(5)
    hits = np.zeros(2)
    for _ in range(1000):
        star = (rng.random(150) < 0.5).astype(float)
        u = rng.random(150)
        est = audit_flip_rates(np.where(star == 1, u >= 0.2, u < 0.1).astype(float), star)
        hits += [est.ci01[0] <= 0.2 <= est.ci01[1], est.ci10[0] <= 0.1 <= est.ci10[1]]
        assert est.level == 0.95 and est.ci01[0] <= est.rho01 <= est.ci01[1]
    assert np.all(np.abs(hits / 1000 - 0.95) <= 0.025), hits / 1000


def test_wilson_interval_hand_values_and_zero_flips_seen():
    lo, hi = wilson_interval(2, 10)                     # textbook: 0.0567, 0.5098
    assert (float(lo), float(hi)) == pytest.approx((0.0567, 0.5098), abs=1e-4)
    lo, hi = wilson_interval(0, 30)                     # no flip seen: the rate is not shown to be 0
    assert float(lo) == 0 and float(hi) == pytest.approx(3.8415 / 33.8415, abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_anchor_bootstrap_on_plateaus_and_against_order_statistic_theory():
    # Plateaus: 10% of the scores sit exactly at 0.1 and at 0.8, so every resample's 1% quantiles land on them.
    scores = np.concatenate([np.full(50, 0.1), np.linspace(0.2, 0.7, 400), np.full(50, 0.8)])
    est = anchor_flip_rates(scores, 0.01)
    assert est.ci10 == pytest.approx((0.1, 0.1)) and est.ci01 == pytest.approx((0.2, 0.2))
    assert est.level == 0.95 and est.n == 500
    # Uniform scores: the sample q-quantile has sd sqrt(q(1 - q)/n) / f = 0.00345 for q = 0.05, n = 4000.
    u = np.random.default_rng(1).random(4000)
    wide = anchor_flip_rates(u, 0.05, seed=2)
    theory = 2 * 1.96 * np.sqrt(0.05 * 0.95 / 4000)
    for lo, hi in (wide.ci10, wide.ci01):
        assert 0.6 * theory <= hi - lo <= 1.4 * theory, (hi - lo, theory)
    assert wide.ci10[0] <= 0.05 <= wide.ci10[1] and wide.ci01[0] <= 0.05 <= wide.ci01[1]
    narrow = anchor_flip_rates(np.random.default_rng(1).random(64_000), 0.05, seed=2)
    assert narrow.ci10[1] - narrow.ci10[0] < 0.5 * (wide.ci10[1] - wide.ci10[0])      # 16x the units: ~1/4
    assert anchor_flip_rates(u, 0.05, seed=2) == wide                                  # seeded
    draws = bootstrap_quantiles(u, (0.05, 0.95), n_boot=50, seed=3)
    chunked = bootstrap_quantiles(u, (0.05, 0.95), n_boot=50, seed=3, max_cells=3 * u.size)
    assert draws.shape == (2, 50) and np.array_equal(draws, chunked)   # the memory bound changes nothing


def _rates(ci01, ci10, rho01=None, rho10=None) -> FlipRates:
    rho01 = sum(ci01) / 2 if rho01 is None else rho01
    rho10 = sum(ci10) / 2 if rho10 is None else rho10
    return FlipRates(rho01, rho10, "anchor_quantile_0.01", 2500, ci01=ci01, ci10=ci10, level=0.95)


def test_identification_rule_on_hand_cases():
    ok = identify(_rates((0.15, 0.22), (0.05, 0.12)), tail_units=25, **RULE)
    assert ok.identified and ok.why.startswith("identified: 25.0 units") and "0.340" in ok.why
    few = identify(_rates((0.15, 0.22), (0.05, 0.12)), tail_units=4.6, **RULE)
    assert not few.identified and few.why == "not identified: 4.6 units in each anchor tail (at least 20 needed)"
    wide = identify(_rates((0.05, 0.30), (0.05, 0.12)), tail_units=25, **RULE)
    assert not wide.identified and "rho01 interval [0.050, 0.300] is 0.250 wide (at most 0.1)" in wide.why
    assert "rho10" not in wide.why                      # only what failed is listed
    near_one = identify(_rates((0.40, 0.48), (0.30, 0.38)), tail_units=25, **RULE)
    assert not near_one.identified and "upper bound of rho01 + rho10 0.860 (at most 0.8)" in near_one.why
    edge = identify(_rates((0.25, 0.5), (0.0, 0.25)), tail_units=20, min_tail_units=20, max_ci_width=0.25,
                    max_sum=0.75)
    assert edge.identified                              # each bound is inclusive
    everything = identify(_rates((0.05, 0.30), (0.30, 0.60)), tail_units=3, **RULE)
    assert everything.why.count(";") == 3               # tail, two widths, the sum: all four named
    audit = identify(replace(_rates((0.15, 0.22), (0.05, 0.12)), method="audit"), tail_units=None, **RULE)
    assert audit.identified and "anchor tail" not in audit.why
    bare = identify(FlipRates(0.2, 0.1, "audit", 100), tail_units=None, **RULE)
    assert not bare.identified and "no confidence interval" in bare.why


def test_flip_rates_round_trip_and_old_files_still_read():
    rates = identify(_rates((0.15, 0.22), (0.05, 0.12)), tail_units=25, **RULE)
    assert FlipRates.from_dict(json.loads(json.dumps(rates.to_dict()))) == rates
    old = FlipRates.from_dict({"rho01": 0.2, "rho10": 0.1, "method": "audit", "n": 500, "estimates": {}})
    assert old.identified and old.ci01 is None and "not assessed" in old.why
    assert "no interval" in old.interval_text()


def _world(n: int, seed: int = 0, n_gold: int = 0):
    """All units observed; a proxy whose scores span the plateaus at the flip rates (0.2, 0.1)."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0, 1, n)
    star = (rng.random(n) < q).astype(float)
    u = rng.random(n)
    label = np.where(star == 1, u >= 0.2, u < 0.1).astype(float)
    scores = np.clip(0.1 + 0.7 * q + rng.normal(0, 0.02, n), 0, 1)
    gold = np.full(n, np.nan)
    idx = rng.choice(n, n_gold, replace=False)
    gold[idx] = star[idx]
    return scores, label, gold, np.ones(n, bool)


def test_auto_applies_no_correction_to_rates_that_are_not_identified_and_says_why():
    flips, diag = noise_model(*_world(450), FitConfig(noise="auto"))
    anchor = diag["estimates"]["anchor"]
    assert (flips.method, flips.rho01, flips.rho10, flips.identified) == ("none", 0.0, 0.0, False)
    assert not anchor["identified"] and "4.5 units in each anchor tail" in anchor["why"]
    assert "anchor rates not identified" in flips.why and "95% CI [" in flips.why and "no audit" in flips.why
    assert "no noise correction" in unidentified_warning(flips)       # what fit warns: a warning, not silence
    big, _ = noise_model(*_world(6000), FitConfig(noise="auto"))
    assert big.method == "anchor_quantile_0.01" and big.identified and big.ci01[0] <= big.rho01 <= big.ci01[1]
    assert diag["identification"] == {"min_anchor_units": 20, "max_flip_ci_width": 0.1, "max_flip_sum": 0.8}


@pytest.mark.parametrize("method, n_gold", [("anchor", 0), ("audit", 80)])
def test_explicit_rates_not_identified_are_applied_but_flagged(method, n_gold):
    flips, _ = noise_model(*_world(450, n_gold=n_gold), FitConfig(noise=method))
    assert flips.method.startswith(method) and flips.rho01 > 0 and not flips.identified
    assert flips.ci01 is not None and flips.ci10 is not None
    assert "as fit.noise asks, but they are not identified" in unidentified_warning(flips)


def test_fixed_and_calibrate_rates():
    scores, label, gold, obs = _world(3000, n_gold=600)
    fixed, diag = noise_model(scores, label, gold, obs, FitConfig(noise="fixed", flip_rates=[0.15, 0.05]))
    assert (fixed.rho01, fixed.rho10, fixed.method, fixed.identified, fixed.why) == (
        0.15, 0.05, "fixed", True, "given (fit.flip_rates)")
    assert diag["estimates"]["audit"]["ci01"] is not None              # the data's estimates, for comparison
    cal, diag = noise_model(scores, label, gold, obs, FitConfig(noise="calibrate"))
    assert (cal.method, cal.rho01, cal.rho10, cal.identified) == ("calibrate", 0.0, 0.0, True)
    audit = diag["estimates"]["audit"]
    assert audit["identified"] and audit["ci01"][0] <= 0.2 <= audit["ci01"][1]
    assert diag["estimates"]["anchor"]["ci10"] is not None and "ppi" in diag["mean_reward"]


MINIMAL = '[input]\nimpressions = "imps/*.parquet"\nsignals = "signals.jsonl"\n[fit]\n'


@pytest.mark.parametrize(("fit", "message"), [
    ("noise = 'fixed'\n", "needs fit.flip_rates"),
    ("noise = 'auto'\nflip_rates = [0.2, 0.1]\n", "used only by fit.noise = 'fixed'"),
    ("noise = 'fixed'\nflip_rates = [0.6, 0.4]\n", "sum to 1 >= 1"),
    ("noise = 'fixed'\nflip_rates = [1.0, 0.0]\n", "each be in [0, 1)"),
    ("noise = 'fixed'\nflip_rates = [-0.1, 0.2]\n", "each be in [0, 1)"),
    ("noise = 'fixed'\nflip_rates = [0.1, 0.1, 0.1]\n", "two numbers"),
])
def test_bad_fixed_flip_rates_name_the_key(fit, message):
    with pytest.raises(ConfigError, match="key 'fit.flip_rates'") as e:
        parse_config(MINIMAL + fit)
    assert message in str(e.value)
    assert parse_config(MINIMAL + "noise = 'fixed'\nflip_rates = [0.3, 0.2]\n").fit.flip_rates == [0.3, 0.2]


def _fails_with(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in e for e in err)
    assert all(n in err[-1] for n in needles), err[-1]
    return err[-1]


def test_forcing_rates_that_sum_to_one_or_more_exits_2_naming_the_key(tmp_path: Path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(config_text(tmp_path, fit={"noise": "fixed", "flip_rates": [0.6, 0.5]}))
    line = _fails_with(capsys, ["run", str(cfg), str(tmp_path / "run")], "cfg.toml", "key 'fit.flip_rates'",
                       ">= 1")
    assert line.startswith("obsfeed run: ")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """2,500 impressions of the default scenario, no audit: about 460 rated units. Ingest, fit, score and
    report; train asks for the noise-corrected DR loss."""
    root = tmp_path_factory.mktemp("small")
    scenario = replace(SCENARIOS["default"], n_impressions=2500, seed=1, gold_share=0.0)
    write(simulate(scenario), root / "data", scenario=scenario)
    train = {"loss": "causalrm_dr", "baselines": [], "epochs": 2, "hash_features": 4096}
    cfg = root / "cfg.toml"
    cfg.write_text(config_text(root / "data", train=train))
    allow = root / "allow.toml"
    allow.write_text(config_text(root / "data", train={**train, "allow_unidentified_noise": True}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HASH_KEY_ENV, "test-key")
        assert main(["run", str(cfg), str(root / "run"), "--stages", "ingest,fit,score,report"]) == 0
    return root, scenario, cfg, allow


def test_small_data_rates_are_not_identified_or_cover_the_truth_never_a_silent_correction(small_run):
    root, scenario, _, _ = small_run
    run = root / "run"
    noise = json.loads((run / rd.NOISE_MODEL).read_text())
    rated = json.loads((run / rd.MANIFEST).read_text())["stages"]["fit"]["counts"]["sample_observed"]
    assert rated <= 1000
    anchor = noise["estimates"]["anchor"]
    assert noise["estimates"]["audit"] is None and "audit" in noise["errors"]
    if anchor["identified"]:                            # either its intervals cover the simulated rates ...
        assert anchor["ci01"][0] <= scenario.rho01 <= anchor["ci01"][1], anchor
        assert anchor["ci10"][0] <= scenario.rho10 <= anchor["ci10"][1], anchor
        assert noise["method"] == anchor["method"]
    else:                                               # ... or nothing is corrected, and the reason is given
        assert (noise["method"], noise["rho01"], noise["rho10"], noise["identified"]) == ("none", 0, 0, False)
        assert "anchor rates not identified" in noise["why"] and "units in each anchor tail" in noise["why"]
    manifest_rates = json.loads((run / rd.MANIFEST).read_text())["stages"]["fit"]["diagnostics"]["flip_rates"]
    assert manifest_rates["estimates"]["anchor"]["ci01"] == anchor["ci01"]
    page = (run / rd.REPORT / "index.html").read_text()
    assert "ρ01 95% CI" in page and "not identified" in page and "class-conditional" in page


def test_the_fit_stage_warns_about_rates_it_does_not_apply(small_run, capsys, monkeypatch):
    root, _, cfg, _ = small_run
    assert not json.loads((root / "run" / rd.NOISE_MODEL).read_text())["identified"]
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    capsys.readouterr()
    assert main(["run", str(cfg), str(root / "run"), "--stages", "fit"]) == 0     # refits the same models
    assert "fit: no noise correction: anchor rates not identified" in capsys.readouterr().err


def test_train_refuses_unidentified_rates_naming_the_interval_unless_told(small_run, capsys, monkeypatch):
    root, _, cfg, allow = small_run
    run = root / "run"
    noise = json.loads((run / rd.NOISE_MODEL).read_text())
    assert not noise["identified"]                      # measured on this scenario: 4.6 units per anchor tail
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    capsys.readouterr()
    _fails_with(capsys, ["run", str(cfg), str(run), "--stages", "train"], "noise.json", "95% CI [",
                "train.allow_unidentified_noise = true")
    assert not (run / rd.REWARD_MODEL).exists()
    assert main(["run", str(allow), str(run), "--stages", "train"]) == 0
    assert "used as train.allow_unidentified_noise = true" in capsys.readouterr().err
    metrics = json.loads((run / rd.REWARD_MODEL / "metrics.json").read_text())
    assert metrics["loss"] == "causalrm_dr" and metrics["flip_rates"] == [noise["rho01"], noise["rho10"]]


def test_train_names_the_interval_of_applied_rates_that_are_not_identified(tmp_path: Path, capsys):
    run = RunDir(tmp_path / "run")
    rates = identify(_rates((0.02, 0.31), (0.40, 0.52), rho01=0.08, rho10=0.48), tail_units=4.55, **RULE)
    run.path(rd.NOISE_MODEL).parent.mkdir(parents=True)
    run.path(rd.NOISE_MODEL).write_text(json.dumps({**rates.to_dict(), "estimates": {}}))
    with pytest.raises(ConfigError) as e:
        train.flip_rates(run)
    for needle in ("rho01 = 0.080 (95% CI [0.020, 0.310])", "rho10 = 0.480 (95% CI [0.400, 0.520])",
                   "4.5 units in each anchor tail", "train.allow_unidentified_noise = true"):
        assert needle in str(e.value), str(e.value)
    assert train.flip_rates(run, allow_unidentified=True) == (0.08, 0.48)
    assert "used as train.allow_unidentified_noise = true" in capsys.readouterr().err
