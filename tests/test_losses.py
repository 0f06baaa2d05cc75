"""Losses against hand-computed values and the properties that make each one the estimator it claims to be."""

import math

import pytest
import torch

from estimators import losses as L

NAN = float("nan")


def _bce(s: float, y: float) -> float:
    p = 1 / (1 + math.exp(-s))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


@pytest.fixture()
def batch() -> dict[str, torch.Tensor]:
    """Four units, the third unobserved: its label is NaN and so is its weight, as junk data may have it."""
    return {
        "label": torch.tensor([1.0, 0.0, NAN, 0.7]),
        "observed": torch.tensor([1, 1, 0, 1], dtype=torch.int8),
        "weight": torch.tensor([2.0, 4.0, NAN, 1.0]),
        "imputed": torch.tensor([0.6, 0.2, 0.7, 0.9]),
        "rho01": 0.2,
        "rho10": 0.1,
    }


LOGITS = torch.tensor([0.5, -1.0, 2.0, 0.0])


def test_hand_computed_values(batch):
    ell = [_bce(0.5, 1), _bce(-1.0, 0), None, _bce(0.0, 0.7)]
    imp = [_bce(0.5, 0.6), _bce(-1.0, 0.2), _bce(2.0, 0.7), _bce(0.0, 0.9)]
    expected = {
        "naive": (ell[0] + ell[1] + ell[3]) / 3,
        "ips": (2 * ell[0] + 4 * ell[1] + 1 * ell[3]) / 4,                  # over all 4 units
        "snips": (2 * ell[0] + 4 * ell[1] + 1 * ell[3]) / (2 + 4 + 1),
        "dr": (imp[0] + 2 * (ell[0] - imp[0]) + imp[1] + 4 * (ell[1] - imp[1])
               + imp[2] + imp[3] + 1 * (ell[3] - imp[3])) / 4,
    }
    for name, value in expected.items():
        assert L.batch_loss(name, LOGITS, batch).item() == pytest.approx(value, rel=1e-6), name


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_unobserved_nan_labels_and_weights_never_make_nan(batch, name):
    logits = LOGITS.clone().requires_grad_(True)
    value = L.batch_loss(name, logits, batch)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", sorted(L.OBSERVED_ONLY))
def test_observed_only_losses_ignore_unobserved_units(batch, name):
    logits = LOGITS.clone().requires_grad_(True)
    value = L.batch_loss(name, logits, batch)
    value.backward()
    assert logits.grad[2] == 0                                            # no pull on the unobserved unit
    other = LOGITS.clone()
    other[2] = -7.0
    changed = {**batch, "label": torch.tensor([1.0, 0.0, 1.0, 0.7]), "weight": torch.tensor([2.0, 4.0, 9.0, 1.0])}
    assert L.batch_loss(name, other, changed).item() == pytest.approx(value.item(), rel=1e-6)


def test_weighted_losses_with_everything_observed_at_p_1_are_naive(batch):
    full = {"label": torch.tensor([1.0, 0.0, 0.0, 0.7]), "observed": torch.ones(4), "weight": torch.ones(4),
            "imputed": torch.tensor([0.9, 0.9, 0.1, 0.5])}                # any imputation: o·w = 1 replaces it
    naive = L.batch_loss("naive", LOGITS, full).item()
    for name in ("ips", "snips", "dr"):
        assert L.batch_loss(name, LOGITS, full).item() == pytest.approx(naive, rel=1e-6), name


def test_snips_is_invariant_to_scaling_the_weights(batch):
    scaled = {**batch, "weight": 10 * batch["weight"]}
    assert L.snips(LOGITS, **scaled).item() == pytest.approx(L.snips(LOGITS, **batch).item(), rel=1e-6)
    assert L.ips(LOGITS, **scaled).item() == pytest.approx(10 * L.ips(LOGITS, **batch).item(), rel=1e-6)


def test_dr_with_perfect_imputation_is_the_full_data_loss_whatever_the_weights(batch):
    perfect = {**batch, "imputed": torch.nan_to_num(batch["label"], nan=0.3)}   # ε̂ = r wherever r is seen
    full = L.bce(LOGITS, perfect["imputed"]).mean().item()
    for w in (batch["weight"], torch.tensor([0.1, 50.0, NAN, 3.0])):
        assert L.dr(LOGITS, **{**perfect, "weight": w}).item() == pytest.approx(full, rel=1e-6)


@pytest.fixture(scope="module")
def selected():
    """200k units rated more often when E[y | x] is high (missing at random given x): the naive risk is biased."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    logits = -1.0 + 0.5 * torch.randn(n, generator=g)                    # a model that says "mostly 0"
    p_true = torch.sigmoid(1.5 * torch.randn(n, generator=g))             # E[y | x]
    y = (torch.rand(n, generator=g) < p_true).float()
    p = 0.05 + 0.85 * p_true                                              # P(o = 1 | x)
    o = (torch.rand(n, generator=g) < p).float()
    label = torch.where(o == 1, y, torch.full_like(y, NAN))
    full = L.bce(logits, y).mean().item()
    return {"logits": logits, "label": label, "observed": o, "p": p, "p_true": p_true, "full": full}


def test_naive_is_biased_and_ips_snips_are_not(selected):
    s = selected
    naive_err = abs(L.naive(s["logits"], s["label"], s["observed"]).item() - s["full"])
    assert naive_err > 0.05
    for name in ("ips", "snips"):
        est = L.batch_loss(name, s["logits"], {"label": s["label"], "observed": s["observed"], "weight": 1 / s["p"]})
        assert abs(est.item() - s["full"]) < 0.1 * naive_err, name


def test_dr_is_doubly_robust(selected):
    s = selected
    batch = {"label": s["label"], "observed": s["observed"]}
    wrong_imputation = torch.full_like(s["p"], 0.5)
    wrong_weights = torch.ones_like(s["p"])                               # as if nobody self-selected
    naive_err = abs(L.naive(s["logits"], **batch).item() - s["full"])
    right_w = L.dr(s["logits"], **batch, weight=1 / s["p"], imputed=wrong_imputation).item()
    right_imp = L.dr(s["logits"], **batch, weight=wrong_weights, imputed=s["p_true"]).item()
    assert abs(right_w - s["full"]) < 0.1 * naive_err
    assert abs(right_imp - s["full"]) < 0.1 * naive_err
    both_wrong = L.dr(s["logits"], **batch, weight=wrong_weights, imputed=wrong_imputation).item()
    assert abs(both_wrong - s["full"]) > 0.3 * naive_err                  # the guarantee needs one of the two


@pytest.mark.parametrize(("name", "batch_keys", "message"), [
    ("hinge", (), "unknown loss 'hinge'"),
    ("dr", ("label", "observed", "weight"), r"loss 'dr' needs \['imputed'\]"),
    ("causalrm_ips", ("label", "observed", "weight"), r"needs \['rho01', 'rho10'\]"),
])
def test_bad_calls(batch, name, batch_keys, message):
    with pytest.raises(ValueError, match=message):
        L.batch_loss(name, LOGITS, {k: batch[k] for k in batch_keys})


def _tilde(s: float, y: float, r01: float, r10: float) -> float:
    """ℓ̃ by the docs/estimators.md formula, written out for one unit (soft y: the mixture of the two cases)."""
    one = ((1 - r10) * _bce(s, 1) - r01 * _bce(s, 0)) / (1 - r01 - r10)
    zero = ((1 - r01) * _bce(s, 0) - r10 * _bce(s, 1)) / (1 - r01 - r10)
    return y * one + (1 - y) * zero


def test_noise_corrected_losses_hand_computed(batch):
    t = [_tilde(0.5, 1, 0.2, 0.1), _tilde(-1.0, 0, 0.2, 0.1), None, _tilde(0.0, 0.7, 0.2, 0.1)]
    ti = [_tilde(0.5, 0.6, 0.2, 0.1), _tilde(-1.0, 0.2, 0.2, 0.1), _tilde(2.0, 0.7, 0.2, 0.1),
          _tilde(0.0, 0.9, 0.2, 0.1)]
    expected = {
        "causalrm_ips": (2 * t[0] + 4 * t[1] + 1 * t[3]) / 4,
        "causalrm_dr": (ti[0] + 2 * (t[0] - ti[0]) + ti[1] + 4 * (t[1] - ti[1]) + ti[2] + ti[3]
                        + 1 * (t[3] - ti[3])) / 4,
    }
    for name, value in expected.items():
        assert L.batch_loss(name, LOGITS, batch).item() == pytest.approx(value, rel=1e-6), name


def test_without_noise_the_corrected_losses_are_the_plain_ones(batch):
    clean = {**batch, "rho01": 0.0, "rho10": 0.0}
    for corrected, plain in (("causalrm_ips", "ips"), ("causalrm_dr", "dr")):
        assert L.batch_loss(corrected, LOGITS, clean).item() == pytest.approx(L.batch_loss(plain, LOGITS, clean).item())
    s, y = torch.linspace(-4, 4, 9), torch.full((9,), 0.3)
    torch.testing.assert_close(L.noise_corrected_bce(s, y, 0.0, 0.0), L.bce(s, y))


@pytest.mark.parametrize("rho01, rho10", [(0.2, 0.1), (0.1, 0.2), (0.0, 0.3), (0.45, 0.45)])
def test_the_corrected_loss_is_unbiased_for_the_clean_one_in_expectation(rho01, rho10):
    """Exactly: E[ℓ̃(s, r) | r*] over the flip distribution equals ℓ(s, r*), for each r* and any score."""
    s = torch.linspace(-6, 6, 25, dtype=torch.float64)
    ones, zeros = torch.ones_like(s), torch.zeros_like(s)
    lt1, lt0 = L.noise_corrected_bce(s, ones, rho01, rho10), L.noise_corrected_bce(s, zeros, rho01, rho10)
    torch.testing.assert_close((1 - rho01) * lt1 + rho01 * lt0, L.bce(s, ones))          # r* = 1
    torch.testing.assert_close(rho10 * lt1 + (1 - rho10) * lt0, L.bce(s, zeros))         # r* = 0


def test_under_simulated_flips_the_corrected_risk_matches_the_clean_risk():
    g = torch.Generator().manual_seed(0)
    n = 400_000
    q = torch.rand(n, generator=g, dtype=torch.float64)
    clean = (torch.rand(n, generator=g, dtype=torch.float64) < q).double()
    u = torch.rand(n, generator=g, dtype=torch.float64)
    noisy = torch.where(clean == 1, (u >= 0.2).double(), (u < 0.1).double())
    s = torch.logit(q.clamp(0.05, 0.95)) * 0.8                                           # some model's scores
    clean_risk = L.bce(s, clean).mean().item()
    assert abs(L.bce(s, noisy).mean().item() - clean_risk) > 0.05                        # noise biases plain BCE
    assert L.noise_corrected_bce(s, noisy, 0.2, 0.1).mean().item() == pytest.approx(clean_risk, abs=0.01)


def test_bradley_terry_hand_computed_with_weights_and_margin():
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5])
    w, m = torch.tensor([1.5, 0.5]), torch.tensor([0.5, 0.0])
    sig = lambda x: 1 / (1 + math.exp(-x))                                               # noqa: E731
    expected = (1.5 * -math.log(sig(2.0 - 1.0 - 0.5)) + 0.5 * -math.log(sig(0.0 - 0.5))) / 2
    assert L.bradley_terry(c, r, w, m).item() == pytest.approx(expected, rel=1e-6)
    assert L.bradley_terry(c, r, w).item() < L.bradley_terry(c, r, w, m).item()          # a margin asks for more
    logits = torch.tensor([0.0, 0.0], requires_grad=True)
    L.bradley_terry(logits[:1], logits[1:], torch.ones(1)).backward()
    assert logits.grad[0] < 0 < logits.grad[1]                                           # push chosen up


def test_flip_rates_that_cannot_be_corrected_are_refused():
    with pytest.raises(ValueError, match="no usable signal"):
        L.noise_corrected_bce(torch.zeros(2), torch.ones(2), 0.6, 0.5)


def test_the_registry_declares_every_configurable_loss_once():
    """train.loss / train.baselines name exactly the registry's losses, and the lookup tables are its views."""
    from typing import get_args

    from schemas.config import TrainConfig

    assert set(get_args(TrainConfig.model_fields["loss"].annotation)) == set(L.REGISTRY)
    assert set(L.LOSSES) | L.PAIRWISE == set(L.REGISTRY) and not set(L.LOSSES) & L.PAIRWISE
    for name, spec in L.REGISTRY.items():
        assert (name in L.NOISE_AWARE) == spec.noise_aware and (name in L.OBSERVED_ONLY) == spec.observed_only
        if not spec.pairwise:
            assert L.LOSSES[name] is spec.fn and L.INPUTS[name] == spec.inputs
    assert L.REGISTRY["bt"].fn is L.bradley_terry
    assert sorted(L.PAIRWISE) == ["bt"]
