"""Reward-model losses (DESIGN §5-§6): pure tensor functions, each the empirical risk of one estimator.

Notation: ``logits`` s(x); ``label`` r (NaN where unobserved); ``observed`` o ∈ {0,1}; ``weight`` w = o/p̂
(``weight_clipped``: o / max(p̂, clip)); ``imputed`` ε̂(x) ≈ E[r | x, o=1]; ℓ(s, y) the binary cross-entropy
with a soft target y ∈ [0, 1]. Each function returns a scalar to minimise.

Unobserved units carry NaN labels (and may carry NaN or junk weights): every function selects with
``torch.where`` on o *before* any arithmetic, so a NaN can reach neither the value nor the gradient
(``0 * NaN`` is NaN, in the forward pass and in the backward pass alike).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[..., Tensor]


def bce(logits: Tensor, target: Tensor) -> Tensor:
    """Per-unit ℓ(s, y) = −y log σ(s) − (1−y) log(1−σ(s)); NaN targets count as 0 (mask them afterwards)."""
    return F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(target, nan=0.0), reduction="none")


def _observed(observed: Tensor, like: Tensor) -> Tensor:
    return observed.to(device=like.device) != 0


def _observed_weight(observed: Tensor, weight: Tensor, like: Tensor) -> Tensor:
    """o·w with the weights of unobserved units forced to exactly 0 (they may be NaN in the data)."""
    return torch.where(_observed(observed, like), torch.nan_to_num(weight.to(like.dtype), nan=0.0),
                       torch.zeros((), dtype=like.dtype, device=like.device))


def naive(logits: Tensor, label: Tensor, observed: Tensor, **_: Tensor) -> Tensor:
    """(1/N_obs) Σ_{o=1} ℓ(s, r): the risk on the *rated* population, biased by self-selection.

    >>> float(naive(torch.tensor([0.0, 5.0]), torch.tensor([1.0, float("nan")]), torch.tensor([1, 0])))
    0.6931471824645996
    """
    o = _observed(observed, logits)
    per_unit = torch.where(o, bce(logits, label), torch.zeros((), dtype=logits.dtype, device=logits.device))
    return per_unit.sum() / o.sum().clamp_min(1)


def ips(logits: Tensor, label: Tensor, observed: Tensor, weight: Tensor, **_: Tensor) -> Tensor:
    """IPS risk (1/N) Σ o·w·ℓ(s, r) over *all* N units: unbiased for the full-population risk when w = 1/p.

    (Schnabel et al. 2016, "Recommendations as treatments"; CausalRM, Xu et al. 2024.)
    """
    return (_observed_weight(observed, weight, logits) * bce(logits, label)).mean()


def snips(logits: Tensor, label: Tensor, observed: Tensor, weight: Tensor, **_: Tensor) -> Tensor:
    """Self-normalised IPS risk Σ o·w·ℓ / Σ o·w: a little bias, much less variance; invariant to scaling w.

    (Swaminathan & Joachims 2015.) Normalised within the batch it is given.
    """
    ow = _observed_weight(observed, weight, logits)
    return (ow * bce(logits, label)).sum() / ow.sum().clamp_min(1e-12)


def dr(logits: Tensor, label: Tensor, observed: Tensor, weight: Tensor, imputed: Tensor, **_: Tensor) -> Tensor:
    """Doubly robust risk (1/N) Σ [ε̂_ℓ + o·w·(ℓ − ε̂_ℓ)], ε̂_ℓ = ℓ(s, ε̂) the loss at the imputed soft label.

    Unbiased, when o ⊥ r | x, if either w = 1/p(x) or ε̂ = E[r | x] (= E[r | x, o=1], what the imputation model
    fits; BCE is linear in its target, so then ε̂_ℓ = E[ℓ | x]).
    Over *all* units: the imputation term is what covers the unobserved ones (Wang et al. 2019, "Doubly robust
    joint learning for recommendation on data missing not at random").
    """
    imputed_loss = bce(logits, imputed)
    correction = _observed_weight(observed, weight, logits) * (bce(logits, label) - imputed_loss)
    return (imputed_loss + correction).mean()


LOSSES: dict[str, LossFn] = {"naive": naive, "ips": ips, "snips": snips, "dr": dr}

INPUTS: dict[str, tuple[str, ...]] = {
    "naive": ("label", "observed"),
    "ips": ("label", "observed", "weight"),
    "snips": ("label", "observed", "weight"),
    "dr": ("label", "observed", "weight", "imputed"),
}
"""The tensors each loss reads besides the logits (argument names, not column names)."""

OBSERVED_ONLY = frozenset({"naive", "ips", "snips"})
"""Losses to which unobserved units contribute exactly 0, so the trainer may feed them observed units only.
For ``naive`` and ``snips`` the value is unchanged; for ``ips`` it is multiplied by N/N_obs, a constant that
leaves the minimiser unchanged (``dr`` needs every unit: its imputation term covers the unobserved ones)."""


def batch_loss(name: str, logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """Dispatch by name; ``batch`` maps argument names (label, observed, weight, imputed) to tensors."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    missing = [k for k in INPUTS[name] if k not in batch]
    if missing:
        raise ValueError(f"loss {name!r} needs {missing} in the batch")
    return LOSSES[name](logits, **{k: batch[k] for k in INPUTS[name]})
