"""Unit features for the nuisance models: hashed text n-grams, scaled numerics, one-hot categoricals.

The text part is a stateless ``HashingVectorizer``, so the featuriser is tiny to save and applies to any
number of new units in the score stage ("fit small, score big").
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.compose import ColumnTransformer
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from schemas.config import FitConfig

TEXT = "_text"
RESPONSE_LENGTH = "response_length"
"""Derived numeric feature: number of whitespace-separated words of the response (a verbosity confounder)."""


def input_columns(*, text: list[str], numeric: list[str], categorical: list[str]) -> list[str]:
    """The unit columns :func:`feature_frame` reads (``response_length`` is derived from ``response``)."""
    return sorted({*text, *(c for c in numeric if c != RESPONSE_LENGTH), *categorical, "response"})


def feature_frame(columns: dict[str, np.ndarray | list], *, text: list[str], numeric: list[str],
                  categorical: list[str]) -> pd.DataFrame:
    """The model input frame from unit columns: concatenated text, derived length, numerics, categoricals."""
    n = len(next(iter(columns.values())))
    out: dict[str, object] = {}
    parts = [pd.Series(columns[c], dtype="object").fillna("").astype(str) for c in text if c in columns]
    out[TEXT] = parts[0].str.cat(parts[1:], sep=" ") if parts else pd.Series([""] * n)
    for c in numeric:
        if c == RESPONSE_LENGTH and c not in columns:
            resp = pd.Series(columns.get("response", [""] * n), dtype="object").fillna("").astype(str)
            out[c] = resp.str.split().str.len().astype(float).to_numpy()
        else:
            if c not in columns:
                raise KeyError(f"feature column '{c}' is not in the units table")
            out[c] = pd.to_numeric(pd.Series(columns[c]), errors="coerce").astype(float).to_numpy()
    for c in categorical:
        if c not in columns:
            raise KeyError(f"feature column '{c}' is not in the units table")
        out[c] = pd.Series(columns[c], dtype="object").fillna("<null>").astype(str).to_numpy()
    return pd.DataFrame(out)


def design(table: pa.Table, fit: FitConfig) -> pd.DataFrame:
    """The featuriser's input frame from a units table, converting only the columns it reads (not every unit
    column): what fit, score and the placebo check all feed the featuriser."""
    names = input_columns(text=fit.text, numeric=fit.numeric, categorical=fit.categorical)
    return feature_frame({c: table[c].to_numpy(zero_copy_only=False) for c in names if c in table.column_names},
                         text=fit.text, numeric=fit.numeric, categorical=fit.categorical)


def treatment_values(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A numeric confounder as a treatment: ``response_length`` on the log scale (verbosity effects are
    roughly linear in log length), any other numeric column as it is; missing values → the median."""
    values = frame[name].to_numpy(dtype=float)
    if name == RESPONSE_LENGTH:
        values = np.log(np.maximum(values, 1.0))
    if np.isnan(values).any():
        values = np.where(np.isnan(values), np.nanmedian(values) if np.isfinite(values).any() else 0.0, values)
    return values


def make_featurizer(*, numeric: list[str], categorical: list[str], hash_features: int = 2**14,
                    ngram_max: int = 2) -> ColumnTransformer:
    """An unfitted sklearn transformer from :func:`feature_frame` output to a sparse design matrix."""
    parts = [("text", HashingVectorizer(n_features=hash_features, ngram_range=(1, ngram_max),
                                        alternate_sign=False, norm="l2"), TEXT)]
    if numeric:
        parts.append(("numeric", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric))
    if categorical:
        parts.append(("categorical", OneHotEncoder(handle_unknown="ignore"), categorical))
    return ColumnTransformer(parts, sparse_threshold=1.0)


def structured_columns(featurizer: ColumnTransformer) -> list[int]:
    """Indices of a fitted featuriser's numeric and one-hot columns: what a boosted model sees beside the text
    logit (:class:`estimators.stacking.LinearThenBoosted`)."""
    blocks = featurizer.output_indices_
    return [i for name in ("numeric", "categorical") if name in blocks
            for i in range(blocks[name].start, blocks[name].stop)]
