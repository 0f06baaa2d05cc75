"""Reward-model losses (DESIGN §6): pure tensor functions, each the empirical risk of one estimator.

Notation: ``logits`` s(x); ``label`` r (NaN where unobserved); ``observed`` o ∈ {0,1}; ``weight`` w = o/p̂
(clipped); ``imputed`` ε̂(x) ≈ E[r | x, o=1]; ℓ(s, y) the binary cross-entropy with a soft target y.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bce(logits: Tensor, target: Tensor) -> Tensor:
    """Per-unit ℓ(s, y) = −y log σ(s) − (1−y) log(1−σ(s)); NaN targets (unobserved) become 0 first."""
    return F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(target, nan=0.0), reduction="none")


def naive(logits: Tensor, label: Tensor, observed: Tensor, **_: Tensor) -> Tensor:
    """Mean ℓ over observed units only: the risk on the *rated* population, biased by selection."""
    o = observed.to(logits.dtype)
    return (o * bce(logits, label)).sum() / o.sum().clamp_min(1.0)


def ips(logits: Tensor, label: Tensor, observed: Tensor, weight: Tensor, **_: Tensor) -> Tensor:
    """IPS risk (1/N) Σ o·w·ℓ(s, r): unbiased for the full-population risk when w = 1/p."""
    o = observed.to(logits.dtype)
    return (o * weight * bce(logits, label)).mean()


def snips(logits: Tensor, label: Tensor, observed: Tensor, weight: Tensor, **_: Tensor) -> Tensor:
    """Self-normalised IPS risk Σ o·w·ℓ / Σ o·w: a little bias, much less variance than IPS."""
    ow = observed.to(logits.dtype) * weight
    return (ow * bce(logits, label)).sum() / ow.sum().clamp_min(1e-12)


def dr(logits: Tensor, label: Tensor, observed: Tensor, weight: Tensor, imputed: Tensor, **_: Tensor) -> Tensor:
    """Doubly robust risk mean(ε̂_ℓ + o·w·(ℓ − ε̂_ℓ)), with ε̂_ℓ = ℓ(s, ε̂) the loss at the imputed label.

    Unbiased if either w or ε̂ is right. Over *all* units: the imputation term covers the unobserved ones.
    """
    o = observed.to(logits.dtype)
    imputed_loss = bce(logits, imputed)
    return (imputed_loss + o * weight * (bce(logits, label) - imputed_loss)).mean()


LOSSES = {"naive": naive, "ips": ips, "snips": snips, "dr": dr}
OBSERVED_ONLY = frozenset({"naive", "ips", "snips"})
"""Losses to which unobserved units contribute exactly 0: the trainer may feed them observed units only.
(For ``ips`` that rescales the risk by N/N_obs, a constant that leaves the minimiser unchanged.)"""


def batch_loss(name: str, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Dispatch by name: ``batch`` holds label, observed, weight and imputed tensors."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    return LOSSES[name](logits, **batch)
