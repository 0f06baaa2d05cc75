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
])
def test_bad_calls(batch, name, batch_keys, message):
    with pytest.raises(ValueError, match=message):
        L.batch_loss(name, LOGITS, {k: batch[k] for k in batch_keys})
