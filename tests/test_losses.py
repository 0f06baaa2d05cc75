import math

import pytest
import torch

from estimators import losses as L


def _bce(s: float, y: float) -> float:
    p = 1 / (1 + math.exp(-s))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


@pytest.fixture()
def batch():
    return {
        "logits": torch.tensor([0.5, -1.0, 2.0, 0.0]),
        "label": torch.tensor([1.0, 0.0, float("nan"), 1.0]),
        "observed": torch.tensor([1, 1, 0, 1]),
        "weight": torch.tensor([2.0, 4.0, 0.0, 1.0]),
        "imputed": torch.tensor([0.6, 0.2, 0.7, 0.9]),
    }


def test_hand_computed_values(batch):
    ell = [_bce(0.5, 1), _bce(-1.0, 0), 0.0, _bce(0.0, 1)]
    b = {k: v for k, v in batch.items() if k != "logits"}
    assert L.naive(batch["logits"], **b).item() == pytest.approx((ell[0] + ell[1] + ell[3]) / 3, rel=1e-6)
    assert L.ips(batch["logits"], **b).item() == pytest.approx((2 * ell[0] + 4 * ell[1] + ell[3]) / 4, rel=1e-6)
    assert L.snips(batch["logits"], **b).item() == pytest.approx((2 * ell[0] + 4 * ell[1] + ell[3]) / 7, rel=1e-6)
    imp = [_bce(0.5, 0.6), _bce(-1.0, 0.2), _bce(2.0, 0.7), _bce(0.0, 0.9)]
    expected = (imp[0] + 2 * (ell[0] - imp[0]) + imp[1] + 4 * (ell[1] - imp[1])
                + imp[2] + imp[3] + (ell[3] - imp[3])) / 4
    assert L.dr(batch["logits"], **b).item() == pytest.approx(expected, rel=1e-6)


def test_unobserved_labels_never_make_nan(batch):
    b = {k: v for k, v in batch.items() if k != "logits"}
    logits = batch["logits"].clone().requires_grad_(True)
    for name in L.LOSSES:
        value = L.batch_loss(name, logits, b)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(logits.grad).all(), name
        logits.grad = None


def test_ips_with_full_observation_is_naive(batch):
    b = {**{k: v for k, v in batch.items() if k != "logits"}, "observed": torch.ones(4),
         "label": torch.tensor([1.0, 0.0, 0.0, 1.0]), "weight": torch.ones(4)}
    assert L.ips(batch["logits"], **b).item() == pytest.approx(L.naive(batch["logits"], **b).item())
    assert L.snips(batch["logits"], **b).item() == pytest.approx(L.naive(batch["logits"], **b).item())


def test_snips_is_scale_free_and_dr_reduces_to_the_imputed_risk(batch):
    b = {k: v for k, v in batch.items() if k != "logits"}
    scaled = {**b, "weight": 10 * b["weight"]}
    assert L.snips(batch["logits"], **scaled).item() == pytest.approx(L.snips(batch["logits"], **b).item())
    perfect = {**b, "imputed": torch.nan_to_num(b["label"], nan=0.7)}          # ε̂ = r on observed units
    full = L.bce(batch["logits"], perfect["imputed"]).mean()
    assert L.dr(batch["logits"], **perfect).item() == pytest.approx(full.item(), rel=1e-6)


def test_ips_risk_is_unbiased_for_the_full_data_risk():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    logits, y = torch.randn(n, generator=g), (torch.rand(n, generator=g) < 0.4).float()
    p = 0.1 + 0.8 * torch.rand(n, generator=g)
    o = (torch.rand(n, generator=g) < p).float()
    full = L.bce(logits, y).mean().item()
    label = torch.where(o == 1, y, torch.full_like(y, float("nan")))
    assert L.ips(logits, label, o, 1 / p).item() == pytest.approx(full, rel=0.02)


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        L.batch_loss("hinge", torch.zeros(1), {})
