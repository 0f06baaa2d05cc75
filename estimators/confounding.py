"""Confounder effects by double machine learning (EconML), and the deconfounded target (docs/estimators.md#confounding).

A "confounder-treatment" T (e.g. log response length) shifts the label users give independently of the
answer's quality (verbosity bias). DML estimates its effect θ on the label given controls W (the text,
model version, user segment, position): both the label and T are predicted from W with cross-fitting, and θ is
the regression of the label's residual on T's residual, with a 95% CI. The deconfounded target removes
θ·(T − T_ref), the part of the label explained by the confounder (DeconfoundLM).

The controls are never complete, so each effect also carries EconML's omitted-variable-bias sensitivity analysis
(Chernozhukov, Cinelli, Newey, Sharma & Syrgkanis 2022, "Long story short: omitted variable bias in causal
machine learning"): an unmeasured confounder that explains a share c_t of the treatment's residual variance
and c_y of the outcome's moves θ by at most |ρ|·√(c_y·c_t/(1 − c_t))·S, S² = σ²·ν² (σ² the residual variance of
the outcome, ν² = 1/E[T̃²] for the treatment residual T̃). The robustness value is the c_y = c_t at which that
bound (or the CI widened by it) reaches 0.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import Ridge

Model = Literal["linear_dml", "causal_forest_dml"]
SENSITIVITY_ALPHA = 0.05
"""Level of the CIs and of the robustness value of the CI (the same 95% as the effect's CI)."""


class ConfounderEffect(BaseEstimator):
    """Average effect θ of a continuous treatment T on an outcome Y given controls W (dense), with a CI.

    ``linear_dml`` assumes one constant effect (EconML ``LinearDML``, X = None); ``causal_forest_dml`` lets
    the effect vary with W (``CausalForestDML`` with X = W) and reports its average over the fitted units.
    ``benchmark``: the confounder strength c_y = c_t (partial R², ρ = 1) at which the sensitivity bounds are
    reported beside the robustness values.
    """

    def __init__(self, *, model: Model = "linear_dml", cv: int = 3, alpha: float = 1.0, n_estimators: int = 200,
                 benchmark: float = 0.05, random_state: int = 0):
        self.model = model
        self.cv = cv
        self.alpha = alpha
        self.n_estimators = n_estimators
        self.benchmark = benchmark
        self.random_state = random_state

    def fit(self, Y: np.ndarray, T: np.ndarray, W: np.ndarray,
            sample_weight: np.ndarray | None = None) -> ConfounderEffect:
        """``sample_weight``: inverse-propensity weights when Y is only seen on selected units. Selection on
        both quality and T makes them correlated among the selected (a collider), which controls that do not
        capture quality fully leave as bias; weighting back to the population removes it."""
        from econml.dml import CausalForestDML, LinearDML  # EconML is heavy; only the fit stage needs it

        Y, T, W = (np.asarray(a, dtype=float) for a in (Y, T, W))
        if not (Y.shape[0] == T.shape[0] == W.shape[0]):
            raise ValueError(f"Y, T and W differ in length: {Y.shape[0]}, {T.shape[0]}, {W.shape[0]}")
        if not 0 <= self.benchmark < 1:
            raise ValueError(f"benchmark must be in [0, 1), got {self.benchmark}")
        if Y.shape[0] < 10 * self.cv or np.std(T) == 0:
            raise ValueError(f"a confounder effect needs varying T and at least {10 * self.cv} units, got "
                             f"{Y.shape[0]} units with sd(T) = {np.std(T):.3g}")
        nuisance = dict(model_y=Ridge(alpha=self.alpha), model_t=Ridge(alpha=self.alpha), cv=self.cv,
                        random_state=self.random_state)
        if self.model == "linear_dml":
            est = LinearDML(**nuisance).fit(Y, T, X=None, W=W, sample_weight=sample_weight)
            self.effect_ = float(np.ravel(est.intercept_)[0])
            lo, hi = est.intercept__interval(alpha=0.05)
        elif self.model == "causal_forest_dml":
            est = CausalForestDML(**nuisance, n_estimators=self.n_estimators).fit(Y, T, X=W,
                                                                                   sample_weight=sample_weight)
            self.effect_ = float(np.ravel(est.ate(W))[0])
            lo, hi = est.ate_interval(W, alpha=0.05)
        else:
            raise ValueError(f"unknown model {self.model!r} (choose linear_dml or causal_forest_dml)")
        self.ci_low_, self.ci_high_ = float(np.ravel(lo)[0]), float(np.ravel(hi)[0])
        self.sensitivity_ = self._sensitivity(est, weighted=sample_weight is not None)
        self.t_ref_ = float(np.median(T))
        self.n_ = int(Y.shape[0])
        self.weighted_ = sample_weight is not None
        var_y = float(np.var(Y))
        self.label_variance_share_ = float(self.effect_**2 * np.var(T) / var_y) if var_y > 0 else 0.0
        return self

    def _sensitivity(self, est, *, weighted: bool) -> dict[str, Any]:
        """EconML's robustness values and the bounds at ``benchmark``, or why there are none.

        ``robustness_value(null_hypothesis=0, interval_type="theta")``: the c_y = c_t (ρ = 1) whose bias bound
        moves the point estimate to 0; ``interval_type="ci"``: the strength at which the 95% CI widened by the
        bound first includes 0 (0 when the CI already does). EconML computes both from the unweighted
        residual-on-residual θ = E[Ỹ·T̃]/E[T̃²] (also for the causal forest, whose average effect can differ
        from it), so ``theta`` says which estimate they are about; with sample weights that θ is not the
        weighted estimate, and nothing is reported rather than a number about another estimate."""
        if weighted:
            return {"supported": False, "reason": "not supported with sample weights (EconML 0.17 computes its "
                    "sensitivity parameters from the unweighted residuals, so they describe another estimate)"}
        a = SENSITIVITY_ALPHA
        c = self.benchmark
        theta_lo, theta_hi = est.sensitivity_interval(alpha=a, c_y=c, c_t=c, rho=1.0, interval_type="theta")
        ci_lo, ci_hi = est.sensitivity_interval(alpha=a, c_y=c, c_t=c, rho=1.0, interval_type="ci")
        theta, _ = est.sensitivity_interval(alpha=a, c_y=0.0, c_t=0.0, rho=1.0, interval_type="theta")  # no bias
        return {"supported": True, "method": "econml omitted-variable-bias bounds (Chernozhukov et al. 2022)",
                "theta": float(theta), "alpha": a, "null_hypothesis": 0.0,
                "rv_estimate": float(est.robustness_value(null_hypothesis=0, alpha=a, interval_type="theta")),
                "rv_ci": float(est.robustness_value(null_hypothesis=0, alpha=a, interval_type="ci")),
                "benchmark": {"c_y": c, "c_t": c, "rho": 1.0, "theta_low": float(theta_lo),
                              "theta_high": float(theta_hi), "ci_low": float(ci_lo), "ci_high": float(ci_hi)}}

    def adjust(self, target: np.ndarray, T: np.ndarray) -> np.ndarray:
        """target − θ̂·(T − T_ref): the target with the confounder's share removed."""
        return np.asarray(target, dtype=float) - self.effect_ * (np.asarray(T, dtype=float) - self.t_ref_)

    def to_dict(self) -> dict[str, Any]:
        """The effect as saved in ``confounding.json``; ``rv_estimate`` / ``rv_ci`` are None where the
        sensitivity analysis is not supported (``sensitivity["reason"]`` says why)."""
        sens = self.sensitivity_
        return {"model": self.model, "weighted": self.weighted_, "effect": self.effect_, "ci_low": self.ci_low_,
                "ci_high": self.ci_high_,
                "t_ref": self.t_ref_, "n": self.n_, "label_variance_share": self.label_variance_share_,
                "rv_estimate": sens.get("rv_estimate"), "rv_ci": sens.get("rv_ci"), "sensitivity": sens}


SVD_ROWS = 20_000
"""Rows the text SVD of the controls is fitted on: the leading directions of 2^14 hashed n-gram proportions are
settled long before 200k rows (fitted on all of them, the SVD was 20 s of a 150 s fit); every row is projected."""


def confounder_controls(X, featurizer, *, numeric: list[str], treatment: str, n_components: int = 50,
                        random_state: int = 0, svd_rows: int = SVD_ROWS, rows: np.ndarray | None = None,
                        ) -> np.ndarray:
    """Dense controls W for a treatment from the featuriser's sparse output ``X``: the text block reduced to
    ``n_components`` SVD components, the other numerics (not the treatment itself) and the one-hot categoricals.
    (EconML's first stages need a dense W; 2^14 hashed n-grams are not.)

    ``rows`` (a boolean mask or indices of X's rows): return the controls of those rows only, e.g. the observed
    units the effect is fitted on. The SVD is fitted on the same rows of all of X either way, so a row's controls
    do not depend on ``rows``; projecting a fifth of the rows is a fifth of the largest product.

    The text enters as word *proportions* (each row rescaled to sum 1), not the featuriser's L2-normalised
    counts: those shrink as a text grows, so they encode its length, and a control that encodes the treatment
    absorbs part of its effect (on the simulator, the L2 text controls gave 0.036 for a length effect of 0.068;
    proportions 0.062). The SVD is fitted on ``svd_rows`` rows drawn with ``random_state``, and applied to every
    row asked for."""
    import scipy.sparse as sp
    from sklearn.decomposition import TruncatedSVD
    from sklearn.preprocessing import normalize

    X = sp.csr_matrix(X)
    idx = featurizer.output_indices_
    n, width = X.shape
    text_cols = np.arange(idx["text"].start, idx["text"].stop)

    def columns(cols) -> sp.csr_matrix:
        """The 0/1 matrix that picks ``cols`` out of X by a product (a column slice would copy all of X)."""
        cols = np.asarray(cols, dtype=np.int64)
        return sp.csr_matrix((np.ones(cols.size), (cols, np.arange(cols.size))), shape=(width, cols.size))

    k = max(1, min(n_components, text_cols.size - 1, n - 1))
    svd = TruncatedSVD(k, random_state=random_state)
    fit_rows = np.sort(np.random.default_rng(random_state).choice(n, svd_rows, replace=False)) if n > svd_rows \
        else np.arange(n)
    svd.fit(normalize(X[fit_rows][:, text_cols], norm="l1"))
    if rows is not None:
        X = X[np.asarray(rows)]
    # Every row's projection: (X_text · Vᵀ) / rowsum(X_text), the SVD of the proportions without copying X.
    total = np.asarray(X @ columns(text_cols).sum(axis=1)).ravel()
    projected = np.asarray(X @ (columns(text_cols) @ svd.components_.T))
    blocks = [np.divide(projected, total[:, None], out=np.zeros_like(projected), where=total[:, None] > 0)]
    if "numeric" in idx and idx["numeric"].stop > idx["numeric"].start:
        keep = [idx["numeric"].start + i for i, c in enumerate(numeric) if c != treatment]
        if keep:
            blocks.append((X @ columns(keep)).toarray())
    if "categorical" in idx and idx["categorical"].stop > idx["categorical"].start:
        blocks.append((X @ columns(range(idx["categorical"].start, idx["categorical"].stop))).toarray())
    return np.hstack(blocks)


def deconfound(target: np.ndarray, treatments: dict[str, np.ndarray], effects: list[dict]) -> np.ndarray:
    """target − Σ_j θ_j·(T_j − T_ref,j) for saved effects (``ConfounderEffect.to_dict`` plus a ``treatment``)."""
    out = np.asarray(target, dtype=float).copy()
    for e in effects:
        out -= e["effect"] * (np.asarray(treatments[e["treatment"]], dtype=float) - e["t_ref"])
    return out


def saved_effects(doc: list | dict) -> list[dict]:
    """The effect list of a parsed ``confounding.json``: the ``effects`` of the object fit writes, or the bare
    list that runs fitted before the sensitivity analysis wrote."""
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("effects"), list):
        return doc["effects"]
    raise ValueError("confounding.json holds neither a list of effects nor an object with an 'effects' list")
