"""Reward-model losses (docs/estimators.md#losses): pure tensor functions, each the empirical risk of one estimator.

Notation: ``logits`` s(x); ``label`` r (NaN where unobserved); ``observed`` o ∈ {0,1}; ``weight`` w = o/p̂
(``weight_clipped``: o / max(p̂, clip)); ``imputed`` ε̂(x) ≈ E[r | x, o=1]; ℓ(s, y) the binary cross-entropy
with a soft target y ∈ [0, 1]. Each function returns a scalar to minimise.

Unobserved units carry NaN labels (and may carry NaN or junk weights): every function selects with
``torch.where`` on o *before* any arithmetic, so a NaN can reach neither the value nor the gradient
(``0 * NaN`` is NaN, in the forward pass and in the backward pass alike).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
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


def noise_corrected_bce(logits: Tensor, target: Tensor, rho01: float, rho10: float) -> Tensor:
    """Per-unit ℓ̃(s, r) (Natarajan et al. 2013; CausalRM, Xu et al. 2024): with ρ01 = P(r=0 | r*=1) and
    ρ10 = P(r=1 | r*=0),

        ℓ̃(s, 1) = [(1−ρ10)·ℓ(s, 1) − ρ01·ℓ(s, 0)] / (1−ρ01−ρ10)
        ℓ̃(s, 0) = [(1−ρ01)·ℓ(s, 0) − ρ10·ℓ(s, 1)] / (1−ρ01−ρ10)

    so that E[ℓ̃(s, r) | r*] = ℓ(s, r*): the noisy label's corrected loss is unbiased for the clean one. A soft
    target y is the mixture y·ℓ̃(s, 1) + (1−y)·ℓ̃(s, 0) (ℓ̃ is linear in its target, as ℓ is); ρ = 0 gives ℓ.
    """
    from estimators.noise import check_flip_rates

    check_flip_rates(rho01, rho10)
    y = torch.nan_to_num(target, nan=0.0).to(logits.dtype)
    l1 = F.softplus(-logits)                      # ℓ(s, 1) = −log σ(s)
    l0 = F.softplus(logits)                       # ℓ(s, 0) = −log(1 − σ(s))
    denom = 1.0 - rho01 - rho10
    tilde1 = ((1 - rho10) * l1 - rho01 * l0) / denom
    tilde0 = ((1 - rho01) * l0 - rho10 * l1) / denom
    return y * tilde1 + (1 - y) * tilde0


def causalrm_ips(logits: Tensor, label: Tensor, observed: Tensor, weight: Tensor, rho01: float, rho10: float,
                 **_: Tensor) -> Tensor:
    """(1/N) Σ o·w·ℓ̃(s, r): IPS for the selection, ℓ̃ for the label noise (CausalRM's IPS variant)."""
    ow = _observed_weight(observed, weight, logits)
    per_unit = torch.where(ow != 0, noise_corrected_bce(logits, label, rho01, rho10), torch.zeros_like(logits))
    return (ow * per_unit).mean()


def causalrm_dr(logits: Tensor, label: Tensor, observed: Tensor, weight: Tensor, imputed: Tensor, rho01: float,
                rho10: float, **_: Tensor) -> Tensor:
    """(1/N) Σ [ℓ̃(s, ε̂) + o·w·(ℓ̃(s, r) − ℓ̃(s, ε̂))]: the DR risk of the noise-corrected loss. ε̂ models the
    *noisy* label (what the imputation model fits), and ℓ̃ is linear in its target, so the imputation term is
    E[ℓ̃ | x] when ε̂ is right, and that is the clean risk."""
    imputed_loss = noise_corrected_bce(logits, imputed, rho01, rho10)
    ow = _observed_weight(observed, weight, logits)
    observed_loss = torch.where(ow != 0, noise_corrected_bce(logits, label, rho01, rho10), imputed_loss)
    return (imputed_loss + ow * (observed_loss - imputed_loss)).mean()


def bradley_terry(chosen: Tensor, rejected: Tensor, weight: Tensor, margin: Tensor | None = None) -> Tensor:
    """Weighted Bradley–Terry risk mean(−w·log σ(s_c − s_r − m)) over pairs (``margin`` m: the chosen response
    must win by at least m, as in Llama 2's margin loss; pair weights average 1 in the pairwise dataset)."""
    diff = chosen - rejected - (margin.to(chosen.dtype) if margin is not None else 0.0)
    return (weight.to(chosen.dtype) * F.softplus(-diff)).mean()


@dataclass(frozen=True)
class LossSpec:
    """One reward-model loss, declared once: its risk function, the tensors it reads besides the scores (argument
    names, not column names), and how the trainer feeds it. The tables below are views of ``REGISTRY``."""

    fn: LossFn
    inputs: tuple[str, ...]
    noise_aware: bool = False
    """Also takes the fitted flip rates ``rho01`` and ``rho10`` (floats, from ``models/noise.json``)."""
    observed_only: bool = False
    """Unobserved units contribute exactly 0, so the trainer may feed it observed units only: for ``naive`` and
    ``snips`` the value is unchanged; for ``ips`` and ``causalrm_ips`` it is multiplied by N/N_obs, a constant that
    leaves the minimiser unchanged (``dr`` needs every unit: its imputation term covers the unobserved ones)."""
    pairwise: bool = False
    """Scores a pair (chosen, rejected) from the pairwise dataset rather than one unit."""
    denominator: str = "rows"
    """What the risk averages over in a batch: ``rows`` (a mean over rows), ``observed`` (Σ o: naive) or
    ``observed_weight`` (Σ o·w: snips). The trainer weights each micro-batch of a step by its share of this mass,
    so that accumulated or data-parallel micro-batches give the gradient of the whole batch's risk."""


REGISTRY: dict[str, LossSpec] = {
    "naive": LossSpec(naive, ("label", "observed"), observed_only=True, denominator="observed"),
    "ips": LossSpec(ips, ("label", "observed", "weight"), observed_only=True),
    "snips": LossSpec(snips, ("label", "observed", "weight"), observed_only=True, denominator="observed_weight"),
    "dr": LossSpec(dr, ("label", "observed", "weight", "imputed")),
    "causalrm_ips": LossSpec(causalrm_ips, ("label", "observed", "weight"), noise_aware=True, observed_only=True),
    "causalrm_dr": LossSpec(causalrm_dr, ("label", "observed", "weight", "imputed"), noise_aware=True),
    "bt": LossSpec(bradley_terry, ("weight", "margin"), pairwise=True),
}
"""Every loss ``train.loss`` / ``train.baselines`` can name (``tests/test_losses.py`` keeps the two lists equal)."""

LOSSES: dict[str, LossFn] = {name: spec.fn for name, spec in REGISTRY.items() if not spec.pairwise}
"""The pointwise losses by name."""
INPUTS: dict[str, tuple[str, ...]] = {name: spec.inputs for name, spec in REGISTRY.items() if not spec.pairwise}
"""The tensors each pointwise loss reads besides the logits (argument names, not column names)."""
NOISE_AWARE = frozenset(name for name, spec in REGISTRY.items() if spec.noise_aware)
"""Losses that also take the fitted flip rates (``LossSpec.noise_aware``)."""
OBSERVED_ONLY = frozenset(name for name, spec in REGISTRY.items() if spec.observed_only)
"""Losses the trainer may feed observed units only (``LossSpec.observed_only``)."""
PAIRWISE = frozenset(name for name, spec in REGISTRY.items() if spec.pairwise)
"""Losses trained on the pairwise dataset."""


def denominator_mass(name: str, columns: Mapping[str, np.ndarray]) -> float:
    """The mass a batch's risk for loss ``name`` averages over (``LossSpec.denominator``), from its numpy columns."""
    kind = REGISTRY[name].denominator
    if kind == "rows":
        return float(len(next(iter(columns.values()))))
    o = np.asarray(columns["observed"]) != 0
    if kind == "observed":
        return float(o.sum())
    return float(np.nan_to_num(np.asarray(columns["weight"], dtype=np.float64)[o], nan=0.0).sum())


def batch_loss(name: str, logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """Dispatch by name; ``batch`` maps argument names (label, observed, weight, imputed) to tensors, and the
    flip rates (rho01, rho10) to floats for the noise-corrected losses."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    needed = [*INPUTS[name], *(("rho01", "rho10") if name in NOISE_AWARE else ())]
    missing = [k for k in needed if k not in batch]
    if missing:
        raise ValueError(f"loss {name!r} needs {missing} in the batch")
    return LOSSES[name](logits, **{k: batch[k] for k in needed})
