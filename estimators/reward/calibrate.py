"""Post-hoc calibration of a reward model's logit: s' = a·s + b, fitted by a loss's risk (Platt scaling).

A monotone map leaves every ranking as it is but sets the level and spread of P(r=1|x). Fitted on audited units
(``calibrate_on_gold``) it puts the model on the level of the true reward, which selection on r* itself moves
and no propensity can restore. Both backbones carry a and b (``scale``, ``shift``); a transformer folds them into
its head when saved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from estimators.losses import batch_loss
from estimators.reward.model import RewardModel, predict_logits

CALIBRATION_SCALE = (1e-3, 10.0)
"""Bounds on the calibration slope a: below, a constant predictor; above, a few separable units, or a risk with
no finite minimiser (the noise-corrected loss is unbounded below along a), could push a to infinity."""


def calibrate_logits(loss: str, logits: torch.Tensor, columns: Mapping[str, torch.Tensor],
                     scalars: Mapping[str, float] | None = None) -> dict[str, float]:
    """The affine map s' = a·s + b, a in ``CALIBRATION_SCALE``, that minimises ``loss``'s risk of the units in
    ``columns`` (Platt scaling; with ``naive`` on audited labels, the plain log-loss against r*).

    A monotone map leaves every ranking as it is but sets the level and spread of P(r=1|x); on a model that
    learned little (a small a) it pulls the scores to that level. Returns a, b and the risk before and after
    (the identity when the fit does not lower the risk).
    """
    s = logits.detach().to(torch.float64)
    cols = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in columns.items()}
    extra = dict(scalars or {})
    log_a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    lo, hi = (float(np.log(x)) for x in CALIBRATION_SCALE)

    def risk() -> torch.Tensor:
        return batch_loss(loss, log_a.clamp(lo, hi).exp() * s + b, {**cols, **extra})

    with torch.no_grad():
        before = float(risk())
    optimiser = torch.optim.LBFGS([log_a, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = risk()
        value.backward()
        return value

    optimiser.step(closure)
    with torch.no_grad():
        after = float(risk())
    a = min(max(float(log_a.detach().clamp(lo, hi).exp()), CALIBRATION_SCALE[0]), CALIBRATION_SCALE[1])
    if not (np.isfinite(after) and after <= before):       # keep the identity rather than a worse or broken map
        return {"scale": 1.0, "shift": 0.0, "val_loss_before": before, "val_loss_after": before}
    return {"scale": a, "shift": float(b.detach()), "val_loss_before": before, "val_loss_after": after}


def calibrate_on_gold(model: RewardModel, prompts: Sequence[str | None], responses: Sequence[str | None],
                      gold: np.ndarray, *, columns: Mapping[str, Sequence[float]] | None = None) -> dict[str, float]:
    """Fit ``model``'s output map s' = a·s + b on audited units (gold labels r* in [0, 1]) by log-loss, and set it.

    Why: self-selection on the true label (users rate good answers more) is invisible in x, so no propensity
    p(x) can undo it, and flip corrections then move the level the wrong way; a random audit sees r* directly.
    Two parameters on a few hundred audited units; the model's own weights stay as trained.
    """
    gold = np.asarray(gold, dtype=np.float64)
    if gold.size == 0 or not np.isfinite(gold).all() or ((gold < 0) | (gold > 1)).any():
        raise ValueError(f"gold labels: need at least one, each in [0, 1] (got {gold.size} labels)")
    model.scale.fill_(1.0)
    model.shift.fill_(0.0)
    s = predict_logits(model, prompts, responses, columns=columns)
    fitted = calibrate_logits("naive", torch.tensor(s),
                              {"label": torch.tensor(gold), "observed": torch.ones(gold.size, dtype=torch.int8)})
    model.scale.fill_(fitted["scale"])
    model.shift.fill_(fitted["shift"])
    return {**fitted, "n_gold": int(gold.size), "mean_gold": float(gold.mean())}
